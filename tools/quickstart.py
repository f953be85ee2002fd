"""`make quickstart`: the main job on the shipped default.

Until LoRA training exists (issue order 3) this shows what is built: it creates the
tiny SD1-shaped test model, converts it diffusers -> LDM single file -> diffusers with
the same tool sd-scripts users run, and checks that every weight survived bit for bit.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OUTPUT = Path("quickstart_output")


def main() -> int:
    import torch

    from library.models.loading import load_base_model
    from tools.build_tiny_models import build_tiny_models
    from tools.convert_diffusers20_original_sd import main as convert

    print("Quick start (foundation stage): LoRA training is not built yet, so this run builds a tiny")
    print("SD1-shaped model and converts it between the diffusers and the original single-file layouts.\n")
    start = time.perf_counter()
    paths = build_tiny_models(OUTPUT / "tiny")
    single = OUTPUT / "tiny_sd1_roundtrip.safetensors"
    back = OUTPUT / "tiny_sd1_roundtrip"
    convert([str(paths["sd1"]), str(single)])
    convert([str(single), str(back), "--v1", "--use_safetensors"])

    original, converted = load_base_model(str(paths["sd1"])), load_base_model(str(back))
    mismatches = [
        f"{part}.{key}"
        for part in ("unet", "vae", "text_encoder")
        for key, value in getattr(original, part).state_dict().items()
        if not torch.equal(value, getattr(converted, part).state_dict()[key])
    ]
    print(f"\ntiny diffusers model:      {paths['sd1']}")
    print(f"as an LDM single file:     {single}")
    print(f"converted back:            {back}")
    if mismatches:
        print(f"FAILED: {len(mismatches)} tensors changed, e.g. {mismatches[:3]}")
        return 1
    print(f"all U-Net, VAE and text-encoder tensors are bit-identical after the round trip ({time.perf_counter() - start:.1f} s)")
    print("\nThe same conversion on a real model:")
    print("  .venv/bin/python tools/convert_diffusers20_original_sd.py v1-5-pruned-emaonly.safetensors sd15_diffusers --v1 --use_safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
