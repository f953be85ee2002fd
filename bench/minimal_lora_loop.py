"""A bare LoRA training loop, as a same-machine reference for bench_train_network.py.

    python bench/minimal_lora_loop.py --json OUT.json --model PATH --data DIR --resolution 128
        [--lora ours|peft] [--gradient_checkpointing] [--steps 12]

No trainer: load the parts (our loader), encode the images with the VAE once, then per step
encode the caption with the frozen text encoder (no_grad), add noise, U-Net forward, MSE, backward,
AdamW step. `--lora ours`: networks.lora rank 4 / alpha 1 on the same 192 U-Net modules as
train_network.py; `--lora peft`: peft's LoraConfig on to_q/to_k/to_v/to_out.0 (128 modules), as
diffusers' train_text_to_image_lora.py does. The gap between this loop and train_network.py on
the same machine is what our trainer costs per step.
"""

from __future__ import annotations

import time

_T0_WALL = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MEASURED_FROM = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a folder of images with .txt captions (searched recursively)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--lora", choices=["ours", "peft"], default="ours")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    import resource

    import numpy as np
    import psutil
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from library.models.loading import load_base_model

    create = psutil.Process().create_time()
    record: dict = {"lora": args.lora, "imports_done_s": time.time() - create}
    torch.manual_seed(0)
    start = time.perf_counter()
    parts = load_base_model(args.model)
    record["load_s"] = time.perf_counter() - start
    unet, vae, text_encoder, tokenizer = parts.unet, parts.vae, parts.text_encoder, parts.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)

    images = sorted(p for p in Path(args.data).rglob("*.png"))
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]
    start = time.perf_counter()
    latents = []
    with torch.no_grad():
        for path in images:
            pixels = np.array(Image.open(path).convert("RGB").resize((args.resolution, args.resolution)))
            x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            latents.append(vae.encode(x).latent_dist.sample() * vae.config.scaling_factor)
    record["latent_cache_s"] = time.perf_counter() - start

    if args.lora == "ours":
        from networks.lora import create_network

        network = create_network(1.0, 4, 1, vae, text_encoder, unet)
        network.apply_to(text_encoder, unet, False, True)
        params = [p for p in network.parameters() if p.requires_grad]
        record["unet_lora_modules"] = len(network.unet_loras)
    else:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=4, lora_alpha=1, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        record["unet_lora_modules"] = sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    text_encoder.eval()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = parts.noise_scheduler
    generator = torch.Generator().manual_seed(0)

    step_wall = []
    record["first_step_begins_s"] = time.time() - create
    for step in range(args.steps):
        i = step % len(latents)
        with torch.no_grad():
            ids = tokenizer([captions[i]], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            hidden = text_encoder(ids)[0]
        noise = torch.randn(latents[i].shape, generator=generator)
        timesteps = torch.randint(0, 1000, (1,), generator=generator)
        noisy = scheduler.add_noise(latents[i], noise, timesteps)
        prediction = unet(noisy, timesteps, hidden).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        step_wall.append(time.time())
    begins = create + record["first_step_begins_s"]
    durations = [b - a for a, b in zip([begins, *step_wall[:-1]], step_wall)]
    record.update(
        step_s=durations,
        s_per_step=statistics.median(durations[MEASURED_FROM - 1 :]),
        first_step_ends_s=step_wall[0] - create,
        ru_maxrss_self_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        torch_threads=torch.get_num_threads(),
        pid=os.getpid(),
    )
    Path(args.json).write_text(json.dumps(record, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
