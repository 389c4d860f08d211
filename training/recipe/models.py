"""Keras models for the configurations: the seed's VGG family and the fast airbench-style net.

Every model takes raw pixels (float 0-255, [N, 32, 32, 3]) and returns logits: preprocessing
lives inside the model, so the exported graph and the training loop agree. Augmentation is not
part of it: training/recipe/augment.py applies it inside the compiled training step.
"""

import json
import os
from pathlib import Path

import numpy as np
import keras
from keras import layers

from training.recipe.data import channel_stats


def preprocessing_layer(config, mean, std):
    if config.preprocessing == "centering":
        return layers.Rescaling(1 / 255, name="centering", dtype="float32")
    if config.preprocessing == "normalization":
        return layers.Normalization(mean=list(mean), variance=list(np.square(std)), name="normalization",
                                    dtype="float32")
    raise ValueError(f"unknown preprocessing {config.preprocessing!r}")


def vgg_network(x, config):
    """The seed's VGG: blocks of two 3x3 convs + max-pool, then dense layers."""
    regularizer = keras.regularizers.l2(config.l2) if config.l2 else None
    conv = dict(kernel_size=3, padding="same", kernel_initializer="he_uniform",
                kernel_regularizer=regularizer)

    def activate(x):
        if config.batchnorm:
            x = layers.BatchNormalization()(x)
        return layers.Activation("relu")(x)

    for i in range(config.vgg_blocks):
        x = activate(layers.Conv2D(config.widths[i], **conv)(x))
        x = activate(layers.Conv2D(config.widths[i], **conv)(x))
        x = layers.MaxPooling2D(2)(x)
        if config.block_dropout:
            x = layers.Dropout(config.block_dropout[i])(x)
    x = layers.Flatten()(x)
    for units in config.dense:
        x = activate(layers.Dense(units, kernel_initializer="he_uniform", kernel_regularizer=regularizer)(x))
        if config.dense_dropout:
            x = layers.Dropout(config.dense_dropout)(x)
    return layers.Dense(10, name="logits", dtype="float32")(x)


def whitening_kernel(x, eps=5e-4):
    """2x2 patch-whitening filters (and their negatives) from training images: the first layer
    starts out decorrelating its input, which saves epochs (airbench, Page's ResNet-9 notes)."""
    patches = np.lib.stride_tricks.sliding_window_view(x, (2, 2), axis=(1, 2))  # N,31,31,3,2,2
    patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12)
    patches = patches - patches.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(patches, rowvar=False))
    filters = (eigenvectors / np.sqrt(eigenvalues + eps)).T.reshape(12, 2, 2, 3)
    filters = np.concatenate([filters, -filters])  # 24 filters: ReLU keeps both signs
    return filters.transpose(1, 2, 3, 0).astype(np.float32)  # HWIO


