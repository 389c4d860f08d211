"""Training as users run it: the CLI in a fresh process, on a real slice of CIFAR-10."""

import json

import numpy as np
import pytest

from training.recipe.contract import SIGNATURE, predict_exported
from training.ship.export import existing_versions
from training.tests.conftest import TINY_SLICE as SLICE
from training.tests.conftest import killed_resumed_and_straight, run_training

# tiny_run (conftest): `tiny`, one epoch on SLICE of small_data_dir, exported; shared by the session.


def test_one_epoch_writes_the_whole_run_directory(tiny_run):
    root, result = tiny_run
    run = root / "run"
    for name in ["config.json", "metrics.csv", "history.png", "state.json", "export.json",
                 "evaluation/evaluation.json", "evaluation/report.md", "evaluation/confusion_matrix.png",
                 "evaluation/misclassified.png"]:
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert "epoch 1:" in result.stdout and "test accuracy" in result.stdout
    assert "jit_compile" not in result.stderr  # no fallback: the whole step compiles
    header, row = (run / "metrics.csv").read_text().splitlines()
    assert header.split(",")[:3] == ["epoch", "accuracy", "loss"] and row.startswith("1,")
    evaluation = json.loads((run / "evaluation/evaluation.json").read_text())
    assert evaluation["images"] == 256 and np.sum(evaluation["confusion_matrix"]) == 256
    assert evaluation["dataset"] == "CIFAR-10"
    assert evaluation["robustness"]["dataset"] == "CIFAR-10 test, JPEG q75" and 0 <= evaluation["robustness"]["accuracy"] <= 1


