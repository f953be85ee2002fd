"""Merge tag files (`<image>.txt`, from the WD14 tagger) into a fine-tuning metadata JSON, as its `tags` fields.

    python finetune/merge_dd_tags_to_metadata.py train_data meta_cap_dd.json --in_json meta_cap.json [--full_path]

Keys are the image stems (or absolute paths with --full_path); an image without a tag file is named
in a warning and skipped. Other fields of existing entries are kept. See docs/guide.md §7.3.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args import ArgumentParser
from library.data.metadata_tools import add_merge_arguments, run_merge
from library.tool_entry import run_tool


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="merge_dd_tags_to_metadata.py", description=__doc__.split("\n\n")[0])
    add_merge_arguments(parser, default_extension=".txt")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), lambda args: run_merge(args, "tags"), argv)


if __name__ == "__main__":
    sys.exit(main())
