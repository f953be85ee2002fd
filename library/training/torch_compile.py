"""--torch_compile / --dynamo_backend: the U-Net compiled with torch.compile, in place.

`Module.compile()` compiles the module's call without wrapping it, so the U-Net keeps its class and
its state-dict keys (no `_orig_mod.` prefix): saving, LoRA hooks and sampling work as without it.
The LoRA modules reroute layer forwards before this runs (recipe.attach comes first), and dynamo
traces through those rerouted forwards, so the network is inside the compiled graph.
sd-scripts passes --dynamo_backend to accelerate, which wraps the whole prepared model instead.
"""

from __future__ import annotations

import argparse

import torch


def compile_unet_if_asked(args: argparse.Namespace, unet: torch.nn.Module, log=print) -> bool:
    if not getattr(args, "torch_compile", False):
        return False
    backend = args.dynamo_backend or "inductor"
    unet.compile(backend=backend)
    log(f"torch.compile: the U-Net is compiled with the {backend} backend (the first steps compile it)")
    return True
