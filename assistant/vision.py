"""The vision tower and the image preprocessing that feeds it.

Default: a compact SigLIP-style ViT (a standard transformers class, so the assembled model stays a
stock `LlavaForConditionalGeneration`) trained here on chest radiographs. Any local Hugging Face
vision model folder (ViT, SigLIP, CLIP, DINOv2) can replace it through `VisionConfig.path`.

Trained weights: `VisionConfig.weights` names a folder with `vision.safetensors` (the tower's
state_dict, the same file and keys `ClinicalVLM.save_adapter` writes) and `finding_head.safetensors`.
By default that is the shipped `adapters/vision-nih14`, so `ClinicalVLM.from_config` gets the
trained tower without an adapter. With `path` set, the model's own weights are used and the
finding head stays untrained unless `weights` names a folder trained for that model.

`VisionEncoder.encode` returns the patch tokens for the projector, one L2-normalised pooled vector
for retrieval, and 14 NIH finding probabilities; `vision_heatmap` explains the latter.

Input size policy: the radiograph is resized to fit the encoder's square input while keeping its
aspect ratio, then padded with black. Resizing is done first on a reduced copy (PIL's reducing_gap),
so a 4,000 px DICOM never needs more than a few times its own float32 size in memory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .base_models import ModelPathError
from .config import VisionConfig

# SigLIP's normalisation: pixels in [0, 1] map to [-1, 1].
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5

# The 14 NIH ChestX-ray14 labels, in the official order; "No Finding" is all zeros.
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
TOWER_FILE = "vision.safetensors"  # same name and keys as ClinicalVLM.save_adapter's vision weights
HEAD_FILE = "finding_head.safetensors"
CONFIG_FILE = "vision_config.json"
_DEFAULT_WEIGHTS = VisionConfig().weights


@dataclass(frozen=True, eq=False)
class VisionOutput:
    patches: torch.Tensor  # (B, N, D) what the projector receives (LLaVA: last layer, all tokens)
    pooled: torch.Tensor  # (B, D) mean of the final patch features, L2-normalised (for FAISS)
    finding_probs: torch.Tensor  # (B, len(FINDINGS)) independent sigmoid probabilities


class VisionEncoder(nn.Module):
    """The vision tower plus a linear finding head on the mean-pooled patch features."""

    def __init__(self, tower: nn.Module, findings: tuple[str, ...] = FINDINGS):
        super().__init__()
        self.tower = tower
        self.findings = tuple(findings)
        self.head = nn.Linear(tower.config.hidden_size, len(self.findings))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Finding logits (B, F); the training path (no hidden-state bookkeeping)."""
        tokens = self.tower(pixel_values=pixel_values).last_hidden_state  # (B, N, D)
        return self.head(tokens.mean(dim=1))

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> VisionOutput:
        pixel_values = pixel_values.to(self.head.weight.dtype)
        out = self.tower(pixel_values=pixel_values, output_hidden_states=True)
        mean = out.last_hidden_state.mean(dim=1)  # (B, D)
        return VisionOutput(
            patches=out.hidden_states[-1],  # pre-final-norm, exactly what LlavaModel selects
            pooled=torch.nn.functional.normalize(mean.float(), dim=-1),
            finding_probs=torch.sigmoid(self.head(mean).float()),
        )

    def finding_index(self, finding: str | int) -> int:
        if isinstance(finding, int):
            return finding
        if finding not in self.findings:
            raise ValueError(f"unknown finding {finding!r}: choose one of {', '.join(self.findings)}")
        return self.findings.index(finding)


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
    """The default tower (with the trained weights `cfg.weights` names), or a local pretrained one."""
    from transformers import AutoModel

    vision_config = vision_config or build_vision_config(cfg)
    if cfg.path is None:
        tower = AutoModel.from_config(vision_config)
    else:
        model = AutoModel.from_pretrained(_vision_dir(cfg.path))
        # A composite checkpoint (e.g. a full CLIP) contributes only its vision transformer.
        tower = getattr(model, "vision_model", model)
    folder = resolve_weights(cfg)
    if folder is not None:
        _load_into(tower, folder / TOWER_FILE)
    return tower


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def resolve_weights(cfg: VisionConfig) -> Path | None:
    """The trained-weights folder to load, or None for the tower's own (or fresh) weights."""
    if cfg.weights is None:
        return None
    if cfg.path is not None and cfg.weights == _DEFAULT_WEIGHTS:
        return None  # the shipped weights fit only the built-in architecture, not a user's model
    folder = Path(cfg.weights).expanduser()
    if not folder.is_absolute() and not folder.exists():
        folder = repo_root() / folder  # like prompts/: the shipped folder, from any working directory
    if not (folder / TOWER_FILE).is_file():
        raise ModelPathError(
            f"vision weights {cfg.weights!r} is not a vision weights folder (no {TOWER_FILE}): pass a "
            "folder made by `python -m assistant train-vision`, or set vision.weights=null for a fresh tower"
        )
    return folder


