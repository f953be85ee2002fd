"""Options that change how the model is held and run, not what is trained: DeepSpeed (ZeRO),
torch.compile and fp8 storage of frozen base weights.

Names, defaults and meanings follow kohya-ss/sd-scripts (library/deepspeed_utils.py and
library/train_util.py there); docs/training.md describes them. The code that acts on them:
library/training/deepspeed_setup.py, library/training/torch_compile.py, library/training/fp8_weights.py.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from library.recipe import RecipeInfo

DEFAULT_ZERO_STAGE = 2
# sd-scripts' list (the backends accelerate's TorchDynamoPlugin knew when it was written).
DYNAMO_BACKENDS = (
    "eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs",
    "ofi", "fx2trt", "onnxrt", "tensort", "ipex", "tvm",
)  # fmt: skip
DEEPSPEED_PIN = "deepspeed==0.19.8"


def add_scaling_arguments(parser: argparse.ArgumentParser) -> None:
    """--deepspeed and its ZeRO options, --torch_compile / --dynamo_backend, --fp8_base (every recipe)."""
    group = parser.add_argument_group("DeepSpeed (ZeRO)")
    group.add_argument(
        "--deepspeed", action="store_true",
        help="train through DeepSpeed ZeRO (launch with accelerate launch / torchrun; see docs/training.md)",
    )
    group.add_argument(
        "--zero_stage", type=int, default=None, choices=[0, 1, 2, 3],
        help=f"ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients), "
        f"3 (+ weights) (default {DEFAULT_ZERO_STAGE}; needs --deepspeed)",
    )
    group.add_argument(
        "--offload_optimizer_device", type=str, default=None, choices=["cpu", "nvme"],
        help="keep optimizer states in CPU memory or on an NVMe drive (ZeRO stages 2 and 3)",
    )
    group.add_argument(
        "--offload_optimizer_nvme_path", type=str, default=None,
        help="folder on the NVMe drive for --offload_optimizer_device nvme",
    )
    group.add_argument(
        "--offload_param_device", type=str, default=None, choices=["cpu", "nvme"],
        help="keep weights in CPU memory or on an NVMe drive (ZeRO stage 3)",
    )
    group.add_argument(
        "--offload_param_nvme_path", type=str, default=None, help="folder on the NVMe drive for --offload_param_device nvme"
    )
    group.add_argument(
        "--zero3_init_flag", action="store_true", help="ZeRO stage 3: build large models already sharded (deepspeed.zero.Init)"
    )
    group.add_argument(
        "--zero3_save_16bit_model", action="store_true", help="ZeRO stage 3: gather 16-bit weights when the model is saved"
    )
    group.add_argument(
        "--fp16_master_weights_and_gradients", action="store_true",
        help="DeepSpeed: fp16 master weights and gradients, fp32 optimizer states "
        "(needs --mixed_precision fp16, --zero_stage 2 and --offload_optimizer_device cpu)",
    )

    group = parser.add_argument_group("compilation and fp8 weights")
    group.add_argument(
        "--torch_compile", action="store_true",
        help="compile the U-Net with torch.compile (the first steps are slow while it compiles)",
    )
    group.add_argument(
        "--dynamo_backend", type=str, default="inductor", choices=list(DYNAMO_BACKENDS),
        help="torch.compile backend for --torch_compile (default inductor)",
    )
    group.add_argument(
        "--fp8_base", action="store_true",
        help="store the frozen base model's Linear/Conv weights in fp8 (float8_e4m3fn), computed in the "
        "--mixed_precision dtype: about half the weight memory (needs --mixed_precision fp16 or bf16)",
    )


def add_fp8_base_unet_argument(parser: argparse.ArgumentParser) -> None:
    """train_network.py's --fp8_base_unet (registered with the network options)."""
    parser.add_argument(
        "--fp8_base_unet", action="store_true",
        help="like --fp8_base for the U-Net only; the text encoder stays in the --mixed_precision dtype",
    )


def scaling_option_problems(args: argparse.Namespace, info: "RecipeInfo") -> list[str]:
    """Bad combinations of the options above, found before anything loads (one line each, with the fix)."""
    problems = deepspeed_option_problems(args)
    if args.deepspeed and zero_stage(args) == 3:
        problems += zero_stage_3_problems(args, info)
    problems += fp8_option_problems(args, info)
    if getattr(args, "torch_compile", False) and args.dynamo_backend not in ("eager", "aot_eager", "inductor"):
        problem = _backend_problem(args.dynamo_backend)
        if problem:
            problems.append(problem)
    return problems


