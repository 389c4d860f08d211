"""Calibration measures and temperature scaling, on synthetic predictions with a known truth."""

import numpy as np
import pytest

from training.recipe.data import validation_indexes
from training.recipe.models import log_probabilities
from training.ship.calibration import expected_calibration_error, fit_temperature, nll, reliability, softmax, summary


def sampled(temperature, n=40000, seed=0):
    """Logits, and labels drawn from softmax(logits / temperature): those logits are calibrated
    exactly at that temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 10))
    probabilities = softmax(logits, temperature)
    labels = (probabilities.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)
    return logits, labels


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_at():
    for true_temperature in (0.5, 2.0):
        logits, labels = sampled(true_temperature)
        assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.05)


def test_temperature_scaling_removes_the_calibration_error_and_lowers_the_nll():
    logits, labels = sampled(2.0)
    overconfident = softmax(logits)
    assert expected_calibration_error(overconfident, labels) > 0.1
    temperature = fit_temperature(logits, labels)
    assert expected_calibration_error(softmax(logits, temperature), labels) < 0.01
    assert nll(logits, labels, temperature) < nll(logits, labels)


def test_ece_is_the_count_weighted_gap_between_confidence_and_accuracy():
    # Two images at 0.95 confidence, one right (bin accuracy 0.5), one image at 0.55, right.
    probabilities = np.full((3, 10), 0.005)
    probabilities[0, 0] = probabilities[1, 0] = 0.955
    probabilities[2, 1] = 0.555
    labels = np.array([0, 2, 1])
    count, confidence, accuracy = reliability(probabilities, labels)
    assert count.sum() == 3 and count[14] == 2 and count[8] == 1
    assert accuracy[14] == 0.5 and accuracy[8] == 1.0
    expected = (2 * abs(0.955 - 0.5) + abs(0.555 - 1.0)) / 3
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected)


def test_summary_reads_logits_back_from_probabilities():
    logits, labels = sampled(1.0, n=1000)
    probabilities = softmax(logits)
    assert np.allclose(softmax(log_probabilities(probabilities)), probabilities)
    figures = summary(probabilities, labels)
    assert figures["nll"] == pytest.approx(nll(logits, labels))
    assert figures["accuracy"] == pytest.approx((probabilities.argmax(axis=1) == labels).mean())


def test_the_validation_split_holds_out_every_class_equally_and_is_fixed_by_its_seed():
    labels = np.repeat(np.arange(10), 100)[np.random.default_rng(1).permutation(1000)]
    kept, held = validation_indexes(labels, 200, seed=0)
    assert len(held) == 200 and len(kept) == 800
    assert np.intersect1d(kept, held).size == 0 and np.union1d(kept, held).size == 1000
    assert (np.bincount(labels[held], minlength=10) == 20).all()
    assert np.array_equal(held, np.sort(held)) and np.array_equal(kept, np.sort(kept))
    assert np.array_equal(validation_indexes(labels, 200, seed=0)[1], held)
    assert not np.array_equal(validation_indexes(labels, 200, seed=1)[1], held)
