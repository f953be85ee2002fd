"""--deepspeed: the DeepSpeedPlugin built from the options, and what the loop needs to run under it.

The trainer's loop stays the same under DeepSpeed; four things differ, each handled here:

* the Accelerator gets a `DeepSpeedPlugin` (`accelerator_options`), and on a machine without a GPU
  the process group uses gloo (DeepSpeed then runs on the CPU);
* gradient accumulation: the trainer accumulates itself (the loss of each micro-batch divided by the
  micro-batches of its step), so DeepSpeed is told "1" and, for each micro-batch, whether it ends the
  step (`micro_batch_sync`); DeepSpeed reduces, clips (`gradient_clipping` = --max_grad_norm) and
  steps the optimizer inside `accelerator.backward` of the last one;
* training states: ZeRO shards the optimizer state over the processes, so a state folder also holds
  DeepSpeed's own checkpoint of the trained weights and every process's shard (`deepspeed/`, written
  by all processes after the main one wrote the rest; frozen weights are left out), and resuming
  reads it back (`ShardedOptimizer`);
* a run started without a launcher gets the environment of a one-process launch;
* ZeRO-3 splits every weight of the prepared model over the processes (each holds a shard, the
  tensor itself is empty): what reads or writes the trained weights whole (saves, states, resume,
  checks) does so inside `whole_weights`, which gathers them on every process (a collective: all
  processes enter it), and `model_construction` keeps the base model whole while it loads unless
  --zero3_init_flag asks transformers to build it already split.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

from library.training.scaling_args import zero_stage

logger = logging.getLogger(__name__)

ENGINE_FOLDER = "deepspeed"  # inside a training-state folder
ENGINE_TAG = "state"


def deepspeed_config(args: argparse.Namespace, world_size: int) -> dict:
    """The DeepSpeed configuration the options describe (what `DeepSpeedPlugin` is built to hold)."""
    return deepspeed_plugin(args, world_size).deepspeed_config


def deepspeed_plugin(args: argparse.Namespace, world_size: int):
    """accelerate's DeepSpeedPlugin for --deepspeed and its options, as sd-scripts builds it, except that
    gradient accumulation stays with the trainer (DeepSpeed's count is 1)."""
    from accelerate import DeepSpeedPlugin

    stage = zero_stage(args)
    plugin = DeepSpeedPlugin(
        zero_stage=stage,
        gradient_accumulation_steps=1,
        gradient_clipping=args.max_grad_norm if args.max_grad_norm else 0.0,
        offload_optimizer_device=args.offload_optimizer_device or "none",
        offload_optimizer_nvme_path=args.offload_optimizer_nvme_path or "none",
        offload_param_device=args.offload_param_device or "none",
        offload_param_nvme_path=args.offload_param_nvme_path or "none",
        zero3_init_flag=bool(args.zero3_init_flag),
        zero3_save_16bit_model=bool(args.zero3_save_16bit_model),
    )
    config = plugin.deepspeed_config
    micro_batch = int(getattr(args, "train_batch_size", None) or 1)
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["train_batch_size"] = micro_batch * world_size
    plugin.set_mixed_precision(args.mixed_precision)
    if args.mixed_precision == "fp16":
        config["fp16"]["initial_scale_power"] = 0  # sd-scripts: a start scale of 2**16 overflows at once
    if (args.full_fp16 or args.fp16_master_weights_and_gradients) and args.mixed_precision == "fp16":
        if args.offload_optimizer_device == "cpu" and stage == 2:
            config["fp16"]["fp16_master_weights_and_grads"] = True
        else:
            logger.info("--full_fp16: DeepSpeed keeps fp16 master weights only with ZeRO-2 and CPU optimizer offload")
    if args.offload_optimizer_device:
        # Any optimizer of --optimizer_type, not only DeepSpeed's CPU Adam (slower, but what was asked for).
        config["zero_force_ds_cpu_optimizer"] = False
    return plugin


def accelerator_options(args: argparse.Namespace, handlers: list) -> tuple[list, dict]:
    """(kwargs handlers, extra Accelerator arguments) for this run: unchanged without --deepspeed."""
    if not getattr(args, "deepspeed", False):
        return handlers, {}
    import torch
    from accelerate.utils import InitProcessGroupKwargs

    give_single_process_launch_environment()
    if not torch.cuda.is_available():
        # accelerate's default backend is NCCL (GPUs only); DeepSpeed runs on the CPU over gloo.
        others = [h for h in handlers if not isinstance(h, InitProcessGroupKwargs)]
        timeouts = [h.timeout for h in handlers if isinstance(h, InitProcessGroupKwargs) and h.timeout is not None]
        handlers = [*others, InitProcessGroupKwargs(backend="gloo", **({"timeout": timeouts[0]} if timeouts else {}))]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return handlers, {"deepspeed_plugin": deepspeed_plugin(args, world_size)}


def give_single_process_launch_environment() -> None:
    """`python train_network.py --deepspeed ...` without a launcher: DeepSpeed still needs a process group."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": os.environ.get("MASTER_PORT", str(port))}
    )  # fmt: skip


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def partitions_weights(accelerator) -> bool:
    """ZeRO-3: each process holds only its shard of every weight of the prepared model."""
    return uses_deepspeed(accelerator) and int(accelerator.state.deepspeed_plugin.zero_stage) == 3


@contextmanager
def whole_weights(accelerator, params, modify: bool = False):
    """Inside, every process sees `params` whole (ZeRO-3 gathers them; otherwise they are whole anyway).
    Under ZeRO-3 this is a collective: every process must enter it, in the same order. With `modify`,
    what process 0 wrote into them is what every process keeps (split again on exit)."""
    if not partitions_weights(accelerator):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0 if modify else None):
        yield


@contextmanager
def model_construction(accelerator, args: argparse.Namespace):
    """Around loading the base model. accelerate tells transformers of a ZeRO-3 run whatever
    --zero3_init_flag says, and transformers then builds its models (the text encoder of a diffusers
    folder) already split (deepspeed.zero.Init). That is what --zero3_init_flag asks for; without it
    the models load whole here, as on every other stage, and DeepSpeed splits them when prepared."""
    if not partitions_weights(accelerator) or getattr(args, "zero3_init_flag", False):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


@contextmanager
def micro_batch_sync(accelerator, model, last_micro: bool):
    """Around one micro-batch's forward and backward: gradients are reduced (and, under DeepSpeed, the
    optimizer steps) only on the step's last micro-batch."""
    if uses_deepspeed(accelerator):
        state = accelerator.gradient_state
        state._set_sync_gradients(last_micro)  # read by accelerator.backward -> DeepSpeed's boundary
        try:
            yield
        finally:
            state._set_sync_gradients(True)
    elif last_micro:
        yield
    else:
        with accelerator.no_sync(model):
            yield


