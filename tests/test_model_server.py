"""TF Serving's gRPC API as the worker sees it, against the session's model server (real or stand-in)."""
import logging
import time

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from scripts.stack import LocalStack, Ports, free_port
from tests.helpers import CLASSES
from worker import contract
from worker.preprocess import preprocess
from worker.tfserving_client import TFServingClient, uint8_tensor


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports.grpc}") as opened:
        yield opened


@pytest.fixture(scope="module")
def client(stack):
    opened = TFServingClient(f"127.0.0.1:{stack.ports.grpc}", "cifar10", timeout_s=30, retries=2)
    yield opened
    opened.close()


def predict_request(images: np.ndarray, name="cifar10", version=None, signature="serving_default"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    uint8_tensor(images, request.inputs["images"])
    return request


def rpc_code(call, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failed:
        call(request, timeout=30)
    return failed.value.code()


def test_predict_batch_through_the_worker_client(client, cifar_test_images):
    images = np.stack([preprocess(data, 40_000_000) for _, data in cifar_test_images[:5]])
    prediction = client.predict(images)
    assert prediction.model_version == 1
    assert prediction.probabilities.shape == (5, 10)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert prediction.labels == [CLASSES] * 5


def test_model_status_reports_the_loaded_version(client, channel):
    assert client.available_versions() == [1]
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "nope"
    assert rpc_code(model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus, request) == grpc.StatusCode.NOT_FOUND


def test_unknown_model_or_version_is_not_found(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    images = np.zeros((1, 32, 32, 3), np.uint8)
    assert rpc_code(stub.Predict, predict_request(images, name="nope")) == grpc.StatusCode.NOT_FOUND
    assert rpc_code(stub.Predict, predict_request(images, version=99)) == grpc.StatusCode.NOT_FOUND
    assert stub.Predict(predict_request(images, version=1), timeout=30).model_spec.version.value == 1


def test_bad_requests_get_tf_serving_codes(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    images = np.zeros((1, 32, 32, 3), np.uint8)
    assert rpc_code(stub.Predict, predict_request(images, signature="nope")) == grpc.StatusCode.FAILED_PRECONDITION
    wrong_dtype = predict_request(images)
    wrong_dtype.inputs["images"].dtype = 1  # DT_FLOAT, with uint8 bytes
    assert rpc_code(stub.Predict, wrong_dtype) == grpc.StatusCode.INVALID_ARGUMENT


def test_metadata_describes_the_serving_signature(channel):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "cifar10"
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    serving = signatures.signature_def["serving_default"]
    assert serving.inputs["images"].dtype == 4  # DT_UINT8
    # The shipped version folds in the out-of-distribution head (docs/ood.md).
    assert set(serving.outputs) == {"probabilities", "classes", "ood_score", "in_distribution"}
    assert serving.outputs["in_distribution"].dtype == 10  # DT_BOOL
    assert response.model_spec.version.value == 1


def test_client_retries_unavailable_then_gives_up(caplog):
    closed = TFServingClient(f"127.0.0.1:{free_port()}", "cifar10", timeout_s=5, retries=2, backoff_s=0.01)
    with caplog.at_level(logging.WARNING, logger="worker.tfserving_client"), pytest.raises(grpc.RpcError) as failed:
        closed.predict(np.zeros((1, 32, 32, 3), np.uint8))
    closed.close()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sum("retry" in record.message for record in caplog.records) == 2


def test_predict_waits_until_its_deadline_for_a_model_server_coming_back(stack, tmp_path):
    """A worker's channel backs off after a refused connection; a job's Predict waits for it to
    connect again instead of failing while the model server is up again."""
    port = free_port()
    client = TFServingClient(f"127.0.0.1:{port}", "cifar10", timeout_s=5, retries=2, backoff_s=0.01)
    with pytest.raises(grpc.RpcError) as refused:
        client.available_versions()  # nothing listens yet: the channel goes into its reconnect backoff
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and not client.connected()
    again = LocalStack(tmp_path, Ports(gateway=0, redis=0, grpc=port, worker_metrics=0), stack.model_base_path)
    again.start_model_server()
    try:
        prediction = client.predict(np.zeros((2, 32, 32, 3), np.uint8), deadline=time.time() + 120)
        assert prediction.probabilities.shape == (2, 10) and client.connected()
    finally:
        again.stop_all()
        client.close()


def test_the_served_signature_meets_the_workers_contract(client):
    signature = client.signature(1)
    assert contract.violations(signature) == []
    versions = contract.ModelVersions(client)
    assert versions.refresh() == 1 and versions.rejected(versions.available) == {}
    assert versions.predict(np.zeros((2, 32, 32, 3), np.uint8)).probabilities.shape == (2, 10)


@pytest.mark.parametrize("breakage, problem", [
    (lambda s: s.outputs.pop("probabilities"), "no output 'probabilities' (has classes, in_distribution, ood_score)"),
    (lambda s: setattr(s.inputs["images"], "dtype", 1), "input 'images' is float32 [-1, 32, 32, 3], expected uint8"),
    (lambda s: s.outputs["probabilities"].tensor_shape.dim[1].__setattr__("size", 100),
     "output 'probabilities' is float32 [-1, 100], expected float32 [-1, 10]"),
    (lambda s: s.inputs["mask"].CopyFrom(s.inputs["images"]), "extra inputs the worker does not send: mask"),
])
def test_contract_violations_are_named(client, breakage, problem):
    signature = type(client.signature(1))()
    signature.CopyFrom(client.signature(1))
    breakage(signature)
    assert any(found.startswith(problem) for found in contract.violations(signature)), contract.violations(signature)
