"""Clean the captions and tags of a fine-tuning metadata JSON (caption-model phrasing, tag duplicates).

    python finetune/clean_captions_and_tags.py meta_cap_dd.json meta_clean.json

What changes: library/data/caption_cleaning.py. Entries without a caption or tags are counted and kept.
See docs/guide.md §7.4.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args import ArgumentParser
from library.data.caption_cleaning import clean_caption, clean_tags
from library.data.metadata_tools import read_metadata, write_metadata
from library.tool_entry import run_tool


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="clean_captions_and_tags.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("in_json", help="metadata file to read")
    parser.add_argument("out_json", help="metadata file to write (may be the same file)")
    parser.add_argument("--debug", action="store_true", help="print each changed caption and tag list")
    return parser


def clean(args) -> int:
    metadata = read_metadata(args.in_json)
    changed = without_caption = without_tags = 0
    for key, entry in metadata.items():
        for field, cleaner in (("caption", clean_caption), ("tags", clean_tags)):
            if not isinstance(entry.get(field), str):
                without_caption += field == "caption"
                without_tags += field == "tags"
                continue
            cleaned = cleaner(entry[field])
            if cleaned != entry[field]:
                changed += 1
                if args.debug:
                    print(f"{key} {field}: {entry[field]!r} -> {cleaned!r}")
                entry[field] = cleaned
    write_metadata(args.out_json, metadata)
    print(f"{len(metadata)} entries: {changed} field(s) changed, {without_caption} without caption, "
          f"{without_tags} without tags; wrote {args.out_json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), clean, argv)


if __name__ == "__main__":
    sys.exit(main())
