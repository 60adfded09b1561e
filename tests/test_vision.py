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
    assert config.image_size == 224 and config.vision_use_head is False


def test_unknown_vision_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelPathError, match="not a Hugging Face model folder"):
        build_vision_config(VisionConfig(path=str(tmp_path)))
