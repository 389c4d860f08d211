"""The model card: written by the export beside the SavedModel and as its `model_card` signature,
added to the shipped versions without changing what they serve."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from training.ship.card import CARD_FILE, CARD_SIGNATURE, add_card, build_card, prove_identical, read_card, signature_contract

REPO = Path(__file__).resolve().parents[2]
EVALUATION = {"dataset": "CIFAR-10", "images": 256, "accuracy": 0.123456, "ece": 0.0456789,
              "temperature": 0.75,
              "robustness": {"dataset": "CIFAR-10 test, JPEG q75", "accuracy": 0.111111, "ece": 0.0512345}}


@pytest.fixture(scope="module")
def tiny(small_data_dir):
    from training.recipe.configs import get_config
    from training.recipe.data import load_cifar10
    from training.recipe.models import build_model
    train, test = load_cifar10(small_data_dir)  # data_dir's first images
    config = get_config("tiny")
    return config, build_model(config, train.images[:1024]), test.images[:300]


def test_the_export_carries_the_card_as_a_signature_and_a_file_and_serves_the_same(tiny, tmp_path):
    from training.ship.cost import multiply_adds, parameters
    from training.recipe.contract import predict_exported
    from training.ship.card import export_with_card
    from training.ship.export import export_savedmodel
    config, model, images = tiny
    card = build_card(asdict(config), EVALUATION, "2026-11-27")
    plain = export_savedmodel(model, tmp_path / "plain", tta="flip")
    carded = export_with_card(model, tmp_path / "carded", card, tta="flip")

    served = read_card(carded)
    assert served == json.loads((carded / CARD_FILE).read_text())
    assert served["cost_per_image"] == {"multiply_adds": multiply_adds(plain), "parameters": parameters(plain)}
    assert served["cost_per_image"]["multiply_adds"] > 0 and served["cost_per_image"]["parameters"] > 0
    assert served["classes"][6] == "frog" and len(served["classes"]) == 10
    assert served["evaluation"] == {"dataset": "CIFAR-10", "split": "test", "images": 256,
                                    "accuracy": 0.1235, "ece": 0.0457,
                                    "robustness": {"dataset": "CIFAR-10 test, JPEG q75", "accuracy": 0.1111,
                                                   "ece": 0.0512}}
    assert served["training"]["config"] == "tiny" and served["training"]["date"] == "2026-11-27"
    assert served["training"]["data"] == "CIFAR-10" and served["training"]["temperature"] == 0.75
    assert served["training"]["test_time_augmentation"] == config.tta and served["training"]["epochs"] == config.epochs
    # The card changes nothing that is served: same contract, weights and outputs, bit for bit.
    assert signature_contract(carded) == signature_contract(plain)
    assert prove_identical(plain, carded, images) == []
    assert np.array_equal(predict_exported(plain, images), predict_exported(carded, images))


def test_a_card_is_added_to_an_old_version_only_if_it_serves_the_same(tiny, tmp_path):
    import tensorflow as tf
    from training.recipe.contract import predict_exported
    from training.ship.export import export_savedmodel
    config, model, images = tiny
    old = export_savedmodel(model, tmp_path, tta="none")
    before = predict_exported(old, images)
    card = build_card(asdict(config), EVALUATION, "2026-11-01", {"multiply_adds": 1, "parameters": 2})
    assert add_card(old, card, images) == old.resolve()
    assert read_card(old) == card and json.loads((old / CARD_FILE).read_text()) == card
    assert set(tf.saved_model.load(str(old)).signatures) == {"serving_default", CARD_SIGNATURE}
    assert np.array_equal(predict_exported(old, images), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # no staging or replaced copy left behind

    # The proof catches a version that would serve anything else.
    other = export_savedmodel(model, tmp_path, tta="flip")
    problems = prove_identical(old, other, images)
    assert any("probabilities differ" in p for p in problems) and any("multiply-adds" in p for p in problems)


# Figures from training/results: each version's evaluation report; the multiply-adds of versions 3
# and 4 include their out-of-distribution head's (151,296 and 1,188,096).
OLD_OUTPUTS = {"probabilities": (1, [-1, 10]), "classes": (7, [-1, 10])}
OOD_OUTPUTS = {**OLD_OUTPUTS, "ood_score": (1, [-1]), "in_distribution": (10, [-1])}


@pytest.mark.parametrize("version,record,accuracy,config,data,cost,outputs", [
    (2, "jpeg-copy/student/evaluation", 0.8962, "student", "CIFAR-10 (JPEG copy)",
     {"multiply_adds": 54334624, "parameters": 1124056}, OLD_OUTPUTS),
    (3, "default/evaluation", 0.9557, "default", "CIFAR-10",
     {"multiply_adds": 2470410432, "parameters": 7412664}, OOD_OUTPUTS),
    (4, "student/evaluation", 0.9369, "student", "CIFAR-10",
     {"multiply_adds": 91162912, "parameters": 1531192}, OOD_OUTPUTS),
])
def test_the_shipped_versions_carry_their_cards(version, record, accuracy, config, data, cost, outputs):
    export = REPO / "models" / "cifar10" / str(version)
    card = read_card(export)
    assert card == json.loads((export / CARD_FILE).read_text())
    evaluation = json.loads((REPO / "training" / "results" / record / "evaluation.json").read_text())
    assert card["evaluation"]["accuracy"] == accuracy == round(evaluation["accuracy"], 4)
    assert card["evaluation"]["ece"] == round(evaluation["ece"], 4)
    assert card["training"]["config"] == config and card["training"]["data"] == data
    assert card["cost_per_image"] == cost
    assert ("out_of_distribution" in card) == ("ood_score" in outputs)
    contract = signature_contract(export)
    assert contract["inputs"] == {"images": (4, [-1, 32, 32, 3])}  # uint8
    assert contract["outputs"] == outputs
