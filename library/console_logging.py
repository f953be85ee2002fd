"""--console_log_level / --console_log_file / --console_log_simple: where the scripts' log lines go.

sd-scripts colours its console log with `rich` unless --console_log_simple; the log here is always the
plain `LEVEL message` form, so --console_log_simple is accepted and changes nothing. A log file is
appended to (sd-scripts overwrites it): a second run never erases the first one's log.
"""

from __future__ import annotations

import argparse
import logging
import sys

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(levelname)s %(message)s"


def add_console_log_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("console log")
    group.add_argument(
        "--console_log_level", type=str.upper, default=None, choices=LEVELS,
        help="least severe log lines shown (default INFO)",
    )
    group.add_argument(
        "--console_log_file", type=str, default=None,
        help="append the log lines to this file instead of printing them (progress bars and results still print)",
    )
    group.add_argument(
        "--console_log_simple", action="store_true", help="accepted for sd-scripts compatibility: the log is always plain"
    )


def configure_console_logging(args: argparse.Namespace) -> None:
    """Apply the options to the root logger; without them the start-up's stderr log stays as it is."""
    root = logging.getLogger()
    if args.console_log_level:
        root.setLevel(getattr(logging, args.console_log_level))
    if args.console_log_file:
        handler = logging.FileHandler(args.console_log_file, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s " + LOG_FORMAT))
        for old in list(root.handlers):
            if type(old) is logging.StreamHandler and old.stream in (sys.stderr, sys.stdout):
                root.removeHandler(old)  # the console one; others (a test's capture) stay
        root.addHandler(handler)
