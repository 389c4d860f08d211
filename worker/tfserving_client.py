"""The one gRPC client for TF Serving: Predict, GetModelStatus and GetModelMetadata, with deadlines and retries."""
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np
# TensorFlow itself is never started: tensors are built and read as raw bytes.
from worker.serving_apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                 prediction_service_pb2_grpc)

log = logging.getLogger(__name__)

DT_UINT8 = 4  # tensorflow.DataType enum values
DT_FLOAT = 1
DT_STRING = 7
INPUT_NAME = "images"  # the SavedModel contract: images uint8 [N,32,32,3] -> probabilities, classes
CARD_SIGNATURE, CARD_OUTPUT = "model_card", "card"  # no input -> the model card, a JSON string scalar
CHANNEL_OPTIONS = [
    # Reconnect within a second once the model server is back, instead of gRPC's default of up to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


@dataclass(frozen=True)
class Prediction:
    model_version: int
    labels: list[list[str]]  # per image, in the order of its probabilities
    probabilities: np.ndarray  # float32 [N, num_classes]


def uint8_tensor(images: np.ndarray, request_tensor) -> None:
    request_tensor.dtype = DT_UINT8
    for size in images.shape:
        request_tensor.tensor_shape.dim.add(size=size)
    request_tensor.tensor_content = np.ascontiguousarray(images, dtype=np.uint8).tobytes()


def float_array(tensor) -> np.ndarray:
    shape = [d.size for d in tensor.tensor_shape.dim]
    # TF Serving may answer with packed tensor_content or with the repeated float_val field.
    values = np.frombuffer(tensor.tensor_content, dtype=np.float32) if tensor.tensor_content \
        else np.asarray(tensor.float_val, dtype=np.float32)
    return values.reshape(shape)


def string_rows(tensor, rows: int) -> list[list[str]]:
    values = [v.decode() for v in tensor.string_val]
    width = len(values) // rows
    return [values[i * width:(i + 1) * width] for i in range(rows)]


class TFServingClient:
    def __init__(self, address: str, model_name: str, timeout_s: float, retries: int, backoff_s: float = 0.05):
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def predict(self, images: np.ndarray, version: int | None = None) -> Prediction:
        """Class probabilities for a uint8 [N, 32, 32, 3] batch, from `version` (default: the latest)."""
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = "serving_default"
        if version is not None:
            request.model_spec.version.value = version
        uint8_tensor(images, request.inputs[INPUT_NAME])
        response = self.call(self.predictions.Predict, request)
        return Prediction(
            model_version=response.model_spec.version.value,
            labels=string_rows(response.outputs["classes"], len(images)),
            probabilities=float_array(response.outputs["probabilities"]),
        )

    def available_versions(self) -> list[int]:
        """Versions of the model in state AVAILABLE (empty if none is loaded)."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        try:
            response = self.call(self.models.GetModelStatus, request, retries=0)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise
        return sorted(s.version for s in response.model_version_status
                      if s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE)

    def signatures(self, version: int) -> dict:
        """The version's SignatureDefs by name (GetModelMetadata)."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = self.model_name
        request.model_spec.version.value = version
        response = self.call(self.predictions.GetModelMetadata, request, retries=0)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        return dict(signatures.signature_def)

    def signature(self, version: int):
        """The version's `serving_default` SignatureDef, None if it has none."""
        return self.signatures(version).get("serving_default")

    def model_card(self, version: int) -> str:
        """The version's model card, a JSON text: Predict on its `model_card` signature, which
        takes no input (training/card.py writes it)."""
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = CARD_SIGNATURE
        request.model_spec.version.value = version
        response = self.call(self.predictions.Predict, request, retries=0)
        if CARD_OUTPUT not in response.outputs or len(response.outputs[CARD_OUTPUT].string_val) != 1:
            raise ValueError(f"the {CARD_SIGNATURE} signature did not answer one string '{CARD_OUTPUT}'")
        return response.outputs[CARD_OUTPUT].string_val[0].decode()

    def call(self, method, request, retries: int | None = None):
        """One RPC with a deadline per attempt, retried with exponential backoff while UNAVAILABLE."""
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return method(request, timeout=self.timeout_s)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == retries:
                    raise
                delay = self.backoff_s * 2 ** attempt
                log.warning("model server unavailable (%s); retry %d in %.2f s", exc.details(), attempt + 1, delay)
                time.sleep(delay)

    def close(self) -> None:
        self.channel.close()
