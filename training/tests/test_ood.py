"""The out-of-distribution score: each method the same in numpy (where it is chosen) and in the
exported graph (where it is served), its figures, and a real export that carries it."""

import json

import numpy as np
import pytest

from training.ship.ood import (METHODS, SHIPPED, Scorer, auroc, choose_threshold, fpr_at_95_tpr,
                               separating_threshold, threshold)
from training.tests.conftest import TINY_SLICE, run_training


def clustered(rng, n=600, dimensions=12):
    """Features around ten class centres, with their labels and logits that favour the class."""
    labels = rng.integers(0, 10, n)
    centres = rng.normal(0, 3, (10, dimensions))
    features = (centres[labels] + rng.normal(0, 1, (n, dimensions))).astype(np.float32)
    logits = (np.eye(10)[labels] * 4 + rng.normal(0, 1, (n, 10))).astype(np.float32)
    return features, labels, logits


@pytest.mark.parametrize("method", METHODS)
def test_every_score_is_the_same_in_the_graph_as_where_it_was_chosen(method):
    import keras
    rng = np.random.default_rng(0)
    features, labels, logits = clustered(rng)
    scorer = Scorer.fit(method, features, labels, logits)
    probe, _, probe_logits = clustered(np.random.default_rng(1), n=50)
    chosen = scorer.score(probe, probe_logits)
    served = keras.ops.convert_to_numpy(scorer.score(keras.ops.convert_to_tensor(probe),
                                                     keras.ops.convert_to_tensor(probe_logits), keras.ops))
    assert chosen.shape == (50,) and np.allclose(served, chosen, rtol=1e-4, atol=1e-4)
    assert (scorer.multiply_adds > 0) == (method not in ("msp", "energy"))


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("msp", "energy")])
def test_feature_scores_rank_far_away_features_above_the_training_ones(method):
    rng = np.random.default_rng(0)
    features, labels, logits = clustered(rng)
    scorer = Scorer.fit(method, features, labels, logits)
    near, _, near_logits = clustered(np.random.default_rng(0), n=600)  # the same centres, new noise
    far = near + rng.normal(0, 8, near.shape).astype(np.float32)
    # The same logits: only the features tell the far ones apart.
    assert auroc(scorer.score(near, near_logits), scorer.score(far, near_logits)) > 0.9


def test_a_sum_of_scores_is_each_standardized_over_the_training_images():
    features, labels, logits = clustered(np.random.default_rng(0))
    combined = Scorer.fit("energy+relative_mahalanobis", features, labels, logits)
    scores = combined.score(features, logits)
    assert abs(scores.mean()) < 1e-3 and 1 < scores.std() <= 2  # two unit-spread parts, correlated or not
    parts = [Scorer.fit(name, features, labels, logits) for name in ("energy", "relative_mahalanobis")]
    expected = sum((p.score(features, logits) - p.score(features, logits).mean()) / p.score(features, logits).std()
                   for p in parts)
    assert np.allclose(scores, expected, atol=1e-4)
    assert combined.multiply_adds == parts[1].multiply_adds


def test_auroc_counts_every_pair_and_the_threshold_flags_five_percent():
    rng = np.random.default_rng(0)
    inside, outside = rng.normal(0, 1, 400), rng.normal(1, 1, 300)
    pairs = (outside[:, None] > inside[None, :]).mean() + 0.5 * (outside[:, None] == inside[None, :]).mean()
    assert auroc(inside, outside) == pytest.approx(pairs)
    assert auroc(inside, inside) == pytest.approx(0.5)
    assert (inside > threshold(inside)).mean() == pytest.approx(0.05, abs=1 / 400)
    assert fpr_at_95_tpr(inside, outside) == pytest.approx((outside <= threshold(inside)).mean())
    with pytest.raises(ValueError, match="unknown out-of-distribution score"):
        Scorer.fit("entropy", inside[:, None], np.zeros(400, int))


def test_the_threshold_separates_in_class_photos_from_outliers_but_never_flags_more_than_five_percent_held_out():
    rng = np.random.default_rng(0)
    inside, outside = rng.normal(0, 1, 4000), rng.normal(3, 1, 4000)
    # Two unit Gaussians 3 apart: the point furthest from chance is halfway.
    assert separating_threshold(inside, outside) == pytest.approx(1.5, abs=0.15)
    held_out = rng.normal(-2, 1, 4000)  # the training images' kind: further from the outliers still
    limit, rule = choose_threshold(held_out, inside, outside)
    assert limit == separating_threshold(inside, outside) and "Youden" in rule
    assert (held_out > limit).mean() < 0.05
    close_held_out = rng.normal(1, 1, 4000)  # the halfway threshold would flag about 31% of these
    limit, rule = choose_threshold(close_held_out, inside, outside)
    assert limit == threshold(close_held_out) and "would flag more" in rule
    assert choose_threshold(held_out) == (threshold(held_out), "flags 5% of the held-out training images")


@pytest.fixture(scope="module")
def exported_with_a_head(small_data_dir, tmp_path_factory):
    """`tiny` with 256 training images held out, so that its export folds in the shipped head."""
    root = tmp_path_factory.mktemp("ood")
    result = run_training("--config", "tiny", "--epochs", 1, "--data", small_data_dir, "--run-dir", root / "run",
                          "--export-base", root / "models", "--validation-size", 256, *TINY_SLICE)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_the_export_serves_the_score_and_its_threshold_in_the_same_call(exported_with_a_head, small_data_dir):
    import tensorflow as tf
    from training.ship.card import read_card
    from training.recipe.contract import SIGNATURE
    from training.run.rundir import saved_config
    from training.run.loop import load_splits
    root = exported_with_a_head
    card = read_card(root / "models" / "1")
    head = card["out_of_distribution"]
    assert head["method"] == SHIPPED and head["multiply_adds"] > 0
    serve = tf.saved_model.load(str(root / "models" / "1")).signatures[SIGNATURE]
    held_out = load_splits(saved_config(root / "run"), small_data_dir, 1024, 256).validation.images
    outputs = serve(images=tf.constant(held_out))
    scores, inside = outputs["ood_score"].numpy(), outputs["in_distribution"].numpy()
    assert scores.shape == inside.shape == (256,) and inside.dtype == bool
    assert (inside == (scores <= head["threshold"])).all()
    # The threshold was chosen on these images: 5% of them are flagged (to rounding in the card).
    assert (~inside).mean() == pytest.approx(0.05, abs=2 / 256)
    noise = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    assert np.median(serve(images=tf.constant(noise))["ood_score"].numpy()) > np.median(scores)
