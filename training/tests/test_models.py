import numpy as np
import pytest

from training.configs import CONFIGS, get_config
from training.models import build_model, whitening_kernel


def test_whitening_filters_decorrelate_image_patches():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(3, 3))  # strongly correlated channels
    images = (rng.normal(size=(2000, 32, 32, 3)) @ mixing).astype(np.float32)
    kernel = whitening_kernel(images, eps=0)  # [2, 2, 3, 24]
    patches = np.lib.stride_tricks.sliding_window_view(images, (2, 2), axis=(1, 2))
    patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12)
    responses = (patches - patches.mean(0)) @ kernel.reshape(12, 24)[:, :12]
    assert np.allclose(np.cov(responses, rowvar=False), np.eye(12), atol=0.05)
    assert np.allclose(kernel[..., 12:], -kernel[..., :12])


@pytest.mark.parametrize("name", ["base1", "final", "fast", "default"])
def test_models_take_raw_pixels_and_return_ten_logits(name):
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (600, 32, 32, 3), dtype=np.uint8)
    model = build_model(get_config(name), train_images)
    logits = model.predict(train_images[:4].astype(np.float32), verbose=0)
    assert logits.shape == (4, 10) and np.isfinite(logits).all()


def test_unknown_configs_list_the_choices():
    with pytest.raises(KeyError, match="choose from: base1"):
        get_config("vgg16")
    assert get_config("fast", epochs=3).epochs == 3 and CONFIGS["fast"].epochs == 10
