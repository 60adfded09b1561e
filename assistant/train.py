"""Train the assistant's LLM side in two stages on `train_loop.train` (accelerate: CPU, one GPU, many).

- align: only the projector trains (vision tower and LLM frozen), on label-matched image-report
  pairs, so image tokens land in the LLM's embedding space.
- lora:  peft LoRA on the LLM's attention and MLP projections, projector trainable, on one task.

The loss covers target tokens only and is computed from the final hidden states at those positions,
so the 262k x 640 output matrix (tied to the input embeddings, frozen, two thirds of the model's
weights) is multiplied only where it matters. With `loss_vocab="domain"` the softmax runs over the
tokens that occur in the training targets plus uniformly sampled other tokens whose logits carry the
sampled-softmax correction log(N_other / K), an estimate of the full-vocabulary normaliser: measured
2.5x faster per example than full-vocab logits on the 2-core CPU. LoRA never touches the output
matrix, so the saved adapter runs on the ordinary full-vocabulary inference path, and the held-out
loss reported before and after training is always the exact full-vocabulary loss.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .config import AssistantConfig
from .model import ClinicalVLM
from .train_data import IGNORE, TokenizedExamples, collate, target_vocabulary

STAGES = ("align", "lora")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LLMTrainSettings:
    stage: Literal["align", "lora"] = "lora"
    task: Literal["report", "summary", "educate"] = "report"
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 4
    grad_accum: int = 2
    lr: float | None = None  # None: 1e-3 for align (projector only), 2e-4 for lora
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_target_tokens: int = 192  # IU targets: median 60, p99 164 tokens
    image_fraction: float = 0.25  # lora/report: share of reports given a label-matched NIH image
    data: str | None = None  # a truly paired image-report folder (train_data_paired.py); None: shared data
    loss_vocab: Literal["full", "domain"] = "domain"
    sampled_negatives: int = 4096  # domain loss: other tokens sampled per step
    # Frozen weights' dtype; the trainable tensors stay float32 either way (peft's adapter autocast,
    # the projector's island). auto: see `resolve_train_dtype`.
    train_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    val_examples: int = 32  # held-out examples for the exact loss before/after training
    limit: int | None = None  # train on the first N examples only (smoke tests)
    balance_levels: bool = False  # educate: equal shares of the reading levels (train_data_text._balanced)
    # fsdp: shard the whole model, frozen base included, across the processes (train_shard.py), for
    # a base that does not fit once per GPU; none: data parallel, a whole base per process.
    shard: Literal["none", "fsdp"] = "none"
    seed: int = 0
    checkpoint_every: int = 20  # optimizer steps

    def shards(self, processes: int) -> bool:
        """Whether this run shards the model: FSDP asked for, and more than one process to shard over."""
        return self.shard == "fsdp" and processes > 1

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.stage == "align" else 2e-4)


def prepare_model(config: AssistantConfig, settings: LLMTrainSettings, vlm: ClinicalVLM | None = None) -> ClinicalVLM:
    """The model with only the stage's parameters trainable. `config.adapter` (e.g. the align
    stage's output) supplies the starting projector; LoRA always starts fresh."""
    if settings.stage not in STAGES:
        raise ValueError(f"unknown stage {settings.stage!r}: choose one of {', '.join(STAGES)}")
    start = config.adapter
    if vlm is None:
        config = config.override({"adapter": None, "llm.dtype": resolve_train_dtype(settings.train_dtype)})
        vlm = ClinicalVLM.from_config(config)
    if start:
        from pathlib import Path

        if (Path(start) / "adapter_config.json").is_file():
            raise ValueError(f"{start} already holds a LoRA: start from an align-stage folder, or use --resume")
        vlm.load_adapter(start)
    vlm.hf.requires_grad_(False)
    if settings.stage == "lora":
        vlm.attach_lora()  # peft freezes everything but the fresh LoRA weights
    projector = vlm._base_model().model.multi_modal_projector
    float32_island(projector)
    projector.requires_grad_(True)
    return vlm


