"""Print the metadata of a .safetensors model, LoRA or embedding as sorted JSON.

    python tools/show_metadata.py --model my_lora.safetensors

Values that hold JSON themselves (ss_dataset_dirs, ss_tag_frequency, ...) are shown decoded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args import ArgumentParser
from library.errors import UserError
from library.models.checkpoint_io import NotACheckpointError, checkpoint_file_problem, read_safetensors_metadata
from library.tool_entry import run_tool


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="show_metadata.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a .safetensors file")
    return parser


def _decoded(value: str):
    if value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def show(args) -> int:
    path = Path(args.model)
    if not path.is_file():
        raise FileNotFoundError(f"--model {path}: file not found")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"--model {path}: only .safetensors files carry metadata (.ckpt/.pt files have none)")
    problem = checkpoint_file_problem(path)
    if problem:
        raise NotACheckpointError(problem)
    metadata = read_safetensors_metadata(path)
    print(json.dumps({k: _decoded(v) for k, v in sorted(metadata.items())}, indent=2, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), show, argv)


if __name__ == "__main__":
    sys.exit(main())
