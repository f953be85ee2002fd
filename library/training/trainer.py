"""The one training loop every recipe shares.

The trainer owns accelerate, the data loader, epochs and steps, gradient accumulation and clipping,
mixed precision, the LR schedule, noise and loss, save cadence, resume, interrupts and logging. What
a recipe supplies, and when it is called, is documented in library/recipe.py (the `Recipe`
protocol); the trainer knows no method by name.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from library.errors import UserError, is_user_error
from library.recipe import Attached, Hooks, PartStop, Recipe, TrainingContext
from library.training.checkpoints import (
    Progress,
    ResumeError,
    epoch_name,
    epoch_to_prune,
    final_name,
    load_training_state,
    read_state_info,
    remove_output,
    save_training_state,
    should_save_at_epoch,
    should_save_at_step,
    state_folder_name,
    state_tensor_shapes,
    step_name,
    step_to_prune,
)
from library.training.cpu_convolutions import route_weight_bound_convolutions
from library.training.deepspeed_setup import (
    accelerator_options,
    micro_batch_sync,
    model_construction,
    save_engine_state,
    whole_weights,
    wrap_optimizer,
)
from library.training.diffusion_step import (
    DiffusionStep,
    DiffusionTrainingModel,
    place_module,
    vae_dtype_for,
    weight_dtype_for,
)
from library.training.interrupts import StopRequest
from library.training.modes import eval_mode
from library.training.output_folder import rescue_folders, write_failure_reason
from library.training.run_record import (
    class_name,
    dataset_change,
    dataset_fingerprint,
    jsonable_options,
    option_differences,
    shape_problem,
)
from library.training.schedule import Schedule, batch_seed, micro_batch_group, plan_schedule

logger = logging.getLogger(__name__)


class TrainingDiverged(UserError, RuntimeError):
    """The loss or the trained weights stopped being finite; nothing broken was written."""


class SaveFailed(UserError, RuntimeError):
    """--output_dir refused a save; the message says where the weights were written instead."""


class NotEnoughDiskSpace(UserError, RuntimeError):
    """The output disk cannot hold even one save of this run."""


def make_accelerator(args: argparse.Namespace, find_unused_parameters: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from library.training.tracking import accelerator_logging_kwargs

    handlers = [
        DistributedDataParallelKwargs(
            find_unused_parameters=find_unused_parameters,
            gradient_as_bucket_view=args.ddp_gradient_as_bucket_view,
            static_graph=args.ddp_static_graph,
        )
    ]
    if args.ddp_timeout:
        from datetime import timedelta

        handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout)))
    handlers, deepspeed = accelerator_options(args, handlers)  # --deepspeed: the plugin, gloo without a GPU
    # Accumulation is done here (no_sync + loss / micro-batches) so a short last group of an
    # epoch is averaged correctly; accelerate therefore runs with 1.
    return Accelerator(
        gradient_accumulation_steps=1,
        mixed_precision=args.mixed_precision,
        kwargs_handlers=handlers,
        **deepspeed,
        **accelerator_logging_kwargs(args),
    )


class Trainer:
    """Runs one recipe on one prepared dataset group; `run()` returns the process exit code."""

    def __init__(self, recipe: Recipe, args: argparse.Namespace, group, seed: int, hooks: list[Hooks] | None = None) -> None:
        self.recipe = recipe
        self.args = args
        self.group = group
        self.seed = seed
        self.extra_hooks = list(hooks or [])
        self.hooks = [*recipe.hooks(args), *self.extra_hooks]  # the attached ones join after attach()
        self.output_dir = Path(args.output_dir)
        self.last_saved: Path | None = None
        self.hub = None  # HubUploader on the main process with --huggingface_repo_id
        self.stops_applied: set[str] = set()
        self.everything_stopped = False  # every trained part has stopped: steps still count, nothing changes

    # ------------------------------------------------------------------ setup

    def run(self) -> int:
        args = self.args
        self.find_unused_parameters = self.recipe.find_unused_parameters(args)
        accelerator = make_accelerator(args, find_unused_parameters=self.find_unused_parameters)
        self.accelerator = accelerator
        with self.group.while_checking_images():  # the images' decode check goes on while the model loads
            with model_construction(accelerator, args):  # ZeRO-3: whole unless --zero3_init_flag
                parts = self._load_base_model()
        ctx = TrainingContext(
            args, self.recipe.info, accelerator, parts, self.group, weight_dtype_for(args.mixed_precision), self.seed,
            self.output_dir, session_id=random.randrange(2**32), started_at=time.time(), evaluation=self._evaluation,
        )
        self.ctx = ctx
        self._cache_latents_if_asked(parts)
        parts.unet.requires_grad_(False)
        parts.text_encoder.requires_grad_(False)
        parts.vae.requires_grad_(False)
        from accelerate.utils import set_seed

        # Seeded right before the recipe builds what trains, so its initial weights depend only on
        # the seed (not on what loading drew, which differs between single- and multi-process runs).
        set_seed(self.seed)
        attached = self.recipe.attach(ctx)
        self.attached = attached
        self.hooks = [*self.recipe.hooks(args), *attached.hooks, *self.extra_hooks]
        self._check_stops_can_run(attached)
        if attached.caption is not None:
            ctx.caption = attached.caption
        ctx.predict = attached.predict
        self._place_models(parts, attached)
        self.noise_scheduler = self._training_noise_scheduler(parts)
        from library.training.noise import NoiseSettings

        self.step = DiffusionStep(
            self.noise_scheduler, parts.vae, NoiseSettings.from_args(args), accelerator.device,
            ctx.weight_dtype, self._vae_dtype(),
        )

        schedule = plan_schedule(
            self.group.num_batches_per_epoch,
            accelerator.num_processes,
            args.gradient_accumulation_steps,
            args.max_train_steps,
            args.max_train_epochs,
        )
        ctx.schedule = schedule
        from library.training.lr_schedulers import build_lr_scheduler
        from library.training.optimizers import build_optimizer

        built = build_optimizer(args, attached.param_groups, logger=logger)
        self.built_optimizer = built
        ctx.optimizer_description = built.description
        lr_scheduler = build_lr_scheduler(args, built, schedule.max_train_steps, num_processes=1)

        self.conditioner = self._make_conditioner(parts, attached)
        model = DiffusionTrainingModel(
            parts.unet, self.conditioner, attached.trained, caption=attached.caption, predict=attached.predict,
            train_caption=attached.train_caption,
        )
        self.model, self.optimizer = accelerator.prepare(model, built.optimizer)
        self.optimizer = wrap_optimizer(self.optimizer, self.model, args, accelerator)  # DeepSpeed: sharded states
        self.lr_scheduler = lr_scheduler
        self.trainable = [p for g in attached.param_groups for p in g["params"]]

        self._check_disk_space()
        progress = Progress()
        if args.resume:
            progress = self._resume(args.resume, schedule)
        progress = self._start_at_initial_step(progress, schedule)
        self._apply_due_stops(progress)
        self._start_trackers()
        if accelerator.is_main_process:
            print(f"training: {schedule.describe(accelerator.num_processes, args.gradient_accumulation_steps)}, "
                  f"distributed type {accelerator.distributed_type.value}")
        self._call_hooks("at_start", progress)
        if accelerator.is_main_process:
            from library.training.hub import HubUploader

            self.hub = HubUploader.from_args(args)
        try:
            with StopRequest() as stop:
                progress = self._train(schedule, progress, stop)
        finally:
            accelerator.end_training()
            if self.hub is not None:
                self.hub.close()
        return 0

    def _check_stops_can_run(self, attached: Attached) -> None:
        if attached.stops and self.accelerator.num_processes > 1 and not self.find_unused_parameters:
            # A recipe bug, not a user error: DDP would hang waiting for gradients that never come.
            raise RuntimeError(
                f"{self.recipe.info.script}: the recipe stops training a part ({attached.stops[0].name}) but "
                "find_unused_parameters() returned False; DDP needs True for parts that stop"
            )

    def _load_base_model(self):
        from library.models.attention import set_attention_backend
        from library.models.loading import load_base_model

        args = self.args
        parts = load_base_model(
            args.pretrained_model_name_or_path,
            v2=args.v2,
            v_parameterization=args.v_parameterization,
            vae=args.vae,
            tokenizer_cache_dir=args.tokenizer_cache_dir,
        )
        set_attention_backend(parts.unet, parts.vae, xformers=args.xformers, mem_eff_attn=args.mem_eff_attn)
        return parts

    def _cache_latents_if_asked(self, parts) -> None:
        args, accelerator = self.args, self.accelerator
        if not (args.cache_latents or args.cache_latents_to_disk):
            return
        from library.data.latent_cache import cache_latents

        vae = parts.vae
        place_module(vae, accelerator.device, self._vae_dtype())
        subsets = [s for d in self.group.datasets for s in d.blueprint.subsets]
        items = self.group.cache_items()
        # Disk caches: the main process writes, the others then find valid files and read them.
        for turn in ("main", "others") if args.cache_latents_to_disk and accelerator.num_processes > 1 else ("all",):
            mine = turn == "all" or (turn == "main") == accelerator.is_main_process
            if mine:
                result = cache_latents(
                    items,
                    vae,
                    batch_size=args.vae_batch_size,
                    to_disk=args.cache_latents_to_disk,
                    flip_aug=any(s.flip_aug for s in subsets),
                    alpha_mask=any(s.alpha_mask for s in subsets),
                    generator=torch.Generator().manual_seed(self.seed),
                    skip_cache_check=args.skip_cache_check,
                    show_progress=accelerator.is_main_process,
                )
            if turn != "all":
                accelerator.wait_for_everyone()
        self.group.set_latents(result)
        if accelerator.is_main_process:
            print(f"latents: {result.encoded} image(s) encoded, {result.reused} reused from disk")

    def _vae_dtype(self) -> torch.dtype:
        return vae_dtype_for(self.args.mixed_precision, no_half_vae=getattr(self.args, "no_half_vae", False))

    def _place_models(self, parts, attached: Attached) -> None:
        """Frozen weights live in the compute dtype; trained ones in fp32 unless --full_fp16/bf16."""
        args, device = self.args, self.accelerator.device
        weight_dtype = self.ctx.weight_dtype
        trained_dtype = torch.float32
        if args.full_fp16:
            trained_dtype = torch.float16
        elif args.full_bf16:
            trained_dtype = torch.bfloat16
        place_module(parts.unet, device, trained_dtype if attached.unet_weights_train else weight_dtype)
        place_module(parts.text_encoder, device, trained_dtype if attached.text_encoder_weights_train else weight_dtype)
        if device.type == "cpu":
            route_weight_bound_convolutions(parts.unet)  # the U-Net's large convolutions at few positions
        if self.group.uses_cached_latents:
            parts.vae.to("cpu")  # only needed again for sample images
        else:
            place_module(parts.vae, device, self._vae_dtype())
        if attached.trained is not None:
            attached.trained.to(device, dtype=trained_dtype)
        if args.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if attached.text_encoder_trains:
                parts.text_encoder.gradient_checkpointing_enable()
        # Gradient checkpointing acts in train mode only (SD's U-Net has no dropout); a text encoder
        # that nothing trains stays in eval mode.
        parts.unet.train()
        parts.text_encoder.train(attached.text_encoder_trains)
        parts.vae.eval()
        from library.training.fp8_weights import apply_fp8_base
        from library.training.torch_compile import compile_unet_if_asked

        main = self.accelerator.is_main_process
        apply_fp8_base(args, parts, attached, weight_dtype, log=print if main else lambda *_: None)
        compile_unet_if_asked(args, parts.unet, log=print if main else lambda *_: None)

    @contextmanager
    def _evaluation(self):
        """`ctx.evaluation()`: every model module in eval mode and the optimizer in its evaluation mode."""
        parts = self.ctx.parts
        self._set_optimizer_mode(train=False)  # schedule-free optimizers: evaluate the averaged weights
        try:
            with eval_mode([parts.unet, parts.text_encoder, parts.vae, self.attached.trained]):
                yield
        finally:
            self._set_optimizer_mode(train=True)

    def _training_noise_scheduler(self, parts):
        from library.training.noise import apply_zero_terminal_snr

        scheduler = parts.noise_scheduler
        if getattr(self.args, "zero_terminal_snr", False):
            scheduler = apply_zero_terminal_snr(scheduler)
        return scheduler

    def _make_conditioner(self, parts, attached: Attached):
        from library.models.text_encoding import TextEncoding
        from library.training.text_conditioning import TextConditioner

        settings = TextEncoding.from_args(self.args)
        cache = bool(getattr(self.args, "cache_text_encoder_outputs", False))
        return TextConditioner(
            parts.tokenizer, parts.text_encoder, settings, trains=attached.text_encoder_trains, cache_outputs=cache
        )

    def _start_trackers(self) -> None:
        from library.training.tracking import start_trackers

        start_trackers(self.accelerator, self.args, self.recipe.info.tracker_name)

    # ------------------------------------------------------------------ resume

    def _resume(self, folder: str, schedule: Schedule) -> Progress:
        info = read_state_info(folder)
        self._check_state_fits(folder, info)
        state = load_training_state(folder)
        try:
            with self._whole_trained(modify=True):
                self.recipe.load_trained_state_dict(state.trained)
            self.optimizer.load_state_dict(state.optimizer_state)
            self.lr_scheduler.load_state_dict(state.scheduler_state)
            if state.scaler_state is not None and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(state.scaler_state)
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise ResumeError(self._resume_mismatch(folder, info, f"it does not load ({type(err).__name__}: "
                                                    f"{str(err).splitlines()[0][:200]})")) from None
        progress = state.progress
        changed = dataset_change(info.get("dataset"), dataset_fingerprint(self.group))
        if changed:
            logger.warning(
                "the dataset changed since %s was saved (%s): the run continues from step %d, but it cannot repeat "
                "the batches the interrupted run would have seen; the interrupted epoch restarts from its beginning",
                folder, changed, progress.global_step,
            )  # fmt: skip
            progress = replace(progress, batch_in_epoch=0)
        saved_processes = state.info.get("num_processes", self.accelerator.num_processes)
        if saved_processes != self.accelerator.num_processes and progress.batch_in_epoch:
            # The position inside an epoch is per process; with another process count, restart the epoch.
            logger.warning(
                "resuming with %d process(es) instead of %d: the interrupted epoch restarts from its beginning",
                self.accelerator.num_processes, saved_processes,
            )
            progress = replace(progress, batch_in_epoch=0)
        if self.accelerator.is_main_process:
            print(f"resumed from {folder}: step {progress.global_step}, epoch {progress.epoch + 1}, "
                  f"batch {progress.batch_in_epoch} of the epoch")
        return progress

    def _start_at_initial_step(self, progress: Progress, schedule: Schedule) -> Progress:
        """--initial_step / --initial_epoch: count from there; with --skip_until_initial_step, the data too."""
        args = self.args
        if args.initial_step is None and args.initial_epoch is None:
            return progress
        if args.initial_step is not None:
            step = args.initial_step
        else:
            step = (args.initial_epoch - 1) * schedule.steps_per_epoch
        if step >= schedule.max_train_steps:
            raise UserError(
                f"--initial_step {step}: the run has {schedule.max_train_steps} steps (--max_train_steps / "
                "--max_train_epochs); start below that or train longer"
            )
        epoch, step_in_epoch = divmod(step, schedule.steps_per_epoch)
        batch = step_in_epoch * args.gradient_accumulation_steps if args.skip_until_initial_step else 0
        if self.accelerator.is_main_process:
            skipped = "skipping the batches before it" if batch else "from the start of that epoch's data"
            replaced = f" (instead of the state's step {progress.global_step})" if args.resume else ""
            print(f"counting from step {step}{replaced}, epoch {epoch + 1}, {skipped}")
        return Progress(step, epoch, batch)

    def _check_state_fits(self, folder: str, info: dict) -> None:
        """Compare what the state was trained with against this run before any of its tensors is read."""
        saved_optimizer = info.get("optimizer_class")
        optimizer = class_name(self.built_optimizer.optimizer)
        if saved_optimizer and saved_optimizer != optimizer:
            raise ResumeError(self._resume_mismatch(
                folder, info, f"it was written by the optimizer {saved_optimizer}, this run uses {optimizer}"
            ))  # fmt: skip
        with self._whole_trained():
            current = {key: tuple(value.shape) for key, value in self.recipe.trained_state_dict().items()}
        problem = shape_problem(state_tensor_shapes(folder), current)
        if problem:
            raise ResumeError(self._resume_mismatch(folder, info, f"its weights do not fit this run: {problem}"))

    def _resume_mismatch(self, folder: str, info: dict, what: str) -> str:
        changed = option_differences(info.get("options") or {}, self.args)
        if changed:
            fix = f"resume with the options the state was written with: {', '.join(changed)}"
        else:
            fix = "resume with the options the state was written with (its train_state.json lists them)"
        return f"--resume {folder}: {what}. {fix[0].upper()}{fix[1:]}, or start a new run without --resume"

    def _save_bytes(self) -> int:
        """A lower bound of one save: the trained tensors once (twice with a state). Measured once, by every
        process together (ZeRO-3 gathers the tensors), at the disk check; later calls use that number."""
        if getattr(self, "save_bytes", None) is None:
            with self._whole_trained():
                trained = self.recipe.trained_state_dict()
                self.save_bytes = sum(t.numel() * t.element_size() for t in trained.values())
        return self.save_bytes * (2 if self.args.save_state else 1)

    def _whole_trained(self, modify: bool = False):
        """Around every read (or, with `modify`, write) of the trained tensors as a whole: under ZeRO-3 they are
        split over the processes and gathered here, by every process together; otherwise nothing happens."""
        trained = self.attached.trained
        params = [*self.trainable, *(trained.parameters() if trained is not None else ())]
        return whole_weights(self.accelerator, params, modify=modify)

    def _check_disk_space(self) -> None:
        """Refuse a run whose output disk cannot take even one save (found now, not after hours of training)."""
        problem = None
        needed = self._save_bytes()  # every process: it may gather the weights
        if self.accelerator.is_main_process:
            free = shutil.disk_usage(self.output_dir).free
            if free < needed:
                problem = (
                    f"--output_dir {self.output_dir}: {free / 2**20:.0f} MiB free on its disk, but one save of this "
                    f"run needs at least {needed / 2**20:.0f} MiB; free some space or choose a folder on another disk"
                )
        problem = self._main_process_says(problem)
        if problem:
            raise NotEnoughDiskSpace(problem)

    # ------------------------------------------------------------------ the loop

    def _train(self, schedule: Schedule, progress: Progress, stop: StopRequest) -> Progress:
        from tqdm.auto import tqdm

        from library.data.datasets import RunBatches, make_run_dataloader

        args, accelerator = self.args, self.accelerator
        if progress.global_step >= schedule.max_train_steps:
            print(f"nothing to do: step {progress.global_step} already reaches --max_train_steps {schedule.max_train_steps}")
            return progress
        dataset = RunBatches(
            self.group,
            schedule.num_epochs,
            start_epoch=progress.epoch,
            start_batch=progress.batch_in_epoch,
            first_step=progress.global_step,
            batches_per_step=args.gradient_accumulation_steps,
            rank=accelerator.process_index,
            num_processes=accelerator.num_processes,
        )
        loader = make_run_dataloader(dataset, args.max_data_loader_n_workers, args.persistent_data_loader_workers)
        bar = tqdm(
            total=schedule.max_train_steps, initial=progress.global_step, desc="steps",
            disable=not accelerator.is_local_main_process, smoothing=0,
        )
        epoch_losses: list[float] = []
        step_loss = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        self._set_optimizer_mode(train=True)
        epoch_started = None
        for batch in loader:
            epoch = batch["epoch"]
            if epoch != epoch_started:
                epoch_started = epoch
                self._call_hooks("at_epoch_start", replace(progress, epoch=epoch))
            group_size, last_micro = micro_batch_group(
                batch["local_index"], schedule.batches_per_epoch, args.gradient_accumulation_steps
            )
            sync = micro_batch_sync(accelerator, self.model, last_micro)
            with sync:
                self._call_hooks("before_batch", progress)
                loss = self._batch_loss(batch, epoch)
                if not self.everything_stopped:
                    accelerator.backward(loss / group_size)
            step_loss += loss.detach().float().item() / group_size
            if not last_micro:
                continue
            step_loss = self._mean_over_processes(step_loss)
            self._check_finite_loss(step_loss, progress, epoch)
            self._optimizer_step(progress)
            progress = Progress(progress.global_step + 1, epoch, batch["local_index"] + 1)
            self._apply_due_stops(progress)
            self._call_hooks("after_optimizer_step", progress)
            epoch_losses.append(step_loss)
            self._log_step(step_loss, epoch_losses, progress)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(epoch_losses) / len(epoch_losses):.4f}", lr=f"{self._lrs()[0]:.2e}")
            step_loss = 0.0
            if progress.batch_in_epoch >= schedule.batches_per_epoch:
                # End the epoch first, so a state saved at this step resumes at the next epoch's start.
                progress = self._end_epoch(progress, schedule, epoch_losses)
                epoch_losses = []
            self._after_step(progress, schedule)
            if progress.global_step >= schedule.max_train_steps:
                break
            if self._stop_requested(stop):
                self._save_interrupted(progress, stop.signal_name or "stop")
                bar.close()
                return progress
        bar.close()
        self._save_final(progress)
        return progress

    def _batch_loss(self, batch: dict, epoch: int) -> torch.Tensor:
        seed = batch_seed(self.seed, epoch, batch["batch_index"])
        with self._activation_offload():
            return self.step.loss(self.model, batch, seed, self.accelerator.autocast)

    def _activation_offload(self):
        """--cpu_offload_checkpointing: what the backward pass keeps (the checkpointed blocks' inputs) waits in
        CPU memory, copied back to the accelerator when needed (on a CPU-only run it stays where it is)."""
        if not self.args.cpu_offload_checkpointing:
            return nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=self.accelerator.device.type == "cuda")

    def _optimizer_step(self, progress: Progress) -> None:
        args, accelerator = self.args, self.accelerator
        if args.max_grad_norm and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(self.trainable, args.max_grad_norm)
        self._call_hooks("before_optimizer_step", progress)
        self.optimizer.step()
        if not getattr(self.optimizer, "step_was_skipped", False):
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _apply_due_stops(self, progress: Progress) -> None:
        """Stop training the parts whose last step is done: no gradients, eval mode (see PartStop)."""
        for stop in self.attached.stops:
            if stop.name in self.stops_applied or progress.global_step < stop.after_step:
                continue
            self._stop_part(stop)
            self.stops_applied.add(stop.name)
            self.everything_stopped = not any(p.requires_grad for p in self.trainable)
            if self.accelerator.is_main_process:
                print(f"{stop.name}: training stopped after step {stop.after_step}")

    def _stop_part(self, stop: PartStop) -> None:
        stop.module.requires_grad_(False)
        stop.module.eval()
        if stop.text_encoder:
            self.conditioner.trains = False

    def _call_hooks(self, when: str, progress: Progress) -> None:
        for hooks in self.hooks:
            function = getattr(hooks, when)
            if function is not None:
                function(self.ctx, progress)

    def _mean_over_processes(self, value: float) -> float:
        """The step's loss averaged over processes (every process then sees the same number)."""
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device, dtype=torch.float64)
        return float(self.accelerator.reduce(tensor, "mean")[0])

    def _check_finite_loss(self, loss: float, progress: Progress, epoch: int) -> None:
        value = torch.tensor([loss])
        if torch.isfinite(value).all():
            return
        kept = f"the last good file is {self.last_saved}" if self.last_saved else "nothing was saved in this run"
        raise TrainingDiverged(
            f"loss became {float(value[0])} at step {progress.global_step + 1} (epoch {epoch + 1}); training stopped "
            f"without writing this step. {kept}. Try a lower --learning_rate, --mixed_precision bf16 instead of fp16, "
            "or check the images and captions of this batch"
        )

    def _set_optimizer_mode(self, train: bool) -> None:
        if self.built_optimizer.is_schedule_free:
            optimizer = self.built_optimizer.optimizer
            optimizer.train() if train else optimizer.eval()

    def _lrs(self) -> list[float]:
        from library.training.optimizers import current_lrs

        return current_lrs(self.built_optimizer.optimizer, self.built_optimizer)

    def _log_step(self, loss: float, epoch_losses: list[float], progress: Progress) -> None:
        if not self.accelerator.trackers:
            return
        logs = {"loss/current": loss, "loss/average": sum(epoch_losses) / len(epoch_losses)}
        names = [g.get("name") or f"group{i}" for i, g in enumerate(self.built_optimizer.optimizer.param_groups)]
        for name, lr in zip(names, self._lrs()):
            logs[f"lr/{name}"] = lr
        self.accelerator.log(logs, step=progress.global_step)

    def _stop_requested(self, stop: StopRequest) -> bool:
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, "sum")
        return bool(flag.item() > 0)

    # ------------------------------------------------------------------ epochs, saving

    def _after_step(self, progress: Progress, schedule: Schedule) -> None:
        args = self.args
        if should_save_at_step(progress.global_step, args.save_every_n_steps, schedule.max_train_steps):
            name = step_name(args.output_name, progress.global_step)
            self._save(name, progress, state=args.save_state)
            old = step_to_prune(progress.global_step, args.save_every_n_steps, args.save_last_n_steps)
            if old is not None:
                self._prune_model(step_name(args.output_name, old))
            old_state = step_to_prune(
                progress.global_step, args.save_every_n_steps, args.save_last_n_steps_state or args.save_last_n_steps
            )
            if old_state is not None:
                self._prune_state(step_name(args.output_name, old_state))
        self._call_hooks("after_step", progress)

    def _end_epoch(self, progress: Progress, schedule: Schedule, losses: list[float]) -> Progress:
        args = self.args
        progress = Progress(progress.global_step, progress.epoch + 1, 0)
        if losses and self.accelerator.trackers:
            self.accelerator.log({"loss/epoch_average": sum(losses) / len(losses)}, step=progress.global_step)
        every = self._save_every_n_epochs(schedule)
        if should_save_at_epoch(progress.epoch, every, schedule.num_epochs):
            self._save(epoch_name(args.output_name, progress.epoch), progress, state=args.save_state)
            old = epoch_to_prune(progress.epoch, every, args.save_last_n_epochs)
            if old is not None:
                self._prune_model(epoch_name(args.output_name, old))
            old_state = epoch_to_prune(progress.epoch, every, args.save_last_n_epochs_state or args.save_last_n_epochs)
            if old_state is not None:
                self._prune_state(epoch_name(args.output_name, old_state))
        self._call_hooks("after_epoch", progress)
        return progress

    def _save_every_n_epochs(self, schedule: Schedule) -> int | None:
        if self.args.save_n_epoch_ratio:
            return max(1, schedule.num_epochs // self.args.save_n_epoch_ratio)
        return self.args.save_every_n_epochs

    def _check_processes_in_sync(self) -> None:
        """Every process must hold the same trained weights; a launch without gradient sync would not."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return
        with self._whole_trained():
            sums = torch.stack([p.detach().double().sum() for p in self.trainable]).to(accelerator.device)
        gathered = accelerator.gather(sums.unsqueeze(0))
        spread = float((gathered - gathered[0]).abs().max())
        if spread > 1e-6 * max(1.0, float(gathered.abs().max())):
            raise RuntimeError(f"the {accelerator.num_processes} processes hold different weights (spread {spread})")
        if accelerator.is_main_process:
            print(f"trained weights identical on all {accelerator.num_processes} processes")

    def _save_final(self, progress: Progress) -> None:
        self._check_processes_in_sync()
        args = self.args
        name = final_name(args.output_name)
        self._save(name, progress, state=args.save_state or args.save_state_on_train_end)
        if self.accelerator.is_main_process:
            print(f"finished at step {progress.global_step}: model saved to {self.recipe.output_path(self.output_dir, name)}")

    def _save_interrupted(self, progress: Progress, reason: str) -> None:
        name = step_name(self.args.output_name, progress.global_step)
        self._save(name, progress, state=True)
        if self.accelerator.is_main_process:
            state = self.output_dir / state_folder_name(name)
            print(f"stopped by {reason} at step {progress.global_step}; resume with: --resume {state}")

    def _save(self, name: str, progress: Progress, state: bool) -> None:
        """Write the model file (and a state folder) on the main process; the others wait.

        If --output_dir refuses the files (full disk, permissions, a removed drive), the model and a
        resumable state go to a rescue folder instead and the run stops, saying where they are.
        """
        accelerator = self.accelerator
        with self._whole_trained():  # ZeRO-3: every process gathers, the main one writes
            self._check_finite_weights(progress)
            accelerator.wait_for_everyone()
            failure = None
            if accelerator.is_main_process:
                try:
                    self._write_save(self.output_dir, name, progress, state, upload=True)
                except Exception as err:  # noqa: BLE001 - every failed save is rescued; bugs keep their traceback in the log
                    failure = self._rescue(name, progress, err)
        failure = self._main_process_says(failure)
        if failure:
            raise SaveFailed(failure)
        if state:  # DeepSpeed: every process adds its optimizer shard to the state folder
            save_engine_state(accelerator, self.model, self.output_dir / state_folder_name(name))

    def _write_save(self, folder: Path, name: str, progress: Progress, state: bool, upload: bool) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = self.recipe.save(folder, name, self.ctx, progress)
        self.last_saved = path
        logger.info("saved %s", path)
        if upload and self.hub is not None:
            self.hub.upload(path, "model")
        if state:
            self._save_state(folder / state_folder_name(name), progress)
            if upload and self.hub is not None and self.args.save_state_to_huggingface:
                self.hub.upload(folder / state_folder_name(name), "state")
        return path

    def _rescue(self, name: str, progress: Progress, err: Exception) -> str:
        """Save to the first rescue folder that takes the files; the message for the user either way."""
        if not is_user_error(err) and not isinstance(err, OSError):
            logger.error("saving to %s failed", self.output_dir, exc_info=err)
        reason = write_failure_reason(err, self.output_dir, self._save_bytes())
        where = f"could not save step {progress.global_step} to --output_dir {self.output_dir} ({reason})"
        for folder in rescue_folders(self.output_dir):
            try:
                path = self._write_save(folder, name, progress, state=True, upload=False)
            except Exception as rescue_err:  # noqa: BLE001 - try the next place
                logger.warning("rescue folder %s failed too: %s", folder, rescue_err)
                continue
            state = folder / state_folder_name(name)
            return (
                f"{where}. The weights were saved to {path} instead (nothing is lost); to go on training, fix the "
                f"folder and run again with --resume {state}"
            )
        kept = f"the last good file is {self.last_saved}" if self.last_saved else "nothing was saved in this run"
        return f"{where}, and no rescue folder took the files either ({', '.join(map(str, rescue_folders(self.output_dir)))}); {kept}"

    def _main_process_says(self, message: str | None) -> str | None:
        """The main process's `message`, on every process (so all stop together)."""
        if self.accelerator.num_processes == 1:
            return message
        from accelerate.utils import broadcast_object_list

        box = [message]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _save_state(self, folder: Path, progress: Progress) -> None:
        scaler = self.accelerator.scaler
        save_training_state(
            folder,
            progress,
            self.recipe.trained_state_dict(),
            self.optimizer.state_dict(),
            self.lr_scheduler.state_dict(),
            scaler.state_dict() if scaler is not None else None,
            extra={
                "seed": self.seed,
                "num_processes": self.accelerator.num_processes,
                "optimizer_class": class_name(self.built_optimizer.optimizer),
                "dataset": dataset_fingerprint(self.group),
                "options": jsonable_options(self.args),
            },
        )
        logger.info("saved training state %s", folder)

    def _check_finite_weights(self, progress: Progress) -> None:
        bad = [p for p in self.trainable if not torch.isfinite(p).all()]
        if bad:
            kept = f"the last good file is {self.last_saved}" if self.last_saved else "nothing was saved in this run"
            raise TrainingDiverged(
                f"the trained weights contain NaN/inf at step {progress.global_step}; not saving them. {kept}. "
                "Try a lower --learning_rate or --max_grad_norm 1.0"
            )

    def _prune_model(self, name: str) -> None:
        if self.accelerator.is_main_process:
            remove_output(self.recipe.output_path(self.output_dir, name))

    def _prune_state(self, name: str) -> None:
        if self.accelerator.is_main_process:
            remove_output(self.output_dir / state_folder_name(name))


def resolve_seed(args: argparse.Namespace) -> int:
    """--seed, else the seed a resumed state was trained with, else a random one (printed)."""
    import json

    if args.resume:
        state_file = Path(args.resume) / "train_state.json"
        if state_file.is_file():
            saved = json.loads(state_file.read_text(encoding="utf-8")).get("seed")
            if saved is not None:
                if args.seed is not None and args.seed != saved:
                    logger.warning("--seed %d differs from the resumed run's seed %d; using %d", args.seed, saved, saved)
                return int(saved)
    if args.seed is not None:
        return int(args.seed)
    seed = random.randrange(2**31)
    logger.info("no --seed given; using %d", seed)
    return seed


