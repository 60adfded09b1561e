"""The vision tower and the image preprocessing that feeds it.

Default: a compact SigLIP-style ViT (a standard transformers class, so the assembled model stays a
stock `LlavaForConditionalGeneration`) trained here on chest radiographs. Any local Hugging Face
vision model folder (ViT, SigLIP, CLIP, DINOv2) can replace it through `VisionConfig.path`.

Input size policy: the radiograph is resized to fit the encoder's square input while keeping its
aspect ratio, then padded with black. Resizing is done first on a reduced copy (PIL's reducing_gap),
so a 4,000 px DICOM never needs more than a few times its own float32 size in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base_models import ModelPathError
from .config import VisionConfig

# SigLIP's normalisation: pixels in [0, 1] map to [-1, 1].
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


def build_vision_config(cfg: VisionConfig):
    """The transformers config of the vision tower (the vision part of a composite model folder)."""
    from transformers import AutoConfig, SiglipVisionConfig

    if cfg.path is None:
        return SiglipVisionConfig(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_channels=cfg.num_channels,
            vision_use_head=False,  # pooling is ours (mean of patches); an unused head breaks DDP
        )
    loaded = AutoConfig.from_pretrained(_vision_dir(cfg.path))
    # Composite models (CLIP, SigLIP) keep the vision tower's settings in a sub-config.
    return getattr(loaded, "vision_config", loaded)


def build_vision_tower(cfg: VisionConfig, vision_config=None) -> torch.nn.Module:
    """A freshly initialised default tower, or a local pretrained one."""
    from transformers import AutoModel

    vision_config = vision_config or build_vision_config(cfg)
    if cfg.path is None:
        return AutoModel.from_config(vision_config)
    model = AutoModel.from_pretrained(_vision_dir(cfg.path))
    # A composite checkpoint (e.g. a full CLIP) contributes only its vision transformer.
    return getattr(model, "vision_model", model)


def _vision_dir(path: str) -> str:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelPathError(
            f"vision model path {path!r} is not a Hugging Face model folder (no config.json): "
            "pass a local ViT/SigLIP/CLIP/DINOv2 folder, or leave it unset for the built-in encoder"
        )
    return str(folder)


def fit_to_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W) float in [0, 1] -> (size, size) float32, aspect ratio kept, padded with black."""
    height, width = pixels.shape
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    resized = np.asarray(image.resize((new_w, new_h), Image.BILINEAR, reducing_gap=3.0))
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = np.clip(resized, 0.0, 1.0)
    return canvas


def to_pixel_values(images: list[np.ndarray], size: int, channels: int = 3) -> torch.Tensor:
    """Grayscale images in [0, 1] -> normalised tensor (B, C, size, size) for the vision tower."""
    batch = np.stack([fit_to_square(image, size) for image in images])  # (B, S, S)
    tensor = torch.from_numpy(batch).unsqueeze(1).expand(-1, channels, -1, -1)  # (B, C, S, S)
    return ((tensor - PIXEL_MEAN) / PIXEL_STD).contiguous()