def _load_into(module: nn.Module, file: Path) -> None:
    from safetensors.torch import load_file

    try:
        module.load_state_dict(load_file(str(file)))
    except RuntimeError as err:  # missing keys or shape mismatches: the weights are for another tower
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:160] if lines else type(err).__name__
        raise ModelPathError(
            f"the weights in {file} do not fit the configured vision tower ({detail}): "
            "use the vision settings they were trained with, or set vision.weights=null"
        ) from err


def load_vision_encoder(cfg: VisionConfig) -> VisionEncoder:
    """The tower plus finding head from `cfg.weights` (an untrained head when it has none)."""
    encoder = VisionEncoder(build_vision_tower(cfg))
    folder = resolve_weights(cfg)
    if folder is not None and (folder / HEAD_FILE).is_file():
        _load_into(encoder.head, folder / HEAD_FILE)
    return encoder.eval()


def save_vision_encoder(encoder: VisionEncoder, folder: str | Path, cfg: VisionConfig,
                        dtype: torch.dtype | None = torch.float16) -> Path:
    """vision.safetensors (tower, ClinicalVLM's keys), finding_head.safetensors, vision_config.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_state(encoder.tower, dtype), str(folder / TOWER_FILE))
    save_file(_state(encoder.head, dtype), str(folder / HEAD_FILE))
    # The architecture only: a folder never points at other weights.
    arch = dataclasses.replace(cfg, weights=None)
    payload = {"vision": dataclasses.asdict(arch), "findings": list(encoder.findings)}
    (folder / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    return folder


def config_for_weights(folder: str | Path) -> VisionConfig:
    """The VisionConfig a weights folder was trained with, pointing at that folder."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ModelPathError(f"{folder} has no {CONFIG_FILE}: pass a folder made by train-vision")
    data = json.loads(path.read_text())["vision"]
    return VisionConfig(**{**data, "weights": str(folder)})


def _state(module: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {
        name: (t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()).cpu().contiguous()
        for name, t in module.state_dict().items()
    }


def _vision_dir(path: str) -> str:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelPathError(
            f"vision model path {path!r} is not a Hugging Face model folder (no config.json): "
            "pass a local ViT/SigLIP/CLIP/DINOv2 folder, or leave it unset for the built-in encoder"
        )
    return str(folder)


def square_placement(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, new_h, new_w): where fit_to_square puts an (H, W) image on its square canvas."""
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def fit_to_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W) float in [0, 1] -> (size, size) float32, aspect ratio kept, padded with black."""
    top, left, new_h, new_w = square_placement(*pixels.shape, size)
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    resized = np.asarray(image.resize((new_w, new_h), Image.BILINEAR, reducing_gap=3.0))
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[top : top + new_h, left : left + new_w] = np.clip(resized, 0.0, 1.0)
    return canvas


def to_pixel_values(images: list[np.ndarray], size: int, channels: int = 3) -> torch.Tensor:
    """Grayscale images in [0, 1] -> normalised tensor (B, C, size, size) for the vision tower."""
    batch = np.stack([fit_to_square(image, size) for image in images])  # (B, S, S)
    tensor = torch.from_numpy(batch).unsqueeze(1).expand(-1, channels, -1, -1)  # (B, C, S, S)
    return ((tensor - PIXEL_MEAN) / PIXEL_STD).contiguous()