def resolve_train_dtype(name: str) -> str:
    """`auto`: bfloat16 where the hardware multiplies bf16 natively (a CUDA GPU with bf16, a CPU with
    AVX512-BF16 or AMX), float32 elsewhere. Measured on the 2-core CPUs we have: bf16 weights were
    1.4x faster than float32 per example with avx512_bf16, but on an AVX2-only EPYC, where torch
    emulates bf16 products, one LoRA step took over 4 minutes in bf16 against 31 s in float32."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if _cpu_multiplies_bf16() else "float32"


def _cpu_multiplies_bf16() -> bool:
    # torch.cpu's ISA probes are private; a torch without them counts as "no" (float32 is always correct).
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def float32_island(module: nn.Module) -> None:
    """Keep a bf16 model's small trainable module in float32 (AdamW updates of 1e-4 relative size
    vanish in bf16): inputs are cast to the module's dtype on entry and the output back to the
    model's. Casting the module back to bf16 for saving turns both casts into no-ops."""
    outer = next(module.parameters()).dtype
    if outer == torch.float32:
        return
    module.float()
    module.register_forward_pre_hook(lambda mod, args: tuple(a.to(next(mod.parameters()).dtype) for a in args))
    module.register_forward_hook(lambda mod, args, output: output.to(outer))


class TrainableLoss(nn.Module):
    """What accelerate prepares, optimises and checkpoints: only the trainable parameters (a
    checkpoint is megabytes, not the 0.5 GB frozen model) and the target-token loss."""

    def __init__(self, model: nn.Module, vocab: torch.Tensor | None = None, negatives: int = 0):
        super().__init__()
        object.__setattr__(self, "model", model)  # deliberately not a submodule (see above)
        self.trainable = nn.ParameterDict({name.replace(".", "__"): p for name, p in model.named_parameters()
                                           if p.requires_grad})
        self.vocab, self.negatives = vocab, negatives

    def train(self, mode: bool = True) -> "TrainableLoss":
        self.model.train(mode)
        return super().train(mode)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return target_loss(self.model, batch, self.vocab, self.negatives)


def _llava(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def target_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (T, D), next-token ids (T,)) at the positions that predict a target token."""
    llava = _llava(model)
    device = llava.lm_head.weight.device
    out = llava.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      pixel_values=batch["pixel_values"].to(device) if "pixel_values" in batch else None,
                      use_cache=False)
    labels = batch["labels"][:, 1:].to(device)
    keep = labels != IGNORE
    return out.last_hidden_state[:, :-1][keep], labels[keep]  # (T, D), (T,)


def target_loss(model: nn.Module, batch: dict[str, torch.Tensor], vocab: torch.Tensor | None = None,
                negatives: int = 0) -> torch.Tensor:
    """Mean cross-entropy over target tokens: full vocabulary, or domain + sampled negatives."""
    hidden, targets = target_hidden(model, batch)
    weight = _llava(model).lm_head.weight  # (V, D), frozen
    if vocab is None:
        return nn.functional.cross_entropy((hidden @ weight.T).float(), targets)
    ids, bias, index = sampled_candidates(vocab.to(weight.device), weight.shape[0], negatives)
    logits = (hidden @ weight[ids].T).float() + bias  # (T, |ids|)
    return nn.functional.cross_entropy(logits, index[targets])


def summed_target_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed exact full-vocabulary cross-entropy, number of target tokens) of one batch."""
    hidden, targets = target_hidden(model, batch)
    logits = (hidden @ _llava(model).lm_head.weight.T).float()
    return nn.functional.cross_entropy(logits, targets, reduction="sum"), len(targets)


