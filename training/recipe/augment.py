"""Training-time augmentation as backend-neutral ops, run inside the compiled training step.

The input pipeline only gathers batches of raw uint8 images (in an order fixed by (seed, epoch));
every random choice of the augmentation is made here, with `keras.ops` and `keras.random`, from
seeds derived from (seed, epoch, batch). So the same code runs under TensorFlow and JAX, the whole
training step compiles (`jit_compile=True`, XLA), a resumed run draws exactly what an
uninterrupted one would, and no random state needs checkpointing. The network itself (what is
exported and served) keeps only preprocessing and normalization.

Augmentations (TrainConfig.augmentation):
- "seed": the seed study's rotation (up to 10 degrees), translation (up to 10% of each side) and
  horizontal flip, as one bilinear affine warp with the edge pixels extended ("nearest" fill);
- "crop_flip": translations by a whole number of pixels, up to `crop_pixels` each way, the image
  extended by reflection without repeating the edge (airbench's padded random crop, PyTorch's
  "reflect"), and random horizontal flips;
- "crop_alternating_flip": the same translations, and airbench's alternating flip: a random half of
  the images (fixed by the seed) is mirrored in even epochs, the other half in odd ones;
- `cutout` (any of them): one `cutout` x `cutout` square per image, inside it, set to the mean pixel.
"""

import numpy as np
import keras
from keras import ops

from training.recipe.data import channel_stats

AUGMENTATIONS = ("none", "seed", "crop_flip", "crop_alternating_flip")
SEED_ROTATION_DEGREES, SEED_TRANSLATION = 10.0, 0.1
BATCHES_PER_EPOCH_BOUND = 1 << 16  # (epoch, batch) -> one integer; an epoch has fewer batches


class KeyedSeeds(keras.random.SeedGenerator):
    """keras.random seeds from a key tensor, without state: the n-th draw of a batch uses
    [seed, (epoch * 2^16 + batch) * 16 + n]. Stateless random ops on both backends (TensorFlow's
    stateless_* kernels, JAX's threefry keys), so they compile and replay exactly."""

    def __init__(self, seed, epoch, batch):  # deliberately no state variable: nothing to track or save
        self.name = "keyed_seeds"
        self.key = (ops.cast(epoch, "int32") * BATCHES_PER_EPOCH_BOUND + ops.cast(batch, "int32")) * 16
        self.seed, self.draws = int(seed), 0

    def next(self, ordered=True):
        self.draws += 1
        key = ops.stack([ops.convert_to_tensor(self.seed, "int32"), self.key + self.draws])
        # JAX takes raw uint32 keys; TensorFlow's stateless ops take int32 seeds as they are.
        return ops.cast(key, "uint32" if keras.backend.backend() == "jax" else "int32")


class Augmentation:
    """config's augmentation of a training batch: (uint8 pixels [B, 32, 32, 3], each image's index
    in the training split, the epoch, the batch number) -> float32 pixels [B, 32, 32, 3]. Indexes,
    epoch and batch arrive as int32 [B] (one value per image, what the input pipeline carries)."""

    def __init__(self, config, train_images):
        if config.augmentation not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {config.augmentation!r}")
        self.kind, self.crop, self.cutout, self.seed = (config.augmentation, config.crop_pixels, config.cutout,
                                                        config.seed)
        n = len(train_images)
        # A constant of the compiled step: which images are mirrored in even epochs.
        self.mirrored_in_even_epochs = np.random.default_rng([config.seed, n]).random(n) < 0.5
        self.mean_pixel = channel_stats(train_images)[0].astype("float32") if config.cutout else None
        self.compiled = self.augment
        if keras.backend.backend() == "tensorflow":
            # XLA fuses these few dozen small ops into a couple of loops (2-10x faster on a CPU), also
            # where the rest of the step runs without XLA (TensorFlow on CPUs: see train.jit_compile).
            import tensorflow as tf
            self.compiled = tf.function(self.augment, jit_compile=True, autograph=False)

    def __call__(self, pixels, index, epoch, batch):
        return self.compiled(pixels, index, epoch, batch)

    def augment(self, pixels, index, epoch, batch):
        # Crops and flips move whole pixels: done on the uint8 images, a quarter of the bytes.
        x = pixels
        seeds = KeyedSeeds(self.seed, epoch[0], batch[0])
        size = ops.shape(x)[0]
        if self.kind == "seed":
            x = seed_warp(ops.cast(x, "float32"), seeds)
        elif self.kind in ("crop_flip", "crop_alternating_flip"):
            if self.kind == "crop_flip":
                mirror = keras.random.uniform((size,), seed=seeds) < 0.5
            else:
                mirror = ops.not_equal(ops.take(ops.convert_to_tensor(self.mirrored_in_even_epochs), index),
                                       ops.equal(ops.mod(epoch, 2), 1))
            # Mirroring first: the same distribution (shifts are symmetric), and XLA fuses it better.
            x = ops.where(mirror[:, None, None, None], ops.flip(x, axis=2), x)
            x = translate(x, self.crop, seeds)
        x = ops.cast(x, "float32")
        if self.cutout:
            x = cutout(x, self.cutout, self.mean_pixel, seeds)
        return x


