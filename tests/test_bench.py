"""The serving benchmark: its yardstick (the seed app's structure: one Flask process, a Keras model
loaded from .h5, predict per request), for real, and its load generator, wrk."""
import pytest
import requests

from scripts.bench_serve import measure, scenarios, start_reference_server
from tests.helpers import CLASSES, asset, post_images


@pytest.fixture(scope="module")
def reference():
    process, url = start_reference_server()
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_reference_server_answers_like_the_seed(reference):
    body = post_images(reference, [asset("frog.jpg")]).json()
    assert body["success"] is True
    probabilities = [p["probability"] for p in body["predictions"]]
    assert sorted(p["label"] for p in body["predictions"]) == sorted(CLASSES)
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1, abs=1e-4)
    assert requests.post(f"{reference}/predict", files={"image": ("x.txt", b"nope")}, timeout=30).status_code == 400


def test_a_measured_step_counts_only_answered_requests(reference, capsys):
    rates = measure(reference, {"png-32x32": scenarios(1)["png-32x32"]}, [2], seconds=3.0, metrics_urls=[])
    assert rates["png-32x32", 2] > 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == "png-32x32" and row[1] == "2" and row[8] == "0"  # no errors
    assert row[-1].endswith("%")  # the load generator's own CPU
