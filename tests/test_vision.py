from __future__ import annotations

import numpy as np
import pytest

from assistant.base_models import ModelPathError
from assistant.config import VisionConfig
from assistant.vision import build_vision_config, fit_to_square, to_pixel_values


def test_fit_keeps_aspect_ratio_and_pads_with_black():
    tall = np.ones((400, 100), dtype=np.float32)
    square = fit_to_square(tall, 64)
    assert square.shape == (64, 64)
    columns_with_content = np.flatnonzero(square.max(axis=0) > 0.5)
    assert len(columns_with_content) == 16  # 100/400 of 64
    assert square[:, 0].max() == 0.0 and square[:, -1].max() == 0.0


def test_fit_downscales_large_radiographs_without_leaving_range():
    big = np.random.default_rng(0).random((3000, 2500), dtype=np.float32)
    out = fit_to_square(big, 224)
    assert out.shape == (224, 224) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_pixel_values_are_normalised_three_channel():
    values = to_pixel_values([np.zeros((10, 10), np.float32), np.ones((10, 20), np.float32)], 32)
    assert tuple(values.shape) == (2, 3, 32, 32)
    assert float(values.min()) == -1.0 and float(values.max()) == 1.0


def test_default_vision_config_has_no_pooling_head():
    config = build_vision_config(VisionConfig())
    assert config.image_size == 64 and config.vision_use_head is False


def test_unknown_vision_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelPathError, match="not a Hugging Face model folder"):
        build_vision_config(VisionConfig(path=str(tmp_path)))


# ---- the encoder, its weights and heatmaps ----------------------------------------------------

import dataclasses  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from assistant.vision import (FINDINGS, TOWER_FILE, VisionEncoder, build_vision_tower,  # noqa: E402
                              config_for_weights, load_vision_encoder, resolve_weights, save_vision_encoder)
from assistant.vision_heatmap import heatmap, overlay  # noqa: E402

TINY = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, weights=None)


def tiny_encoder(seed: int = 0) -> VisionEncoder:
    torch.manual_seed(seed)
    return VisionEncoder(build_vision_tower(TINY)).eval()


def scans(count: int = 3, shape=(48, 40)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random(shape, dtype=np.float32) for _ in range(count)]


def test_encode_shapes_unit_norm_and_probabilities():
    encoder = tiny_encoder()
    out = encoder.encode(to_pixel_values(scans(), 32))
    assert out.patches.shape == (3, 16, 32)
    assert out.pooled.shape == (3, 32) and out.finding_probs.shape == (3, len(FINDINGS))
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(3))
    assert float(out.finding_probs.min()) >= 0.0 and float(out.finding_probs.max()) <= 1.0


def test_patches_are_what_the_llava_projector_receives(tiny_vlm):
    encoder = VisionEncoder(tiny_vlm.hf.model.vision_tower)
    pixel_values = tiny_vlm.pixel_values(scans(1))
    projector = tiny_vlm.hf.model.multi_modal_projector
    with torch.no_grad():
        torch.testing.assert_close(projector(encoder.encode(pixel_values).patches),
                                   tiny_vlm.image_features(pixel_values))


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_save_load_round_trip(tmp_path, dtype):
    encoder = tiny_encoder()
    with torch.no_grad():
        encoder.head.bias.add_(torch.linspace(-1, 1, len(FINDINGS)))  # a "trained" head
    pixel_values = to_pixel_values(scans(), 32)
    save_vision_encoder(encoder, tmp_path, TINY, dtype=dtype)
    loaded = load_vision_encoder(config_for_weights(tmp_path))
    a, b = encoder.encode(pixel_values), loaded.encode(pixel_values)
    if dtype is None:  # identical outputs
        assert torch.equal(a.finding_probs, b.finding_probs) and torch.equal(a.patches, b.patches)
    else:  # half-precision storage: close, and a second round trip is exact
        torch.testing.assert_close(a.finding_probs, b.finding_probs, atol=2e-3, rtol=0)
        save_vision_encoder(loaded, tmp_path / "again", TINY, dtype=dtype)
        again = load_vision_encoder(config_for_weights(tmp_path / "again"))
        assert torch.equal(again.encode(pixel_values).finding_probs, b.finding_probs)
    assert load_file(str(tmp_path / TOWER_FILE)).keys() == encoder.tower.state_dict().keys()


def test_default_config_loads_the_shipped_weights():
    folder = resolve_weights(VisionConfig())
    assert folder is not None and (folder / TOWER_FILE).is_file()
    tower = build_vision_tower(VisionConfig())
    for name, tensor in load_file(str(folder / TOWER_FILE)).items():
        torch.testing.assert_close(tower.state_dict()[name], tensor.float())
    assert (folder / TOWER_FILE).stat().st_size < 10 * 1024 * 1024  # small enough to ship in git


