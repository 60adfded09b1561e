"""Gemma 3's arithmetic as transformers and peft round it, shared by the fast decoder's token step
(assistant.fast_decode, traced by torch.compile) and its prefill (assistant.fast_prefill).

Each function takes and returns tensors of the model dtype and computes in fp32 where transformers
does; `product` is the caller's matrix product (a multiply-and-sum in the step, a GEMM in prefill).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm in fp32, `scale` being 1 + weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * scale).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (rotate-half form) of x (..., head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def with_lora(out: torch.Tensor, x: torch.Tensor, lora: list[torch.Tensor], module: int,
              product: Product) -> torch.Tensor:
    """`out` (the base projection of `x`) plus LoRA module `module`'s term, rounded as peft does in
    the model dtype: B (A x) rounded, times the scaling rounded, then the sum rounded."""
    a, b, scaling = lora[2 * module], lora[2 * module + 1], lora[-1][module]
    term = (product(b, product(a, x)).float() * scaling).to(out.dtype)
    return (out.float() + term.float()).to(out.dtype)


def with_penalty(values: torch.Tensor, penalty) -> torch.Tensor:
    """transformers' repetition penalty on the logits of seen tokens: divided by `penalty` when
    positive, multiplied when negative."""
    return torch.where(values < 0, values * penalty, values / penalty)


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """`logits` with the repetition penalty on the `seen` tokens (bool, one per logit)."""
    return torch.where(seen, with_penalty(logits, penalty), logits)


# ---- the parts of a decoder layer around attention (x: (..., hidden) in the model dtype) -----------
def attention_inputs(h: torch.Tensor, layer, shape, product: Product):
    """The input norm of `h` (positions, hidden), then q, k and v (LoRA included), flat."""
    x = rms_norm(h, layer.hidden_norm[0], shape.eps)
    mixed = product(layer.qkv, x)
    q_size, kv_size = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    q, k, v = mixed[..., :q_size], mixed[..., q_size: q_size + kv_size], mixed[..., q_size + kv_size:]
    if layer.lora:
        q, k, v = (with_lora(out, x, layer.lora, module, product) for module, out in enumerate((q, k, v)))
    return q, k, v


def after_attention(h: torch.Tensor, attended: torch.Tensor, layer, shape, product: Product) -> torch.Tensor:
    """The output projection of `attended` (positions, heads x head_dim), its norm and the residual,
    then the feed-forward block (gelu-tanh gate times up, down) with its norms and residual."""
    projected = product(layer.o, attended)
    if layer.lora:
        projected = with_lora(projected, attended, layer.lora, 3, product)
    h = h + rms_norm(projected, layer.hidden_norm[1], shape.eps)
    x = rms_norm(h, layer.hidden_norm[2], shape.eps)
    gu = product(layer.gate_up, x)
    gate, up = gu[..., : shape.intermediate], gu[..., shape.intermediate:]
    if layer.lora:
        gate, up = with_lora(gate, x, layer.lora, 4, product), with_lora(up, x, layer.lora, 5, product)
    act = torch.nn.functional.gelu(gate.float(), approximate="tanh").to(up.dtype) * up
    down = product(layer.down, act)
    if layer.lora:
        down = with_lora(down, act, layer.lora, 6, product)
    return h + rms_norm(down, layer.hidden_norm[3], shape.eps)
