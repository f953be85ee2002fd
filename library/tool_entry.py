"""The start-up every non-training command-line tool shares: logging, one-line user errors, Ctrl-C.

Training scripts go through library.training.entry.run_script, which adds --config_file handling.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from library.errors import INTERRUPTED_EXIT, is_user_error, print_user_error


def run_tool(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None], argv=None) -> int:
    """Parse with `parser` (use library.args.ArgumentParser for one-line option errors), run `body(args)`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return run_reporting_user_errors(body, parser.parse_args(argv))


def run_reporting_user_errors(body: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """`body(args)`, with user errors printed as one line (exit 1) and Ctrl-C as a short note (exit 130)."""
    try:
        return body(args) or 0
    except KeyboardInterrupt:
        print("interrupted; files being written were left untouched", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as err:  # noqa: BLE001 - user errors are one line, bugs keep their traceback
        if not is_user_error(err):
            raise
        return print_user_error(err)