@keras.saving.register_keras_serializable("cifar10")
class PartialDirac(keras.initializers.Initializer):
    """airbench's conv init: the first min(in, out) filters pass their input channel through
    unchanged, the rest are uniform(+-1/sqrt(fan_in)); a block starts close to the identity."""

    def __call__(self, shape, dtype=None):
        height, width, channels_in, channels_out = shape
        bound = 1 / np.sqrt(height * width * channels_in)
        identity = min(channels_in, channels_out)
        random_part = np.ones(shape, "float32")
        random_part[..., :identity] = 0
        dirac = np.zeros(shape, "float32")
        dirac[height // 2, width // 2, np.arange(identity), np.arange(identity)] = 1
        return keras.random.uniform(shape, -bound, bound, dtype=dtype) * random_part + dirac

    def get_config(self):
        return {}


def airbench_network(x, config, whitening_sample):
    """A frozen whitening stem, then conv-pool-BN-act-conv-BN-act blocks (Keller Jordan's airbench;
    config.activation: its GELU, or ReLU, which is half the step time on 2 CPU cores). With
    `residual`, airbench96's blocks: two convs after the pool, added back onto their input."""
    bn = dict(momentum=config.batchnorm_momentum, epsilon=1e-5, scale=False)
    activation = config.activation
    # float32 in any precision: in bfloat16 the stem's rounding error is ~100x float16's (airbench's),
    # and it costs next to nothing.
    whiten = layers.Conv2D(24, 2, padding="valid", name="whiten", dtype="float32")
    x = whiten(x)
    whiten.kernel.assign(whitening_kernel(whitening_sample))
    whiten.kernel.trainable = False
    x = layers.Activation(activation)(x)
    conv = dict(kernel_size=3, padding="same", use_bias=False, kernel_initializer=PartialDirac())
    for width in config.widths:
        x = layers.Conv2D(width, **conv)(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Activation(activation)(layers.BatchNormalization(**bn)(x))
        block_input = x
        for _ in range(2 if config.residual else 1):
            x = layers.Conv2D(width, **conv)(x)
            x = layers.Activation(activation)(layers.BatchNormalization(**bn)(x))
        if config.residual:
            x = layers.Add()([x, block_input])
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dense(10, use_bias=False)(x)
    return layers.Rescaling(config.logit_scale, name="logits", dtype="float32")(x)


def build_model(config, train_images, statistics=None):
    """A functional model: raw pixels -> preprocessing -> network -> logits.
    The normalization statistics come from `train_images` only (or are the given (mean, std)).
    Layers compute in config.precision; the logits are float32 either way."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(config.precision)
    try:
        return _build_model(config, train_images, statistics)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _build_model(config, train_images, statistics=None):
    mean, std = channel_stats(train_images) if statistics is None else statistics
    preprocess = preprocessing_layer(config, mean, std)
    inputs = keras.Input((32, 32, 3), name="pixels")
    x = preprocess(inputs)
    if config.architecture == "vgg":
        logits = vgg_network(x, config)
    elif config.architecture == "airbench":
        sample = keras.ops.convert_to_numpy(preprocess(train_images[:5000].astype("float32")))
        logits = airbench_network(x, config, sample)
    else:
        raise ValueError(f"unknown architecture {config.architecture!r}")
    return keras.Model(inputs, logits, name=config.name)


def averaged_logits(model, pixels, tta, first=None):
    """airbench's test-time augmentation: average with the mirror image ("flip", 2 passes), and
    also with 1-pixel shifts up-left and down-right ("flip_translate", 6 passes). keras.ops: the
    export's graph (TensorFlow) and a teacher's pass under JAX compute the same views. `first`:
    the logits of `pixels` themselves, where the caller has them already."""
    ops = keras.ops

    def with_mirror(x, logits=None):
        logits = model(x, training=False) if logits is None else logits
        return logits if tta == "none" else (logits + model(ops.flip(x, axis=2), training=False)) / 2

    logits = with_mirror(pixels, first)
    if tta == "flip_translate":
        padded = ops.pad(pixels, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="reflect")
        logits = (logits + (with_mirror(padded[:, :32, :32]) + with_mirror(padded[:, 2:, 2:])) / 2) / 2
    return logits


def log_probabilities(probabilities):
    """Logits that give back `probabilities` under a softmax (up to float32 underflow)."""
    return np.log(np.maximum(np.asarray(probabilities, np.float64), 1e-30))


# The trained network as a run hands it over: what export needs, from whichever backend trained it.
WEIGHTS = "weights.float16.npz"


def save_network_weights(model, path, meta):
    """`model`'s weights in a backend-neutral file: conv and dense kernels in float16 (as the
    export stores them, so exporting from this file serves what exporting the model would),
    every other weight float32, in the order of model.weights; `meta` (JSON) beside them."""
    path = Path(path)
    arrays, described = {}, []
    for i, variable in enumerate(model.weights):
        value = np.asarray(keras.ops.convert_to_numpy(variable))
        arrays[f"w{i}"] = value.astype(np.float16) if variable.path.endswith("/kernel") else value
        described.append([variable.path, list(value.shape)])
    arrays["meta"] = np.array(json.dumps({**meta, "variables": described}))
    partial = path.with_name(f".{path.name}.partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)


def load_network_weights(model, path):
    """Load a save_network_weights file into `model`, built from the same configuration (on any
    backend, in any precision); returns its meta."""
    with np.load(path) as saved:
        meta = json.loads(str(saved["meta"]))
        stored = meta["variables"]
        if len(stored) != len(model.weights):
            raise ValueError(f"{path}: {len(stored)} weights, the model has {len(model.weights)}")
        for i, (variable, (name, shape)) in enumerate(zip(model.weights, stored)):
            if tuple(variable.shape) != tuple(shape) or variable.path.rsplit("/", 1)[-1] != name.rsplit("/", 1)[-1]:
                raise ValueError(f"{path}: weight {i} is {name} {shape}, the model's is "
                                 f"{variable.path} {list(variable.shape)}")
            variable.assign(saved[f"w{i}"].astype(variable.dtype))
    return meta
