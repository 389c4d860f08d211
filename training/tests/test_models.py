from dataclasses import replace

import numpy as np
import pytest

from training.recipe.configs import CONFIGS, get_config
from training.recipe.models import build_model, whitening_kernel


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


@pytest.mark.parametrize("name", ["base1", "final", "fast", "default", "airbench94", "default_gpu"])
def test_models_take_raw_pixels_and_return_ten_logits(name):
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (600, 32, 32, 3), dtype=np.uint8)
    model = build_model(get_config(name), train_images)
    logits = model.predict(train_images[:4].astype(np.float32), verbose=0)
    assert logits.shape == (4, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("momentum", [0.6, 0.9])
def test_batchnorm_momentum_comes_from_the_config(momentum):
    import keras
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    model = build_model(get_config("tiny", batchnorm_momentum=momentum), images)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 6 and {layer.momentum for layer in norms} == {momentum}


def test_residual_blocks_add_two_more_convs_onto_each_blocks_pooled_activation():
    import keras
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    plain = build_model(get_config("tiny"), images)
    model = build_model(get_config("tiny", residual=True), images)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D) and layer.name != "whiten"]
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    assert len(convs) == 9 and len(adds) == 3
    assert not any(isinstance(layer, keras.layers.Add) for layer in plain.layers)
    # With the two added convs silenced, each block passes its pooled activation straight through.
    for conv in convs[1::3] + convs[2::3]:
        conv.kernel.assign(np.zeros(conv.kernel.shape))
    probe = keras.Model(model.inputs, [[add.input[1], add.output] for add in adds])
    for skipped, summed in probe.predict(images.astype(np.float32), verbose=0):
        assert np.abs(skipped).max() > 0 and np.allclose(summed, skipped)


def test_unknown_configs_list_the_choices():
    with pytest.raises(KeyError, match="choose from: base1"):
        get_config("vgg16")
    assert get_config("fast", epochs=3).epochs == 3 and CONFIGS["fast"].epochs == 10


def test_partial_dirac_init_starts_each_conv_near_the_identity():
    from training.recipe.models import PartialDirac
    kernel = np.asarray(PartialDirac()((3, 3, 16, 48)))
    identity = np.zeros((3, 3, 16, 16))
    identity[1, 1] = np.eye(16)
    assert np.array_equal(kernel[..., :16], identity)
    assert 0 < np.abs(kernel[..., 16:]).max() <= 1 / np.sqrt(3 * 3 * 16)


@pytest.mark.parametrize("tta", ["none", "flip", "flip_translate"])
def test_test_time_augmentation_averages_the_views_airbench_uses(tta):
    import tensorflow as tf
    from training.recipe.models import averaged_logits
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 32, 32, 3)).astype(np.float32)
    model = build_model(get_config("tiny"), images.astype(np.uint8))

    def mirrored(x):  # numpy views, independent of the graph code
        logits = model.predict(x, verbose=0)
        return logits if tta == "none" else (logits + model.predict(x[:, :, ::-1], verbose=0)) / 2

    expected = mirrored(images)
    if tta == "flip_translate":
        padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        expected = (expected + (mirrored(padded[:, :32, :32]) + mirrored(padded[:, 2:, 2:])) / 2) / 2
    assert np.allclose(averaged_logits(model, tf.constant(images), tta).numpy(), expected, atol=1e-4)


def test_unknown_test_time_augmentation_is_refused():
    from training.ship.export import serving_function
    with pytest.raises(ValueError, match="choose from none, flip, flip_translate"):
        serving_function(None, "rotate")


def test_mixed_bfloat16_convs_compute_in_bf16_and_their_weights_compute_in_float32_for_export():
    import keras
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (600, 32, 32, 3), dtype=np.uint8)
    config = get_config("tiny", precision="mixed_bfloat16")
    model = build_model(config, train_images)
    assert keras.mixed_precision.global_policy().name == "float32", "the global policy leaks"
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert {layer.compute_dtype for layer in convs[1:]} == {"bfloat16"}
    assert model.get_layer("normalization").compute_dtype == "float32"
    pixels = train_images[:64].astype(np.float32)
    logits = np.asarray(model(pixels, training=False))
    assert logits.dtype == "float32"

    twin = build_model(replace(config, precision="float32"), train_images)  # as finish.network_from_run builds it
    twin.set_weights(model.get_weights())
    assert {layer.compute_dtype for layer in twin.layers} == {"float32"}
    # bf16 keeps 8 bits of mantissa: the two agree closely, not exactly.
    twin_logits = np.asarray(twin(pixels, training=False))
    assert 0 < np.abs(logits - twin_logits).max() < 0.05 * np.abs(twin_logits).max()


def test_the_activation_comes_from_the_config_and_the_whitening_stem_computes_in_float32():
    import keras
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    model = build_model(get_config("airbench94", widths=(8, 16, 16), precision="mixed_bfloat16"), images)
    activations = [layer.activation.__name__ for layer in model.layers if isinstance(layer, keras.layers.Activation)]
    assert activations == ["gelu"] * 7
    whiten = model.get_layer("whiten")
    assert whiten.compute_dtype == "float32" and whiten.output.dtype == "float32"
    assert model.get_layer(index=3).compute_dtype == "bfloat16"  # the activation after it: the policy's
    relu = build_model(get_config("fast", widths=(8, 16, 16)), images)
    assert {layer.activation.__name__ for layer in relu.layers if isinstance(layer, keras.layers.Activation)} == {"relu"}
