"""Fully sharded data parallel training (torch FSDP2) of the whole model, frozen base included.

Data parallel training (DDP) keeps a whole copy of the frozen base on every GPU; with
`--shard fsdp` each process holds 1/N of every weight instead, and a decoder layer's weights are
gathered only while that layer runs. That is what lets LoRA on a base too large for one GPU train.

The sharding is applied here with torch's `fully_shard` (FSDP2), not by accelerate's FSDP plugin:
the plugin wraps only what accelerate prepares, and the trainer hands accelerate only the trainable
parameters (`train.TrainableLoss`), so the plugin would shard the adapter and leave the base whole.

- `ShardedLoss` is the FSDP root: the whole model as a submodule, and the loss computed in its
  forward, so the root's own weights (the embeddings, tied to the output matrix; the projector; the
  final norm) are gathered for the loss too.
- Each decoder layer (the model's `_no_split_modules`) is its own unit. The vision tower is left out
  of the sharding and replicated: it runs only for batches with images, and a sharded module that
  runs on some processes and not others would leave the others waiting forever in its all-gather.
  For the same reason every batch's backward pass runs through all decoder layers
  (`enable_input_require_grads`), also on text-only batches, and trainable parameters a batch leaves
  unused (the projector in a text-only batch) reduce zero gradients; in a step where no process had
  an image the projector then gets no gradient at all, as without sharding (`drop_unused_gradients`).
- `ShardedCheckpoint` saves the trainable parameters and their optimizer state as whole tensors
  (gathered from all processes) in accelerate's checkpoints, so a checkpoint stays megabytes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .train import _llava, summed_target_loss, target_loss

SHARD_MODES = ("none", "fsdp")


class ShardedLoss(nn.Module):
    """The FSDP root: `forward(batch)` is the training loss; `forward(batch, summed=True)` is the
    exact full-vocabulary (loss sum, target count) of `train.summed_target_loss`."""

    def __init__(self, model: nn.Module, vocab: torch.Tensor | None = None, negatives: int = 0):
        super().__init__()
        self.model = model
        self.vocab, self.negatives = vocab, negatives
        self.images_since_step = False  # whether this process ran the projector since the last step

    def forward(self, batch: dict[str, torch.Tensor], summed: bool = False):
        if summed:
            return summed_target_loss(self.model, batch)
        self.images_since_step = self.images_since_step or "pixel_values" in batch
        return target_loss(self.model, batch, self.vocab, self.negatives)

    def drop_unused_gradients(self) -> None:
        """Before an optimizer step: no gradient (None) for the projector when no process had an
        image since the last step. FSDP reduces zeros for it then (see `shard`), and AdamW would step
        it on momentum alone; without sharding (one process, or DDP) its gradient stays None and
        AdamW leaves it be. (The projector is the only trainable part a batch can leave unused: the
        LoRA runs on every token.) Every process must call it."""
        images = torch.tensor([int(self.images_since_step)], device=_device_of(self))
        torch.distributed.all_reduce(images)
        self.images_since_step = False
        if int(images.item()) == 0:
            for param in _llava(self.model).model.multi_modal_projector.parameters():
                param.grad = None


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def vision_tower(model: nn.Module) -> nn.Module | None:
    return getattr(getattr(_llava(model), "model", None), "vision_tower", None)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The language model's blocks that become FSDP units: modules of a class transformers never
    splits across devices (`_no_split_modules`: the decoder layers), outside the vision tower."""
    blocks = set(getattr(_llava(model), "_no_split_modules", None) or ())
    tower = vision_tower(model)
    skip = {id(m) for m in tower.modules()} if tower is not None else set()
    return [m for m in model.modules() if type(m).__name__ in blocks and id(m) not in skip]


def shard(root: ShardedLoss, device: torch.device, processes: int) -> ShardedLoss:
    """Shard `root` in place across `processes` (one FSDP unit per decoder layer, the rest in the
    root unit). Every process must call it at the same point."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    units = shard_units(root.model)
    if not units:
        raise ValueError("--shard fsdp: the model names no decoder-layer class (_no_split_modules) to shard by")
    mesh = init_device_mesh(device.type, (processes,))
    tower = vision_tower(root.model)
    replicated = set(tower.parameters()) if tower is not None else set()
    if tower is not None:
        tower.to(device)  # FSDP moves only what it shards
    _llava(root.model).enable_input_require_grads()
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(root, mesh=mesh, ignored_params=replicated)
    root.set_reduce_scatter_unused_params(True)
    return root


def parameter_mb(module: nn.Module) -> float:
    """Megabytes of weights this process holds: its shard of each sharded parameter, others whole."""
    from torch.distributed.tensor import DTensor

    held = (p.to_local() if isinstance(p, DTensor) else p for p in module.parameters())
    return round(sum(t.numel() * t.element_size() for t in held) / 2**20, 3)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU; a sharded one is gathered (a collective: every process calls)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().cpu()


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: whole tensor} of the trainable parameters, gathered on every process."""
    return {name: full_tensor(p) for name, p in model.named_parameters() if p.requires_grad}


class ShardedCheckpoint:
    """What accelerate checkpoints for a sharded model: its trainable parameters and their AdamW
    state as whole tensors. accelerate calls `state_dict` on every process (the gathering is a
    collective) and writes from the main one; every process loads the file and keeps its shard.

    (torch.distributed.checkpoint's `get_state_dict` would do the gathering, but it first gives every
    parameter an optimizer state, stepping the optimizer with zero gradients: a projector that no
    batch had used yet would then resume with a different AdamW step count than it had.)"""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        saved = self.optimizer.state_dict()
        state = {index: {key: full_tensor(value) if torch.is_tensor(value) else value for key, value in entry.items()}
                 for index, entry in saved["state"].items()}
        return {"model": full_parameters(self.model),
                "optimizer": {"state": state, "param_groups": saved["param_groups"]}}

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                param.copy_(shard_like(saved["model"][name], param))
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state = {index: {key: shard_like(value, params[index]) if _per_element(value, params[index]) else value
                         for key, value in entry.items()}
                 for index, entry in saved["optimizer"]["state"].items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": saved["optimizer"]["param_groups"]})


def _per_element(value: Any, param: torch.Tensor) -> bool:
    return torch.is_tensor(value) and tuple(value.shape) == tuple(param.shape)


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value`, a whole tensor every process holds, laid out as `like` is: this process's shard of
    it when `like` is sharded (no communication), else itself, on `like`'s device and dtype."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(device=like.device, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return value