def test_vlm_uses_the_shipped_tower_by_default():
    from assistant.config import AssistantConfig
    from assistant.model import ClinicalVLM
    from conftest import tiny_language_model, tiny_tokenizer

    vlm = ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), AssistantConfig())
    shipped = load_file(str(resolve_weights(VisionConfig()) / TOWER_FILE))
    state = vlm.hf.model.vision_tower.state_dict()
    assert state.keys() == shipped.keys()
    for name, tensor in shipped.items():  # the tower runs in the LLM's dtype (bf16 by default)
        torch.testing.assert_close(state[name].float(), tensor.float(), atol=1e-2, rtol=1e-2)
    assert vlm.num_image_tokens == 64


def test_weights_for_another_architecture_are_a_clear_error():
    with pytest.raises(ModelPathError, match="do not fit"):
        build_vision_tower(dataclasses.replace(TINY, weights=VisionConfig().weights))
    with pytest.raises(ModelPathError, match="not a vision weights folder"):
        build_vision_tower(dataclasses.replace(TINY, weights="/nonexistent/folder"))


def test_a_local_hf_vision_folder_ignores_the_shipped_weights(tmp_path):
    build_vision_tower(TINY).save_pretrained(tmp_path)  # stands in for a user's SigLIP folder
    encoder = load_vision_encoder(VisionConfig(path=str(tmp_path)))  # default `weights` untouched
    out = encoder.encode(to_pixel_values(scans(1), 32))
    assert out.patches.shape == (1, 16, 32)


def test_heatmap_matches_the_original_shape_and_range():
    encoder = tiny_encoder()
    for shape in [(48, 40), (23, 61), (32, 32)]:
        heat = heatmap(encoder, scans(1, shape)[0], "Effusion")
        assert heat.shape == shape and heat.dtype == np.float32
        assert np.isfinite(heat).all() and 0.0 <= heat.min() and heat.max() <= 1.0
    assert heatmap(encoder, to_pixel_values(scans(1), 32), 0).shape == (32, 32)
    assert not any(p.grad is not None for p in encoder.parameters())
    with pytest.raises(ValueError, match="unknown finding"):
        heatmap(encoder, scans(1)[0], "Broken bone")


def test_overlay_is_rgb_uint8_and_leaves_cold_areas_gray():
    gray = np.full((20, 30), 100, np.uint8)
    heat = np.zeros((20, 30), np.float32)
    heat[5, 5] = 1.0
    out = overlay(gray, heat)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 100).all() and out[5, 5, 0] > 100
    with pytest.raises(ValueError, match="differ in shape"):
        overlay(gray, heat.T)


def blob_images(count: int, rng: np.random.Generator, shape=(48, 40)):
    images, labels, centres = [], [], []
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    for index in range(count):
        image = (0.25 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
        centre = (int(rng.integers(8, shape[0] - 8)), int(rng.integers(8, shape[1] - 8)))
        if index % 2:
            image[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= 25] = 0.95
        images.append(image.clip(0, 1))
        labels.append(index % 2)
        centres.append(centre)
    return images, np.array(labels, np.float32), centres


@pytest.fixture
def one_thread():
    """Tiny models train far faster on one thread than on threads contending for 2 shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_heatmap_finds_a_planted_blob(one_thread):
    """A tiny encoder learns 'bright blob present' in about a second; its heat peaks on the blob."""
    rng = np.random.default_rng(0)
    images, labels, _ = blob_images(256, rng)
    pixel_values, targets = to_pixel_values(images, 32), torch.from_numpy(labels)
    torch.manual_seed(0)
    encoder = VisionEncoder(build_vision_tower(dataclasses.replace(TINY, patch_size=4))).train()  # 8x8 grid
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-3)
    for step in range(300):
        batch = torch.randint(0, len(images), (32,))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(encoder(pixel_values[batch])[:, 0], targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step > 40 and loss.item() < 0.02:
            break
    test_images, test_labels, centres = blob_images(20, np.random.default_rng(1))
    distances = []
    for image, label, centre in zip(test_images, test_labels, centres):
        if label:
            heat = heatmap(encoder, image, 0)
            peak = np.unravel_index(int(heat.argmax()), heat.shape)
            distances.append(np.hypot(peak[0] - centre[0], peak[1] - centre[1]))
    assert sum(d <= 5 for d in distances) >= 9, distances  # the peak lies inside the 5 px blob