def translate(images, pixels, seeds):
    """Shift each image by a whole number of pixels in [-pixels, pixels] on each axis, the image
    extended by reflection (c b | a b c d | c b, the edge pixel not repeated: airbench's padding and
    the flip_translate TTA's): a random crop of the padded image."""
    if not pixels:
        return images
    size = ops.shape(images)[0]
    offsets = keras.random.randint((size, 2), 0, 2 * pixels + 1, dtype="int32", seed=seeds)
    # Elementwise selects, which XLA fuses, rather than a gather (several times slower on CPUs):
    # the offset's bits from the highest down, each choosing between two slices one bit apart.
    bits = (2 * pixels).bit_length()
    extra = (1 << bits) - 1 - 2 * pixels  # padding never selected; it makes every halving exact
    x = ops.pad(images, [[0, 0], [pixels, pixels], [pixels, pixels], [0, 0]], mode="reflect")
    x = ops.pad(x, [[0, 0], [0, extra], [0, extra], [0, 0]])
    for axis in (1, 2):
        offset = offsets[:, axis - 1]
        for bit in reversed(range(bits)):
            step = 1 << bit
            length = x.shape[axis] - step
            upper = x[:, step:step + length] if axis == 1 else x[:, :, step:step + length]
            lower = x[:, :length] if axis == 1 else x[:, :, :length]
            x = ops.where(ops.equal(ops.mod(offset // step, 2), 1)[:, None, None, None], upper, lower)
    return x


def cutout(images, size, fill, seeds):
    """One size x size square per image, inside the image, set to `fill` (DeVries & Taylor 2017):
    the network must recognize objects from their parts (the square is zero once normalized)."""
    n, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]
    corners = keras.random.randint((n, 2), 0, height + 1 - size, dtype="int32", seed=seeds)
    rows = ops.arange(height, dtype="int32")[None]
    columns = ops.arange(width, dtype="int32")[None]
    in_rows = (rows >= corners[:, :1]) & (rows < corners[:, :1] + size)
    in_columns = (columns >= corners[:, 1:]) & (columns < corners[:, 1:] + size)
    square = in_rows[:, :, None, None] & in_columns[:, None, :, None]
    return ops.where(square, ops.convert_to_tensor(fill, "float32"), images)


def seed_warp(images, seeds):
    """The seed's augmentation in one bilinear warp: a rotation about the centre by up to
    SEED_ROTATION_DEGREES, a translation by up to SEED_TRANSLATION of the height and width, and a
    horizontal flip with probability 1/2; points outside the image take the nearest edge pixel."""
    n, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]
    angle = keras.random.uniform((n, 1, 1), -1.0, 1.0, seed=seeds) * (SEED_ROTATION_DEGREES * np.pi / 180)
    shift = keras.random.uniform((n, 2, 1, 1), -SEED_TRANSLATION, SEED_TRANSLATION, seed=seeds)
    mirror = keras.random.uniform((n, 1, 1), seed=seeds) < 0.5
    ys, xs = np.meshgrid(np.arange(height, dtype="float32"), np.arange(width, dtype="float32"), indexing="ij")
    cy, cx = (height - 1) / 2, (width - 1) / 2
    # Each output pixel's source: undo the flip, then the translation, then the rotation.
    x = ops.where(mirror, (width - 1) - xs[None], xs[None]) - cx - shift[:, 1] * width
    y = ys[None] - cy - shift[:, 0] * height
    cos, sin = ops.cos(angle), ops.sin(angle)
    source_x = ops.clip(cos * x - sin * y + cx, 0.0, width - 1.0)
    source_y = ops.clip(sin * x + cos * y + cy, 0.0, height - 1.0)
    return bilinear(images, source_y, source_x)


def bilinear(images, source_y, source_x):
    """images [N, H, W, C] sampled at (source_y, source_x) [N, H, W], inside the image."""
    n, height, width, channels = ops.shape(images)[0], images.shape[1], images.shape[2], images.shape[3]
    flat = ops.reshape(images, (n, height * width, channels))
    y0, x0 = ops.floor(source_y), ops.floor(source_x)
    wy, wx = (source_y - y0)[..., None], (source_x - x0)[..., None]
    y0, x0 = ops.cast(y0, "int32"), ops.cast(x0, "int32")
    y1, x1 = ops.minimum(y0 + 1, height - 1), ops.minimum(x0 + 1, width - 1)

    def at(y, x):
        index = ops.reshape(y * width + x, (n, height * width, 1))
        return ops.reshape(ops.take_along_axis(flat, index, axis=1), (n, height, width, channels))
    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


class Augmented(keras.Model):
    """What fit() trains: `network` behind the augmentation step. A training batch is a dict
    (pixels, index, epoch, batch), augmented inside the compiled step; anything else (validation
    pixels, or a dict outside training) goes to the network unaugmented, as float32. It has no
    weights of its own: checkpoints hold the network's (and the optimizer's)."""

    def __init__(self, network, augmentation=None, **kwargs):
        super().__init__(**kwargs)
        self.network, self.augmentation = network, augmentation
        self.built = network.built  # checkpoints can load before fit

    def call(self, inputs, training=False):
        if isinstance(inputs, dict):
            if training and self.augmentation is not None:
                x = self.augmentation(inputs["pixels"], inputs["index"], inputs["epoch"], inputs["batch"])
            else:
                x = ops.cast(inputs["pixels"], "float32")
        else:
            x = ops.cast(inputs, "float32")
        return self.network(x, training=training)
