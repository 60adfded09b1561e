"""Where the encoder looked: Grad-CAM on the final patch tokens, traced back to the input patches
through attention rollout, and mapped onto the original image.

Grad-CAM alone on a ViT's final tokens does not localise: attention has already copied the evidence
into every token (on a planted-blob test the last-layer map peaked on the blob in 4 of 20 images).
So the per-token Grad-CAM relevance of the final layer (with the head on mean-pooled tokens this
is exactly each token's contribution to the finding's logit, CAM) is carried back through the
attention rollout (Abnar & Zuidema 2020: per layer, head-averaged attention mixed half-and-half
with the residual identity, multiplied through the layers) to the patches it came from. The map is
specific to the finding and peaks on the blob in every planted-blob case. It is relative (scaled
to [0, 1] per image): read it together with the finding's probability.

The patch grid is upsampled to the encoder's square input, the padding that `fit_to_square`
added is cut away, and the rest is resized to the original (H, W).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from .vision import VisionEncoder, square_placement, to_pixel_values


def heatmap(encoder: VisionEncoder, image: np.ndarray | torch.Tensor, finding: str | int) -> np.ndarray:
    """(H, W) float32 in [0, 1] for a scan's pixels (H, W), or (S, S) for pixel_values (1, C, S, S)."""
    index = encoder.finding_index(finding)
    size = encoder.tower.config.image_size
    if isinstance(image, np.ndarray):
        if image.ndim != 2:
            raise ValueError(f"heatmap expects grayscale pixels (H, W), got shape {image.shape}")
        original = image.shape
        pixel_values = to_pixel_values([image], size, encoder.tower.config.num_channels)
    else:
        original, pixel_values = (size, size), image
    if pixel_values.ndim != 4 or pixel_values.shape[0] != 1:
        raise ValueError("heatmap explains one image: pass pixel_values of shape (1, C, S, S)")
    cam = _grad_cam(encoder, pixel_values, index)  # (g, g)
    square = torch.nn.functional.interpolate(cam[None, None], size=(size, size), mode="bilinear",
                                             align_corners=False)[0, 0].numpy()
    return _normalise(_unfit(square, original))


def _grad_cam(encoder: VisionEncoder, pixel_values: torch.Tensor, index: int) -> torch.Tensor:
    """(g, g) relevance of each input patch for finding `index`."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.enable_grad(), _eager_attention(encoder.tower):
            # The input asks for gradients, so the graph exists even when every parameter is frozen
            # (peft freezes the whole model it wraps, the shared vision tower included).
            pixel_values = pixel_values.to(encoder.head.weight.dtype).detach().requires_grad_(True)
            out = encoder.tower(pixel_values=pixel_values, output_attentions=True)
            tokens = out.last_hidden_state  # (1, N, D)
            logit = encoder.head(tokens.mean(dim=1))[0, index]
            (grads,) = torch.autograd.grad(logit, tokens)  # parameters get no .grad
    finally:
        encoder.train(was_training)
    weights = grads.mean(dim=1, keepdim=True)  # (1, 1, D) Grad-CAM's channel weights
    cam = (weights * tokens).sum(dim=-1)[0].detach().float()  # (N,) signed final-token relevance
    # Shift instead of Grad-CAM's ReLU: for an unlikely finding every token argues against it and
    # ReLU would leave a blank map; the shifted map still shows where the evidence is strongest.
    relevance = (cam - cam.min()) @ _rollout(out.attentions)  # (N,) input-patch relevance
    side = encoder.tower.config.image_size // encoder.tower.config.patch_size
    return relevance[-side * side:].reshape(side, side)  # drop a leading CLS token if the tower has one


def _rollout(attentions: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(N, N): how much final token i draws on input token j through all layers."""
    if not attentions:
        raise ValueError("the vision tower returned no attention weights; heatmaps need a ViT-style tower")
    size = attentions[0].shape[-1]
    eye = torch.eye(size)
    rollout = eye
    for attention in attentions:  # each (1, heads, N, N)
        mixed = 0.5 * attention[0].detach().float().mean(dim=0) + 0.5 * eye  # the residual path
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    return rollout


@contextmanager
def _eager_attention(tower: torch.nn.Module) -> Iterator[None]:
    """Only transformers' eager attention returns the weights; switch to it for one call."""
    previous = tower.config._attn_implementation
    _set_attention(tower, "eager")
    try:
        yield
    finally:
        _set_attention(tower, previous)


def _set_attention(tower: torch.nn.Module, implementation: str | None) -> None:
    if hasattr(tower, "set_attn_implementation"):
        tower.set_attn_implementation(implementation)
    else:  # a bare transformer module (e.g. a SigLIP folder's vision_model): its config decides
        tower.config._attn_implementation = implementation


def _unfit(square: np.ndarray, original: tuple[int, int]) -> np.ndarray:
    """Undo fit_to_square: crop the placed region of the (S, S) map, resize it to the original (H, W)."""
    top, left, new_h, new_w = square_placement(*original, square.shape[0])
    region = np.ascontiguousarray(square[top : top + new_h, left : left + new_w], dtype=np.float32)
    if region.shape == tuple(original):
        return region
    return np.asarray(Image.fromarray(region, mode="F").resize(original[::-1], Image.BILINEAR))


def _normalise(heat: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] over the image: rollout adds a floor shared by all patches, which would
    otherwise tint the whole film."""
    heat = np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0)
    low, span = float(heat.min()), float(heat.max() - heat.min())
    return ((heat - low) / span if span > 0 else np.zeros_like(heat)).astype(np.float32)


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W) uint8 radiograph + (H, W) heat in [0, 1] -> (H, W, 3) uint8, cold areas left gray."""
    if gray.shape != heat.shape:
        raise ValueError(f"image {gray.shape} and heatmap {heat.shape} differ in shape")
    heat = np.clip(heat, 0.0, 1.0)[..., None]  # (H, W, 1)
    # A black-red-yellow-white ramp ("hot"): monotone in brightness, readable on a gray image.
    colour = np.clip(np.concatenate([3 * heat, 3 * heat - 1, 3 * heat - 2], axis=-1), 0.0, 1.0) * 255.0
    base = np.repeat(gray.astype(np.float32)[..., None], 3, axis=-1)  # (H, W, 3)
    weight = alpha * heat
    return np.rint(base * (1.0 - weight) + colour * weight).astype(np.uint8)
