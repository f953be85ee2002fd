"""Print the LoRA tensors of a file: `key,(shape),mean|w|,min|w|` per line, then one line per module.

    python networks/check_lora_weights.py my_lora.safetensors [-s]

The module lines give rank, alpha and ‖ΔW‖ (Frobenius norm of the effective weight change at multiplier 1);
a module whose up weights are all zero (never trained) is marked. -s also lists the other tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from library.args import ArgumentParser
from library.lora_tools.factors import split_modules
from library.lora_tools.files import read_lora
from library.tool_entry import run_tool

LORA_MARKERS = ("lora_up", "lora_down", "lora_A", "lora_B", "oft_", ".up.", ".down.")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="check_lora_weights.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="LoRA file to check (.safetensors/.ckpt/.pt)")
    parser.add_argument("-s", "--show_all_keys", action="store_true", help="also list tensors that are not LoRA weights")
    return parser


def tensor_line(key: str, value: torch.Tensor) -> str:
    value = value.float().abs()
    shape = str(tuple(value.shape)).replace(", ", "-")
    return f"{key},{shape},{float(value.mean()) if value.numel() else 0.0},{float(value.min()) if value.numel() else 0.0}"


def check_lines(state_dict: dict, show_all_keys: bool = False) -> list[str]:
    lora_keys = [k for k in state_dict if any(m in k for m in LORA_MARKERS)]
    lines = [f"number of LoRA tensors: {len(lora_keys)}"]
    keys = lora_keys
    if show_all_keys:
        keys = lora_keys + [k for k in state_dict if k not in set(lora_keys)]
        lines.append(f"number of all tensors: {len(keys)}")
    lines += [tensor_line(k, state_dict[k]) for k in keys]
    modules, _ = split_modules(state_dict)
    lines.append(f"number of LoRA modules: {len(modules)}")
    for name, module in modules.items():
        delta_norm = float(module.delta().norm())
        zero = " (up is all zeros: untrained)" if not bool(module.up.any()) else ""
        lines.append(f"{name}: rank {module.rank}, alpha {module.alpha or module.rank:g}, |dW| {delta_norm:.4g}{zero}")
    return lines


def run(args) -> int:
    state_dict, _ = read_lora(args.file)
    print(f"loading: {args.file}")
    print("\n".join(check_lines(state_dict, args.show_all_keys)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