def sampled_candidates(vocab: torch.Tensor, size: int, negatives: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, logit bias, id -> column) for the domain ids plus `negatives` uniform draws (with
    replacement) from the rest; each draw stands for (size - |domain|) / negatives tokens."""
    device = vocab.device
    column = torch.full((size,), -1, dtype=torch.long, device=device)
    column[vocab] = torch.arange(len(vocab), device=device)
    others = size - len(vocab)
    if negatives <= 0 or others <= 0:
        return vocab, torch.zeros(len(vocab), device=device), column
    draws = torch.randint(0, size, (negatives,), device=device)  # torch RNG: checkpoints restore it
    draws = draws[column[draws] < 0]  # rejection keeps draws uniform over the non-domain tokens
    bias = torch.cat([torch.zeros(len(vocab), device=device),
                      torch.full((len(draws),), math.log(others / max(1, len(draws))), device=device)])
    return torch.cat([vocab, draws]), bias, column


@torch.no_grad()
def held_out_loss(vlm: ClinicalVLM, dataset: TokenizedExamples, batch_size: int = 1,
                  summed: Callable[[dict], tuple[torch.Tensor, int]] | None = None) -> float | None:
    """Exact full-vocabulary loss per target token over a held-out dataset (eval mode). One example
    at a time: 262k-wide float32 logits of a batch of 4 reports took ~3 GB, more than training.
    `summed(batch)` replaces `summed_target_loss` on the model (a sharded model computes it through
    its FSDP root, every process over the same examples)."""
    if len(dataset) == 0:
        return None
    vlm.hf.eval()
    summed = summed or (lambda batch: summed_target_loss(vlm.hf, batch))
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        loss, targets = summed(collate(items, vlm.tokenizer.pad_token_id))
        total, count = total + float(loss), count + targets
    return total / count


def make_datasets(vlm: ClinicalVLM, settings: LLMTrainSettings, train_examples, val_examples):
    def wrap(examples):
        return TokenizedExamples(examples, vlm.build_inputs, vlm.tokenizer, settings.max_target_tokens)

    return wrap(train_examples), wrap(val_examples)


def loss_module(vlm: ClinicalVLM, settings: LLMTrainSettings, train: TokenizedExamples, state=None) -> nn.Module:
    """What the training loop trains: `TrainableLoss` (data parallel; the model is moved to the
    process's device), or under `--shard fsdp` with several processes the FSDP root
    `train_shard.ShardedLoss` over the whole model, sharded across them."""
    vocab = target_vocabulary(train) if settings.loss_vocab == "domain" else None
    if state is not None and settings.shards(state.num_processes):
        from .train_shard import ShardedLoss, shard

        _ = vlm.num_image_tokens  # measured once by running the tower and projector: before they are sharded
        return shard(ShardedLoss(vlm.hf, vocab, settings.sampled_negatives), state.device, state.num_processes)
    if state is not None:
        vlm.hf.to(state.device)  # accelerate moves only what it prepares (the trainable part)
    return TrainableLoss(vlm.hf, vocab, settings.sampled_negatives)


def refuse_accelerate_sharding() -> None:
    """`accelerate launch` with an FSDP or DeepSpeed config would wrap only what the trainer prepares,
    the trainable adapter, and leave the frozen base whole on every GPU: say so instead of running."""
    from accelerate.utils import parse_flag_from_env

    for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if parse_flag_from_env(flag):
            raise ValueError(f"accelerate's {name} config would shard only the trainable adapter, not the frozen "
                             "base: launch with configs/accelerate/multi-gpu.yaml and pass --shard fsdp")


def settings_from_dict(data: dict) -> LLMTrainSettings:
    known = {f.name for f in dataclasses.fields(LLMTrainSettings)}
    unknown = set(data) - known
    if unknown:
        raise KeyError(f"unknown training settings: {sorted(unknown)}")
    from .train_shard import SHARD_MODES

    if data.get("shard", "none") not in SHARD_MODES:
        raise ValueError(f"unknown train.shard {data['shard']!r}: choose one of {', '.join(SHARD_MODES)}")
    return LLMTrainSettings(**data)


def run_training(config: AssistantConfig, settings: LLMTrainSettings, out: str, work_dir: str,
                 resume: bool = False, vlm: ClinicalVLM | None = None, root=None) -> dict:
    """Train one stage, save the adapter folder (weights in the base model's dtype, configs,
    metadata.json, README.md) and return the metadata."""
    from .adapter_card import build_metadata, write_card
    from .train_data import build_examples, validation_examples
    from .train_loop import TrainConfig, process_state, train
    from .train_shard import parameter_mb
    from .vision import resolve_weights

    state = process_state()
    refuse_accelerate_sharding()
    if settings.shard == "fsdp" and not settings.shards(state.num_processes):
        logger.warning("--shard fsdp with one process: nothing to shard over, training unsharded")
    # The metadata records the dtype that actually trained, not "auto".
    settings = dataclasses.replace(settings, train_dtype=resolve_train_dtype(settings.train_dtype))
    examples = build_examples(settings.task, settings.stage, settings.image_fraction, settings.seed, root,
                              paired=settings.data, balance_levels=settings.balance_levels)
    examples = examples[:settings.limit] if settings.limit else examples
    val = validation_examples(settings.task, settings.stage, settings.val_examples, settings.seed, root,
                              paired=settings.data)
    save_dtype = _llava(vlm.hf).dtype if vlm is not None else getattr(torch, config.llm.dtype)
    # Fresh weights (the LoRA, a projector not loaded from an align stage) start from the seed: the
    # run is repeatable, and every process starts from the same weights (DDP would broadcast the
    # main process's, FSDP2 shards whatever each process holds).
    torch.manual_seed(settings.seed)
    vlm = prepare_model(config, settings, vlm)
    train_set, val_set = make_datasets(vlm, settings, examples, val)
    loss = loss_module(vlm, settings, train_set, state)
    sharded = settings.shards(state.num_processes)
    weights_mb = parameter_mb(vlm.hf)  # per process: a shard of the model under --shard fsdp
    before = _held_out(vlm, val_set, loss if sharded else None)
    loop = TrainConfig(out_dir=work_dir, lr=settings.learning_rate(), weight_decay=settings.weight_decay,
                       epochs=settings.epochs, max_steps=settings.max_steps, batch_size=settings.batch_size,
                       grad_accum=settings.grad_accum, warmup_steps=settings.warmup_steps,
                       mixed_precision="no", seed=settings.seed, checkpoint_every=settings.checkpoint_every)
    loader = torch.utils.data.DataLoader(train_set, batch_size=settings.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=lambda items: collate(items, vlm.tokenizer.pad_token_id))
    result = train(loss, lambda model, batch: model(batch), loader, loop, resume=resume)
    after = _held_out(vlm, val_set, loss if sharded else None)
    weights = _weights_to_save(vlm, save_dtype, sharded)
    metadata = build_metadata(config, settings, examples, val, result, {"before": before, "after": after}, out)
    metadata["training"]["weights_mb_per_process"] = weights_mb
    vlm.config = config.override({"adapter": None, "llm.dtype": str(save_dtype).removeprefix("torch.")})
    # The tower is frozen in both stages: when it came from a weights folder (the shipped
    # vision-nih14) the adapter points there instead of carrying a copy, so the finding head stays
    # paired with the very tower it was trained on.
    if state.is_main_process:  # one writer: under DDP every process holds the same trained weights
        vlm.save_adapter(out, metadata, vision=resolve_weights(config.vision) is None, weights=weights)
        write_card(out, metadata)
    state.wait_for_everyone()
    return metadata


def _held_out(vlm: ClinicalVLM, val_set: TokenizedExamples, sharded_root: nn.Module | None = None) -> float | None:
    """`held_out_loss`, through the FSDP root when the model is sharded (every process takes part)."""
    if sharded_root is None:
        return held_out_loss(vlm, val_set)
    value = held_out_loss(vlm, val_set, summed=lambda batch: sharded_root(batch, summed=True))
    sharded_root.reshard()  # an eval leaves the root's weights gathered; the optimizer must get the shards
    return value


def _weights_to_save(vlm: ClinicalVLM, dtype: torch.dtype, sharded: bool) -> dict[str, torch.Tensor] | None:
    """The trained tensors in `dtype` gathered from the shards (every process takes part), or None
    after casting the model itself (small bf16 files; LoRA and projector trained in float32)."""
    if sharded:
        from .train_shard import full_parameters

        return {name: value.to(dtype) for name, value in full_parameters(vlm.hf).items()}
    vlm.hf.to(dtype)
    return None
