"""Do the probabilities mean what they say? Expected calibration error, negative log-likelihood,
and temperature scaling (Guo et al. 2017): one scalar T, fitted on the validation split, divides
the logits. T leaves every prediction's ranking, hence accuracy, unchanged.
"""

import numpy as np

from training.recipe.models import log_probabilities

ECE_BINS = 15


def log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def nll(logits, labels, temperature=1.0):
    """Mean negative log-likelihood of the true labels under softmax(logits / T)."""
    return float(-log_softmax(np.asarray(logits, np.float64) / temperature)[np.arange(len(labels)), labels].mean())


def reliability(probabilities, labels, bins=ECE_BINS):
    """Per equal-width confidence bin: (count, mean confidence, accuracy) of its top-1 predictions."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(index, minlength=bins)
    mean_confidence = np.bincount(index, confidence, bins) / np.maximum(count, 1)
    accuracy = np.bincount(index, correct, bins) / np.maximum(count, 1)
    return count, mean_confidence, accuracy


def expected_calibration_error(probabilities, labels, bins=ECE_BINS):
    """The count-weighted mean gap between confidence and accuracy over the bins."""
    count, confidence, accuracy = reliability(probabilities, labels, bins)
    return float((count * np.abs(confidence - accuracy)).sum() / count.sum())


def fit_temperature(logits, labels, low=0.05, high=20.0):
    """The T that minimizes the NLL of softmax(logits / T): a golden-section search over log T
    (the NLL is convex in 1/T, so unimodal here)."""
    logits = np.asarray(logits, np.float64)
    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if nll(logits, labels, np.exp(c)) < nll(logits, labels, np.exp(d)):
            b = d
        else:
            a = c
    return float(np.exp((a + b) / 2))


def softmax(logits, temperature=1.0):
    return np.exp(log_softmax(np.asarray(logits, np.float64) / temperature))


def summary(probabilities, labels):
    return {"ece": expected_calibration_error(probabilities, labels),
            "nll": nll(log_probabilities(probabilities), labels),
            "mean_confidence": float(probabilities.max(axis=1).mean()),
            "accuracy": float((probabilities.argmax(axis=1) == labels).mean())}