def deepspeed_option_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if not args.deepspeed:
        given = [
            f"--{name}" for name in (
                "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
                "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                "fp16_master_weights_and_gradients",
            ) if getattr(args, name, None) not in (None, False)
        ]  # fmt: skip
        if given:
            one = len(given) == 1
            problems.append(
                f"{', '.join(given)} {'needs' if one else 'need'} --deepspeed; add --deepspeed or drop {'it' if one else 'them'}"
            )
        return problems
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        problems.append(f"--deepspeed needs the deepspeed package: pip install {DEEPSPEED_PIN}")
    stage = zero_stage(args)
    for kind in ("optimizer", "param"):
        device, path = getattr(args, f"offload_{kind}_device"), getattr(args, f"offload_{kind}_nvme_path")
        if path and device != "nvme":
            problems.append(f"--offload_{kind}_nvme_path needs --offload_{kind}_device nvme")
        if device == "nvme" and not path:
            problems.append(f"--offload_{kind}_device nvme needs --offload_{kind}_nvme_path (a folder on the NVMe drive)")
    if args.offload_optimizer_device and stage < 2:
        problems.append(f"--offload_optimizer_device needs --zero_stage 2 or 3 (now {stage})")
    if args.offload_param_device and stage != 3:
        problems.append(f"--offload_param_device needs --zero_stage 3 (now {stage})")
    for flag in ("zero3_init_flag", "zero3_save_16bit_model"):
        if getattr(args, flag) and stage != 3:
            problems.append(f"--{flag} needs --zero_stage 3 (now {stage})")
    if args.fp16_master_weights_and_gradients and not (
        args.mixed_precision == "fp16" and stage == 2 and args.offload_optimizer_device == "cpu"
    ):
        problems.append(
            "--fp16_master_weights_and_gradients needs --mixed_precision fp16, --zero_stage 2 and "
            "--offload_optimizer_device cpu (DeepSpeed supports it only there)"
        )
    if getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False):
        problems.append(
            "--fp8_base / --fp8_base_unet do not work with --deepspeed (DeepSpeed casts every weight of the model "
            "to the --mixed_precision dtype); drop one of them"
        )
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        problems.append(
            "--deepspeed with ACCELERATE_USE_CPU set (accelerate launch --cpu): accelerate then skips DeepSpeed; "
            "unset it, DeepSpeed runs on the CPU by itself when there is no GPU"
        )
    return problems


def zero_stage_3_problems(args: argparse.Namespace, info: "RecipeInfo") -> list[str]:
    """ZeRO-3 splits every weight over the processes: what the recipe or an option reads whole must allow it."""
    if not info.zero_stage_3:
        return [
            f"--zero_stage 3: {info.script}.py does not support it yet (ZeRO-3 splits the base model's own weights "
            "over the processes, and this recipe's saves and hooks read them whole); use --zero_stage 2, with "
            "--offload_optimizer_device cpu to save GPU memory"
        ]
    problems = []
    if getattr(args, "sample_prompts", None):
        problems.append(
            "--sample_prompts with --zero_stage 3: sample images are drawn by the main process alone, but under ZeRO-3 "
            "every forward pass needs all processes; drop the sample options or use --zero_stage 2"
        )
    if getattr(args, "scale_weight_norms", None):
        problems.append(
            "--scale_weight_norms with --zero_stage 3: it rescales the trained weights after each step, which ZeRO-3 "
            "holds split over the processes; drop it or use --zero_stage 2"
        )
    return problems


def zero_stage(args: argparse.Namespace) -> int:
    return DEFAULT_ZERO_STAGE if args.zero_stage is None else int(args.zero_stage)


def fp8_option_problems(args: argparse.Namespace, info: "RecipeInfo") -> list[str]:
    fp8_unet = getattr(args, "fp8_base_unet", False)
    if not (args.fp8_base or fp8_unet):
        return []
    option = "--fp8_base_unet" if fp8_unet and not args.fp8_base else "--fp8_base"
    problems = []
    if args.mixed_precision not in ("fp16", "bf16"):
        problems.append(f"{option} needs --mixed_precision fp16 or bf16 (the dtype the fp8 weights are computed in)")
    if info.saves_full_models:
        problems.append(
            f"{option}: {info.script}.py trains the base model's own weights, which cannot be kept in fp8 "
            "(sd-scripts ignores the option here); drop it, or train a LoRA with train_network.py"
        )
    return problems


def _backend_problem(backend: str) -> str | None:
    """Backends that need a package or a GPU: say so before the model loads."""
    try:
        import torch._dynamo

        available = set(torch._dynamo.list_backends(exclude_tags=()))
    except Exception:  # noqa: BLE001 - an unusual torch build: let torch.compile itself report
        return None
    if backend in available:
        return None
    return (
        f"--dynamo_backend {backend} is not available in this PyTorch (available: {', '.join(sorted(available))}); "
        "use inductor (the default), aot_eager or eager"
    )
