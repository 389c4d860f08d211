"""Outlier exposure: images of none of the ten classes join the training batches without a label,
and the network learns to spread its softmax over them."""

from dataclasses import replace

import numpy as np
import pytest

from training.tests.conftest import TINY_SLICE, run_training


def outlier_images(n, seed=0):
    """Plain colours, stripes and noise: easy to tell from CIFAR-10's photos."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 32, 32, 3), np.uint8)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            images[i] = rng.integers(0, 256, 3, dtype=np.uint8)
        elif kind == 1:
            stripes = (np.arange(32) // rng.integers(1, 5) % 2 * 255).astype(np.uint8)
            images[i] = stripes[None, :, None] if i % 2 else stripes[:, None, None]
        else:
            images[i] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return images


def test_outliers_and_photos_join_every_batch_and_leave_the_training_rows_as_they_were():
    from training.recipe.configs import get_config
    from training.recipe.data import Split
    from training.run.loop import training_batches
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 200, (96, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 96))
    teacher = rng.normal(0, 1, (96, 10)).astype(np.float32)
    # 16 outliers (pixel value 200-215) and 4 labelled photos (value 216-219, classes 3, 4, 5, 6)
    images = np.zeros((20, 32, 32, 3), np.uint8) + np.arange(200, 220, dtype=np.uint8)[:, None, None, None]
    labels = np.array([-1] * 16 + [3, 4, 5, 6])
    config = replace(get_config("tiny"), batch_size=32, outlier_batch=8)
    plain = training_batches(split, config, 0, 3, teacher)
    mixed = training_batches(split, config, 0, 3, teacher, (images, labels))
    again = training_batches(split, config, 0, 3, teacher, (images, labels))
    seen = set()
    for _ in range(6):  # two epochs
        (x, y), (x_plain, y_plain), (x_again, y_again) = next(mixed), next(plain), next(again)
        assert len(y) == 40 and y.shape[1] == 20 and all(len(v) == 40 for v in x.values())
        value = x["pixels"][:, 0, 0, 0]
        extra = value >= 200
        assert extra.sum() == 8 and not extra[-8:].all()  # shuffled in, not appended
        outlier, photo = extra & (value < 216), extra & (value >= 216)
        assert (y[outlier] == 0).all()
        assert np.array_equal(y[photo, :10].argmax(axis=1), value[photo] - 216 + 3) and (y[photo, 10:] == 0).all()
        seen |= set(value[extra])
        order = np.argsort(x["index"][~extra])
        assert np.array_equal(x["pixels"][~extra][order], x_plain["pixels"][np.argsort(x_plain["index"])])
        assert np.array_equal(y[~extra][order], y_plain[np.argsort(x_plain["index"])])
        assert np.array_equal(x["pixels"], x_again["pixels"]) and np.array_equal(y, y_again)  # resumable
    assert seen == set(range(200, 220))


def test_the_outliers_loss_is_their_cross_entropy_to_uniform_and_the_rest_ignores_them():
    import keras
    from training.ship.calibration import softmax
    from training.run.distill import Distiller
    student_logits = np.array([[2.0, 0.5, -1.0] + [0.0] * 7, [4.0, -2.0] + [0.0] * 8], np.float32)
    teacher_logits = np.array([[0.0, 3.0, 1.0] + [-1.0] * 7, [0.0] * 10])
    labels = np.stack([np.eye(10)[0], np.zeros(10)])
    alpha, t, weight = 0.3, 4.0, 0.5
    distiller = Distiller(keras.Sequential([keras.layers.Identity()]), alpha, t, outlier_weight=weight)
    y = np.concatenate([labels, teacher_logits], axis=1).astype("float32")
    loss = float(distiller.compute_loss(y=y, y_pred=student_logits))
    hard = -np.log(softmax(student_logits[:1])[0, 0])
    p, q = softmax(teacher_logits[:1], t)[0], softmax(student_logits[:1], t)[0]
    soft = np.sum(p * np.log(p / q))
    to_uniform = -np.mean(np.log(softmax(student_logits[1:])[0]))
    assert loss == pytest.approx(alpha * hard + (1 - alpha) * t ** 2 * soft + weight * to_uniform, rel=1e-4)
    # Without a teacher (labels and outliers only), and for batches without outliers (validation):
    assert float(distiller.compute_loss(y=labels.astype("float32"), y_pred=student_logits)) \
        == pytest.approx(hard + weight * to_uniform, rel=1e-4)
    assert float(distiller.compute_loss(y=y[:1], y_pred=student_logits[:1])) \
        == pytest.approx(alpha * hard + (1 - alpha) * t ** 2 * soft, rel=1e-4)
    # A labelled photo from outside CIFAR-10 (no teacher logits) weighs as a labelled image, on its label.
    photo = np.concatenate([np.eye(10)[[1]], np.zeros((1, 10))], axis=1).astype("float32")
    photo_hard = -np.log(softmax(student_logits[1:])[0, 1])
    assert float(distiller.compute_loss(y=np.concatenate([y, photo]), y_pred=student_logits[[0, 1, 1]])) \
        == pytest.approx((alpha * hard + (1 - alpha) * t ** 2 * soft + photo_hard) / 2 + weight * to_uniform, rel=1e-4)


def test_the_training_accuracy_counts_the_labelled_rows_only():
    import keras
    from training.recipe.configs import get_config
    from training.run.optimizers import compile_model
    config = replace(get_config("tiny"), outliers="some/folder", outlier_batch=2)
    model = compile_model(keras.Sequential([keras.Input((10,)), keras.layers.Identity()]), config, 10, jit=False)
    labels = np.concatenate([np.eye(10)[[1, 2]], np.zeros((2, 10))]).astype("float32")
    for predicted, accuracy in (([1, 2, 0, 0], 1.0), ([1, 2, 5, 5], 1.0), ([1, 3, 5, 5], 0.5)):
        pixels = np.eye(10)[predicted].astype("float32")
        assert model.evaluate(pixels, labels, verbose=0, return_dict=True)["accuracy"] == accuracy


def test_a_network_trained_with_outliers_is_unsure_of_them_and_one_without_is_not(small_data_dir, tmp_path):
    from PIL import Image
    from training.recipe.configs import get_config
    from training.recipe.images import load_image_folder
    from training.run.loop import load_splits
    from training.run.rundir import network_from_run
    from training.ship.calibration import softmax
    folder = tmp_path / "outliers" / "made"
    folder.mkdir(parents=True)
    for i, image in enumerate(outlier_images(120)):
        Image.fromarray(image).resize((48, 40)).save(folder / f"{i:03d}.png")
    unseen = outlier_images(60, seed=1)  # not trained on: the same kinds
    common = ["--config", "tiny", "--epochs", 4, "--validation-size", 256, *TINY_SLICE, "--data", small_data_dir,
              "--trial", "--deterministic"]
    runs = {}
    for name, extra in (("exposed", ["--outliers", tmp_path / "outliers", "--outlier-batch", 16, "--outlier-weight", 0.1]), ("plain", [])):
        result = run_training(*common, *extra, "--run-dir", tmp_path / name)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = result
    assert "outlier exposure: 120 images" in runs["exposed"].stdout
    assert len(load_image_folder(tmp_path / "outliers")[0]) == 120
    config = get_config("tiny", validation_size=256)
    splits = load_splits(config, small_data_dir, train_limit=1024)
    train, held_out = splits.train, splits.validation
    confidence, accuracy = {}, {}
    for name in runs:
        model, _ = network_from_run(config, tmp_path / name, train.images)
        confidence[name] = softmax(model.predict(unseen.astype("float32"), verbose=0)).max(axis=1).mean()
        accuracy[name] = (model.predict(held_out.images.astype("float32"), verbose=0).argmax(axis=1)
                          == held_out.labels).mean()
    assert confidence["exposed"] < 0.2 < confidence["plain"], confidence
    assert min(accuracy.values()) > 0.13, accuracy  # both still tell the ten classes apart (chance: 0.10)