def test_the_export_reloads_and_agrees_with_the_evaluation(tiny_run, small_data_dir):
    import tensorflow as tf
    from training.recipe.data import load_cifar10
    root, _ = tiny_run
    assert existing_versions(root / "models") == [1]
    export = root / "models" / "1"
    signature = tf.saved_model.load(str(export)).signatures[SIGNATURE]
    assert signature.structured_input_signature[1]["images"].dtype == tf.uint8
    _, test = load_cifar10(small_data_dir)
    images = test.images[:256]
    outputs = signature(images=tf.constant(images))
    probabilities = outputs["probabilities"].numpy()
    assert probabilities.shape == (256, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert outputs["classes"].numpy()[0, 6] == b"frog"
    # Same predictions as the Keras model had in the evaluation report.
    matrix = np.zeros((10, 10), int)
    np.add.at(matrix, (test.labels[:256], probabilities.argmax(axis=1)), 1)
    evaluation = json.loads((root / "run/evaluation/evaluation.json").read_text())
    assert matrix.tolist() == evaluation["confusion_matrix"]
    assert np.allclose(predict_exported(export, images, batch_size=100), probabilities, atol=1e-6)


def test_the_export_carries_the_runs_model_card(tiny_run):
    import time
    from training.ship.card import CARD_FILE, read_card
    root, _ = tiny_run
    card = read_card(root / "models" / "1")
    assert card == json.loads((root / "models" / "1" / CARD_FILE).read_text())
    evaluation = json.loads((root / "run/evaluation/evaluation.json").read_text())
    assert card["evaluation"]["accuracy"] == round(evaluation["accuracy"], 4)
    assert card["evaluation"]["ece"] == round(evaluation["ece"], 4) and card["evaluation"]["images"] == 256
    assert card["training"]["config"] == "tiny" and card["training"]["data"] == "CIFAR-10"
    state = (root / "run" / "state.json").stat().st_mtime
    assert card["training"]["date"] == time.strftime("%Y-%m-%d", time.gmtime(state))
    assert card["cost_per_image"]["multiply_adds"] > 0 and card["cost_per_image"]["parameters"] > 0


def test_the_export_stores_each_weight_once(tiny_run, small_data_dir):
    import tensorflow as tf
    from training.recipe.configs import get_config
    from training.recipe.data import load_cifar10
    from training.recipe.models import build_model
    root, _ = tiny_run
    train, _ = load_cifar10(small_data_dir)
    model = build_model(get_config("tiny"), train.images[:1024])
    reader = tf.train.load_checkpoint(str(root / "models" / "1" / "variables" / "variables"))
    stored = sum(int(np.prod(shape)) for shape in reader.get_variable_to_shape_map().values())
    assert model.count_params() <= stored < 1.2 * model.count_params()


def test_the_export_stores_kernels_in_float16_and_serves_what_the_float32_model_computes(small_data_dir, tmp_path):
    import tensorflow as tf
    from training.recipe.configs import get_config
    from training.recipe.data import load_cifar10
    from training.recipe.models import averaged_logits
    from training.ship.export import export_savedmodel
    from training.recipe.models import build_model
    train, test = load_cifar10(small_data_dir)
    model = build_model(get_config("tiny"), train.images[:1024])
    export = export_savedmodel(model, tmp_path, tta="flip")
    reader = tf.train.load_checkpoint(str(export / "variables" / "variables"))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    half = sum(int(np.prod(shapes[name])) for name, dtype in dtypes.items() if dtype == tf.float16)
    assert half == sum(int(np.prod(v.shape)) for v in model.variables if v.path.endswith("/kernel"))
    images = test.images[:200]
    computed = tf.nn.softmax(averaged_logits(model, tf.constant(images, tf.float32), "flip")).numpy()
    served = predict_exported(export, images)
    assert np.abs(served - computed).max() < 1e-3 and not np.array_equal(served, computed)


def test_rerunning_a_finished_run_trains_nothing_and_exports_nothing_new(tiny_run, small_data_dir):
    root, _ = tiny_run
    result = run_training("--config", "tiny", "--epochs", 1, "--data", small_data_dir, "--run-dir", root / "run",
                          "--export-base", root / "models", *SLICE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Epoch 1/1" not in result.stdout and "already exported" in result.stdout
    assert existing_versions(root / "models") == [1]


def test_a_finished_run_exports_another_tta_choice_once_as_a_new_version(tiny_run, small_data_dir, tmp_path):
    import shutil
    from training.recipe.data import load_cifar10
    root, _ = tiny_run
    for name in ("run", "models"):
        shutil.copytree(root / name, tmp_path / name)
    for _ in range(2):
        result = run_training("--config", "tiny", "--data", small_data_dir, "--run-dir", tmp_path / "run",
                              "--export-base", tmp_path / "models", "--tta", "none", *SLICE)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Epoch 1/1" not in result.stdout
    assert existing_versions(tmp_path / "models") == [1, 2]
    exports = json.loads((tmp_path / "run" / "export.json").read_text())
    assert {tta: e["version"] for tta, e in exports.items()} == {"flip": 1, "none": 2}
    _, test = load_cifar10(small_data_dir)
    served = {v: predict_exported(tmp_path / "models" / str(v), test.images[:64]) for v in (1, 2)}
    assert not np.allclose(served[1], served[2], atol=1e-4)


def test_a_run_directory_refuses_a_different_configuration(tiny_run, small_data_dir):
    root, _ = tiny_run
    result = run_training("--config", "fast", "--epochs", 1, "--data", small_data_dir, "--run-dir", root / "run",
                          *SLICE)
    assert result.returncode == 1 and "different configuration" in result.stderr


def test_bfloat16_training_evaluates_and_exports_in_float32(small_data_dir, tmp_path):
    import tensorflow as tf
    from training.recipe.data import load_cifar10
    result = run_training("--config", "tiny", "--precision", "mixed_bfloat16", "--data", small_data_dir,
                          "--run-dir", tmp_path / "run", "--export-base", tmp_path / "models", *SLICE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run/config.json").read_text())["precision"] == "mixed_bfloat16"
    signature = tf.saved_model.load(str(tmp_path / "models/1")).signatures[SIGNATURE]
    graph = signature.graph.as_graph_def()
    nodes = [*graph.node, *(node for function in graph.library.function for node in function.node_def)]
    assert nodes and not [n.name for n in nodes if any(v.type == tf.bfloat16.as_datatype_enum
                                                       for v in n.attr.values())]
    _, test = load_cifar10(small_data_dir)
    probabilities = predict_exported(tmp_path / "models/1", test.images[:256])
    evaluation = json.loads((tmp_path / "run/evaluation/evaluation.json").read_text())
    assert (probabilities.argmax(axis=1) == test.labels[:256]).mean() == pytest.approx(evaluation["accuracy"])


def test_a_run_from_before_a_field_existed_resumes_if_the_field_keeps_its_default(tmp_path):
    from dataclasses import asdict
    from training.recipe.configs import get_config
    from training.run.checkpoints import check_same_config
    older = asdict(get_config("tiny"))
    del older["precision"]
    (tmp_path / "config.json").write_text(json.dumps(older))
    check_same_config(tmp_path, get_config("tiny"))
    (tmp_path / "config.json").write_text(json.dumps(older))
    with pytest.raises(SystemExit, match=r"different configuration \(precision differ\)"):
        check_same_config(tmp_path, get_config("tiny", precision="mixed_bfloat16"))


def test_a_slice_smaller_than_one_batch_is_an_error_not_an_endless_epoch(small_data_dir, tmp_path):
    result = run_training("--config", "fast", "--data", small_data_dir, "--run-dir", tmp_path, "--train-limit", 100)
    assert result.returncode == 1
    assert "error: 100 training images do not fill one batch of 1024" in result.stderr


def test_kill_9_then_resume_ends_where_an_uninterrupted_run_does(small_data_dir, tmp_path):
    common = ["--config", "tiny", "--epochs", 4, "--deterministic", "--data", small_data_dir, *SLICE]
    resumed, straight = killed_resumed_and_straight(tmp_path, 4, *common)
    assert [row["epoch"] for row in resumed] == [1, 2, 3, 4]
    assert len((tmp_path / "resumed/metrics.csv").read_text().splitlines()) == 5
    for a, b in zip(resumed, straight):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["val_accuracy"] == b["val_accuracy"]


def augmented_epochs(split, config, epochs, steps_per_epoch, first_epoch=0):
    """[(images after the augmentation step, their indexes)] per epoch, as training sees them."""
    from training.recipe.augment import Augmentation
    from training.run.loop import training_batches
    augment = Augmentation(config, split.images)
    batches = training_batches(split, config, first_epoch, steps_per_epoch)
    out = []
    for _ in range(epochs):
        steps = [next(batches)[0] for _ in range(steps_per_epoch)]
        out.append((np.concatenate([np.asarray(augment(**inputs)) for inputs in steps]),
                    np.concatenate([inputs["index"] for inputs in steps])))
    return out


def test_alternating_flip_mirrors_each_image_in_every_other_epoch(small_data_dir):
    from dataclasses import replace
    from training.recipe.configs import get_config
    from training.recipe.data import load_cifar10
    train, _ = load_cifar10(small_data_dir)
    split = train.take(128)
    config = replace(get_config("tiny"), augmentation="crop_alternating_flip", crop_pixels=0, batch_size=64)
    epochs = []
    for images, indexes in augmented_epochs(split, config, 3, 2):
        mirrored = {}
        for image, i in zip(images, indexes):
            plain, mirror = np.array_equal(image, split.images[i]), np.array_equal(image, split.images[i][:, ::-1])
            assert plain != mirror, "a symmetric or changed image"
            mirrored[i] = mirror
        epochs.append(mirrored)
    assert all(sorted(epoch) == list(range(128)) for epoch in epochs)
    assert 40 < sum(epochs[0].values()) < 88
    assert all(epochs[0][i] != epochs[1][i] and epochs[0][i] == epochs[2][i] for i in range(128))


def test_crops_are_reflected_whole_pixel_shifts_and_flips_mirror_about_half(small_data_dir):
    from dataclasses import replace
    from training.recipe.configs import get_config
    from training.recipe.data import load_cifar10
    train, _ = load_cifar10(small_data_dir)
    split = train.take(64)
    config = replace(get_config("tiny"), augmentation="crop_flip", crop_pixels=2, batch_size=64)
    (images, indexes), = augmented_epochs(split, config, 1, 1)
    shifts, mirrored = set(), 0
    for image, i in zip(images, indexes):
        found = [(dy, dx, m) for m in (False, True) for dy in range(-2, 3) for dx in range(-2, 3)
                 if np.array_equal(image, np.pad(split.images[i][:, ::-1] if m else split.images[i],
                                                 ((2, 2), (2, 2), (0, 0)), mode="reflect")[2 + dy:34 + dy, 2 + dx:34 + dx])]
        assert found, "not a reflected shift of its image"
        shifts.add(found[0][:2])
        mirrored += found[0][2]
    assert len(shifts) > 12 and 16 < mirrored < 48


def test_cutout_hides_one_square_per_image_under_the_mean_pixel_and_a_resume_hides_the_same(small_data_dir):
    from dataclasses import replace
    from training.recipe.configs import get_config
    from training.recipe.data import channel_stats, load_cifar10
    train, _ = load_cifar10(small_data_dir)
    split = train.take(128)
    config = replace(get_config("tiny"), augmentation="none", cutout=8, batch_size=64)
    mean_pixel = channel_stats(split.images)[0].astype(np.float32)
    epochs = augmented_epochs(split, config, 2, 2)
    corners = [{}, {}]
    for epoch, (images, indexes) in enumerate(epochs):
        for image, i in zip(images, indexes):
            hidden = (image == mean_pixel).all(-1)
            rows, columns = np.flatnonzero(hidden.any(1)), np.flatnonzero(hidden.any(0))
            assert hidden.sum() == 64 and np.ptp(rows) == 7 and np.ptp(columns) == 7
            assert np.array_equal(image[~hidden], split.images[i][~hidden])
            corners[epoch][i] = (rows[0], columns[0])
    assert len(corners[0]) == len(corners[1]) == 128
    assert sum(corners[0][i] != corners[1][i] for i in range(128)) > 100
    (resumed, _), = augmented_epochs(split, config, 1, 2, first_epoch=1)
    assert np.array_equal(resumed, epochs[1][0])


def test_the_seed_augmentation_rotates_shifts_and_flips_by_bilinear_sampling():
    from dataclasses import replace
    from training.recipe.augment import Augmentation, bilinear
    from training.recipe.configs import get_config
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3)).astype(np.float32)
    ys, xs = np.meshgrid(np.arange(32, dtype=np.float32), np.arange(32, dtype=np.float32), indexing="ij")
    assert np.allclose(np.asarray(bilinear(images, *(np.broadcast_to(g, (16, 32, 32)) for g in (ys, xs)))), images)
    half = np.asarray(bilinear(images, np.broadcast_to(ys, (16, 32, 32)), np.broadcast_to(np.minimum(xs + 0.5, 31), (16, 32, 32))))
    assert np.allclose(half[:, :, :31], (images[:, :, :31] + images[:, :, 1:]) / 2, atol=1e-4)
    augment = Augmentation(replace(get_config("tiny"), augmentation="seed"), images.astype(np.uint8))
    index, zeros = np.arange(16, dtype=np.int32), np.zeros(16, np.int32)
    out = np.asarray(augment(images.astype(np.uint8), index, zeros, zeros))
    assert np.array_equal(out, np.asarray(augment(images.astype(np.uint8), index, zeros, zeros)))
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 255
    assert not np.array_equal(out, np.asarray(augment(images.astype(np.uint8), index, zeros, zeros + 1)))


def test_the_training_step_compiles_whole_with_every_augmentation(small_data_dir):
    """Augmentation runs inside the XLA-compiled step: Keras keeps jit_compile=True, no fallback."""
    import warnings
    from dataclasses import replace
    from training.recipe.augment import Augmentation
    from training.recipe.configs import get_config
    from training.recipe.data import load_cifar10
    from training.recipe.models import build_model
    from training.run.loop import training_batches
    from training.run.optimizers import compile_model
    train, _ = load_cifar10(small_data_dir)
    split = train.take(64)
    for augmentation, cutout in (("seed", 0), ("crop_alternating_flip", 8)):
        config = replace(get_config("tiny"), augmentation=augmentation, cutout=cutout, batch_size=32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trained = compile_model(build_model(config, split.images), config, 2, Augmentation(config, split.images),
                                    jit=True)
            history = trained.fit(training_batches(split, config, 0, 2), steps_per_epoch=2, epochs=1, verbose=0)
        assert trained.jit_compile is True
        assert not [w for w in caught if "jit_compile" in str(w.message)]
        assert np.isfinite(history.history["loss"]).all()


def test_lookahead_averages_every_5_steps_from_the_4th_epoch_and_ends_each_epoch_on_the_average():
    import keras
    from training.run.optimizers import Lookahead
    steps_per_epoch, epochs = 4, 7
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8 * steps_per_epoch, 4)).astype("float32")
    y = rng.normal(size=(8 * steps_per_epoch, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    fast = []

    class RecordFastWeights(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            fast.append([np.array(w) for w in self.model.weights])

    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[RecordFastWeights(), Lookahead(steps_per_epoch, steps_per_epoch * epochs)])
    slow, averaged = None, 0
    for step, weights in enumerate(fast, start=1):
        if step > 3 * steps_per_epoch and step % 5 == 0:
            if slow is None:
                slow = weights
            else:
                decay = 0.95 ** 5 * (step / (steps_per_epoch * epochs)) ** 3
                slow = [s + (1 - decay) * (w - s) for s, w in zip(slow, weights)]
                averaged += 1
    assert averaged == 2  # steps 20 and 25; step 15 starts the average
    assert all(np.allclose(s, w) for s, w in zip(slow, model.weights))
    assert not np.allclose(fast[-1][0], model.weights[0])


def test_onecycle_rises_from_its_start_to_the_peak_then_falls_to_its_end():
    from training.run.optimizers import OneCycle
    schedule = OneCycle(2.0, total_steps=100, warmup_fraction=0.25, start=0.2, end=0.1)
    lr = {step: float(schedule(step)) for step in (0, 10, 25, 50, 100)}
    assert lr == pytest.approx({0: 0.4, 10: 0.4 + 1.6 * 10 / 25, 25: 2.0, 50: 0.2 + 1.8 * 50 / 75, 100: 0.2})


def test_the_whitening_bias_learns_for_its_steps_then_stops_while_the_rest_learns_on():
    import keras
    from training.run.optimizers import BiasScaledSGD
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 4, 4, 3)).astype("float32")
    y = rng.normal(size=(48, 1)).astype("float32")
    inputs = keras.Input((4, 4, 3))
    hidden = keras.layers.Conv2D(2, 2, name="whiten")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(keras.layers.Flatten()(hidden)))
    model.compile(BiasScaledSGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.1, whiten_bias_steps=3), "mse")
    history = []

    class RecordWeights(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            history.append({w.path: np.array(w) for w in self.model.weights})

    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[RecordWeights()])
    bias = [step["whiten/bias"] for step in history]
    kernel = [step["head/kernel"] for step in history]
    assert all(not np.allclose(a, b) for a, b in zip([np.zeros(2)] + bias[:2], bias[:3])), "learns for 3 steps"
    assert all(np.array_equal(bias[2], later) for later in bias[3:]), "then neither gradient, momentum nor decay"
    assert all(not np.allclose(a, b) for a, b in zip(kernel[2:], kernel[3:]))
    assert BiasScaledSGD.from_config(model.optimizer.get_config()).whiten_bias_steps == 3


def test_a_run_directory_from_before_the_layout_of_training_resumes_and_exports(small_data_dir, tmp_path):
    """assets/run-before-the-move: `tiny` trained 2 epochs (256 images held out) by the code before
    training/ became recipe/, run/, ship/ and lab/ (the layout of commit c5af57f). The same command with a
    third epoch resumes it and exports it."""
    import shutil
    from pathlib import Path
    old = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "assets" / "run-before-the-move", old)
    result = run_training("--config", "tiny", "--epochs", 3, "--validation-size", 256, *SLICE, "--data", small_data_dir,
                          "--run-dir", old, "--export-base", tmp_path / "models")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {old} after epoch 2/3" in result.stdout and "epoch 3:" in result.stdout
    history = json.loads((old / "state.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert existing_versions(tmp_path / "models") == [1]
    card = json.loads((tmp_path / "models" / "1" / "assets.extra" / "model_card.json").read_text())
    assert card["training"]["config"] == "tiny" and card["training"]["epochs"] == 3