class ShardedOptimizer:
    """The prepared optimizer of a DeepSpeed run, as the trainer's states see it.

    `state_dict()` is a small plain marker (the shards are in the state's deepspeed/ folder, written by
    `save_engine_state`); `load_state_dict()` runs on every process at resume and reads the shards of
    `--resume`. Everything else is the prepared optimizer's own."""

    def __init__(self, optimizer, engine, args: argparse.Namespace) -> None:
        self._optimizer = optimizer
        self._engine = engine
        self._args = args

    def __getattr__(self, name):
        return getattr(self._optimizer, name)

    def step(self, *a, **k):
        return self._optimizer.step(*a, **k)

    def zero_grad(self, *a, **k):
        return self._optimizer.zero_grad(*a, **k)

    def state_dict(self) -> dict:
        return {"deepspeed": {"zero_stage": zero_stage(self._args), "folder": ENGINE_FOLDER}}

    def load_state_dict(self, state_dict: dict) -> None:
        if "deepspeed" not in state_dict:
            raise ValueError("this state was written without --deepspeed; resume it without --deepspeed")
        folder = Path(self._args.resume) / ENGINE_FOLDER
        if not (folder / ENGINE_TAG).is_dir():
            if zero_stage(self._args) == 3:
                # measured: the split weights and DeepSpeed's fp32 copy then differ from the saved run's by ~1e-3
                raise ValueError(
                    f"no {ENGINE_FOLDER}/ in it (a rescued copy?): under --zero_stage 3 that cannot resume exactly; "
                    "resume it with --zero_stage 2"
                )
            logger.warning(
                "%s is missing (the state was rescued or uploaded before DeepSpeed wrote it): the trained weights "
                "are restored, the optimizer state starts afresh", folder,
            )  # fmt: skip
            refresh = getattr(getattr(self._engine, "optimizer", None), "refresh_fp32_params", None)
            if refresh is not None:  # ZeRO keeps its own fp32 copy: take the restored weights into it
                refresh()
            return
        load_path, _ = self._engine.load_checkpoint(
            str(folder), tag=ENGINE_TAG, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )  # fmt: skip
        if load_path is None:
            raise ValueError(f"DeepSpeed could not read {folder}")


def wrap_optimizer(optimizer, model, args: argparse.Namespace, accelerator):
    """The trainer's view of the prepared optimizer: unchanged unless DeepSpeed runs."""
    return ShardedOptimizer(optimizer, model, args) if uses_deepspeed(accelerator) else optimizer


def save_engine_state(accelerator, engine, state_folder: Path) -> None:
    """Every process: write DeepSpeed's checkpoint (trained weights, each process's optimizer shard) into
    `state_folder/deepspeed/`, under a temporary name first. No-op without DeepSpeed."""
    if not uses_deepspeed(accelerator):
        return
    tmp = state_folder / f".{ENGINE_FOLDER}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, exclude_frozen_parameters=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = state_folder / ENGINE_FOLDER
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
