"""Fewer test-time views from the shipped flip_translate SavedModel alone."""

import numpy as np
import pytest

from training.tests.conftest import REPO

TEACHER = REPO / "models" / "cifar10" / "3"
# Images export_views rebuilds the original's six-view probabilities on before it writes: a graph
# it misreads differs on every image. (The CLI checks 64; each costs six passes of the shipped net.)
CHECK_IMAGES = 16


@pytest.fixture(scope="module")
def reexported(tmp_path_factory, small_data_dir):
    from training.recipe.data import load_cifar10
    from training.ship.views import export_views
    train, _ = load_cifar10(small_data_dir)  # data_dir's first training images
    base = tmp_path_factory.mktemp("views")
    return {tta: export_views(TEACHER, tta, base, train.images[:CHECK_IMAGES]) for tta in ("none", "flip")}, train


def test_one_view_and_its_mirror_average_to_the_flip_export(reexported):
    from training.recipe.models import log_probabilities
    from training.ship.calibration import softmax
    from training.recipe.contract import predict_exported
    exports, train = reexported
    assert [p.name for p in exports.values()] == ["1", "2"]
    images = train.images[100:164]
    single = log_probabilities(predict_exported(exports["none"], images))
    mirrored = log_probabilities(predict_exported(exports["none"], images[:, :, ::-1]))
    assert np.allclose(softmax((single + mirrored) / 2), predict_exported(exports["flip"], images), atol=1e-5)
    assert not np.allclose(single, mirrored, atol=1e-3)


def test_each_view_costs_a_sixth_of_the_original(reexported):
    from training.ship.cost import multiply_adds
    exports, _ = reexported
    full = multiply_adds(TEACHER)
    # The original also runs its out-of-distribution head, which views drop: its one matrix
    # product, the 384 x 384 whitening of the penultimate features (the graph counts products).
    assert multiply_adds(exports["none"]) * 6 == multiply_adds(exports["flip"]) * 3 == full - 384 * 384


def test_a_flip_export_is_refused_by_name(tiny_run):
    from training.ship.views import view_functions
    root, _ = tiny_run  # conftest: tiny, exported with its flip TTA
    with pytest.raises(ValueError, match="expected the 6 network calls of a flip_translate export, found 2"):
        view_functions(root / "models" / "1")
