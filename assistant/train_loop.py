"""A short, generic training loop on accelerate: the same code runs on CPU, one GPU or many.

`train(model, loss_fn, train_loader, config)` owns the optimizer (AdamW), a warm-up + cosine
learning-rate schedule, gradient accumulation, mixed precision, periodic checkpoints
(`accelerator.save_state`) and resuming from the latest one. The model and the loss are the
caller's: `loss_fn(model, batch) -> scalar tensor`. Vision training uses it; LLM training can too.

Resuming restores model, optimizer, schedule and RNG states and continues at the saved step with
the same data order (accelerate's seedable sampler, reseeded per epoch). Random augmentation
draws after a resume may differ from an uninterrupted run because the loader prefetches a batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

CONFIG_FILE = "train_config.json"
RESULT_FILE = "train_result.json"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str  # checkpoints, the config JSON and the result JSON go here
    lr: float = 1e-3
    weight_decay: float = 0.05
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 32  # used by `make_loader`
    grad_accum: int = 1
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    # "auto": bf16 on GPUs that support it, else full precision. On this project's 2-core CPU,
    # bf16 autocast measured slower than float32 (casts outweigh the faster matmuls).
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    seed: int = 0
    checkpoint_every: int = 100  # optimizer steps
    keep_checkpoints: int = 2

    def total_steps(self, batches_per_epoch: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * math.ceil(batches_per_epoch / self.grad_accum)


@dataclass
class TrainResult:
    step: int = 0  # optimizer steps done in total (including those before a resume)
    batches: int = 0  # micro-batches consumed in total
    # Mean loss of each optimizer step from `first_loss_step` on; checkpointed, so after a resume
    # they cover every step since the start (an older checkpoint without them: this run only).
    losses: list[float] = dataclasses.field(default_factory=list)
    first_loss_step: int = 1
    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # eval_fn after each epoch
    seconds: float = 0.0  # training wall time, summed over the runs a resume joins
    peak_memory_mb: float = 0.0  # the largest of the runs: process RSS on CPU, allocated memory on GPU
    resumed_from: int | None = None
    processes: int = 1  # data-parallel processes of the last run, each taking its own batches

    # accelerate checkpoints any object with state_dict/load_state_dict registered with it.
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "batches": self.batches, "evals": self.evals, "seconds": self.seconds,
                "peak_memory_mb": self.peak_memory_mb, "losses": self.losses, "first_loss_step": self.first_loss_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.batches, self.evals = state["step"], state["batches"], list(state["evals"])
        self.seconds, self.peak_memory_mb = state["seconds"], state["peak_memory_mb"]
        self.losses = [float(loss) for loss in state.get("losses", [])]
        self.first_loss_step = state.get("first_loss_step", self.step + 1)


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def process_state():
    """accelerate's state of this process, set up first thing in a training run. On a machine
    without a GPU (or other accelerator) it is set up with `cpu=True`: only then does accelerate
    read torchrun's WORLD_SIZE and join the processes over gloo, so `torchrun --nproc_per_node N -m
    assistant train` is one data-parallel run there too, not N independent runs."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available())


def peak_memory_mb() -> float:
    """Peak memory of this process so far: GPU memory allocated by torch, else resident RAM."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def make_loader(dataset, config: TrainConfig, shuffle: bool = True) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=shuffle, drop_last=shuffle)


def cosine_schedule(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
          train_loader: torch.utils.data.DataLoader, config: TrainConfig, resume: bool = False,
          eval_fn: Callable[[torch.nn.Module], dict[str, Any]] | None = None) -> TrainResult:
    """Train `model` in place; returns losses, per-epoch evals and timing (also saved as JSON)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed

    set_seed(config.seed)
    process_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision=resolve_precision(config.mixed_precision),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # Under DDP (several processes) a batch may leave trainable parameters unused, e.g. the
        # projector in a text-only batch; without this DDP stops at the next step. No-op otherwise.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer, loader = _prepare(accelerator, model, optimizer, train_loader)
    total = config.total_steps(len(loader))
    # Stepped by hand only after real optimizer steps, so accumulation and process count never skew it.
    scheduler = cosine_schedule(optimizer, config.warmup_steps, total)
    result = TrainResult(processes=accelerator.num_processes)
    accelerator.register_for_checkpointing(scheduler, result)
    _restore_or_clear(accelerator, out / CHECKPOINTS, resume, result)
    start, before = time.perf_counter(), result.seconds
    _run(accelerator, model, loss_fn, loader, optimizer, scheduler, config, total, result, eval_fn)
    result.seconds = before + time.perf_counter() - start
    result.peak_memory_mb = max(result.peak_memory_mb, peak_memory_mb())
    if result.step != result.resumed_from:  # a finished run that is "resumed" only reloads
        _save(accelerator, out / CHECKPOINTS, result.step, config.keep_checkpoints)
    if accelerator.is_main_process:
        (out / RESULT_FILE).write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    accelerator.wait_for_everyone()
    return result


def _prepare(accelerator, model, optimizer, loader):
    """accelerate wraps, places and checkpoints the model and optimizer, except a model that torch
    FSDP2 already shards (`train_shard`): DDP around it would reduce its gradients a second time, and
    accelerate saves an optimizer's state from the main process alone, which holds only its shard.
    Such a model and its optimizer are checkpointed whole by `train_shard.ShardedCheckpoint`."""
    from .train_shard import ShardedCheckpoint, is_sharded

    if not is_sharded(model):
        return accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(ShardedCheckpoint(model, optimizer))
    return model, optimizer, accelerator.prepare(loader)


def _run(accelerator, model, loss_fn, loader, optimizer, scheduler, config: TrainConfig, total: int,
         result: TrainResult, eval_fn) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=result.step, desc="train", disable=not accelerator.is_main_process)
    step_losses: list[float] = []
    model.train()
    while result.step < total:
        epoch, offset = divmod(result.batches, len(loader))
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, offset) if offset else loader
        for batch in batches:
            with accelerator.accumulate(model):
                if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce only before a step
                    model.set_requires_gradient_sync(accelerator.sync_gradients)
                loss = loss_fn(model, batch)
                accelerator.backward(loss)
                # accelerate's optimizer wrapper skips the steps between accumulated micro-batches;
                # an FSDP2 model's optimizer is not wrapped (see _prepare), so skip them here.
                if accelerator.sync_gradients:
                    if hasattr(model, "drop_unused_gradients"):  # train_shard.ShardedLoss
                        model.drop_unused_gradients()
                    if config.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
            result.batches += 1
            step_losses.append(float(loss.detach()))
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            result.step += 1
            result.losses.append(sum(step_losses) / len(step_losses))
            step_losses.clear()
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if result.step % config.checkpoint_every == 0 and result.step < total:
                _save(accelerator, Path(config.out_dir) / CHECKPOINTS, result.step, config.keep_checkpoints)
            if result.step >= total:
                break
        if eval_fn is not None and result.batches % len(loader) == 0:
            metrics = eval_fn(accelerator.unwrap_model(model))
            result.evals.append({"step": result.step, "epoch": result.batches // len(loader), **metrics})
            bar.write(f"epoch {result.evals[-1]['epoch']}: {metrics}")
            model.train()
    bar.close()


def _restore_or_clear(accelerator, folder: Path, resume: bool, result: TrainResult) -> None:
    saved = sorted(folder.glob("step_*")) if folder.is_dir() else []
    if resume and saved:
        accelerator.load_state(str(saved[-1]))
        result.resumed_from = result.step
        accelerator.print(f"resumed from {saved[-1].name} (step {result.step})")
    elif saved and accelerator.is_main_process:
        shutil.rmtree(folder)  # a fresh run must never mix with an older run's checkpoints
    accelerator.wait_for_everyone()


def _save(accelerator, folder: Path, step: int, keep: int) -> None:
    accelerator.save_state(str(folder / f"step_{step:08d}"))
    if accelerator.is_main_process:
        for old in sorted(folder.glob("step_*"))[:-keep]:
            shutil.rmtree(old)
