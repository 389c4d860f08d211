"""The one gRPC client for TF Serving: Predict, GetModelStatus and GetModelMetadata, with deadlines and retries."""
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np
# Tensors are built and read as raw bytes: no TensorFlow in this process.
from worker.serving_apis import GET_MODEL_METADATA, GET_MODEL_STATUS, PREDICT, SIGNATURE_DEF_MAP, apis, rpc

log = logging.getLogger(__name__)

DT_UINT8 = 4  # tensorflow.DataType enum values
DT_FLOAT = 1
DT_STRING = 7
DT_BOOL = 10
INPUT_NAME = "images"  # the SavedModel contract: images uint8 [N,32,32,3] -> probabilities, classes
OOD_SCORE, IN_DISTRIBUTION = "ood_score", "in_distribution"  # [N] each, in versions exported with them
CARD_SIGNATURE, CARD_OUTPUT = "model_card", "card"  # no input -> the model card, a JSON string scalar
CHANNEL_OPTIONS = [
    # Reconnect within half a second once the model server is back, instead of gRPC's default of up
    # to 2 minutes (make chaos: every answer a 200 within 2 s of a restarted server listening).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


@dataclass(frozen=True)
class Prediction:
    model_version: int
    labels: list[list[str]]  # per image, in the order of its probabilities
    probabilities: np.ndarray  # float32 [N, num_classes]
    ood_scores: np.ndarray | None = None  # float32 [N], higher: less like the training images
    in_distribution: np.ndarray | None = None  # bool [N], the score at most the version's threshold


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


def bool_array(tensor) -> np.ndarray:
    shape = [d.size for d in tensor.tensor_shape.dim]
    values = np.frombuffer(tensor.tensor_content, dtype=np.bool_) if tensor.tensor_content \
        else np.asarray(tensor.bool_val, dtype=np.bool_)
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
        self.state = grpc.ChannelConnectivity.IDLE
        self.channel.subscribe(self._track, try_to_connect=True)
        self.predict_rpc = rpc(self.channel, PREDICT, apis.PredictRequest, apis.PredictResponse)
        self.metadata_rpc = rpc(self.channel, GET_MODEL_METADATA, apis.GetModelMetadataRequest,
                                apis.GetModelMetadataResponse)
        self.status_rpc = rpc(self.channel, GET_MODEL_STATUS, apis.GetModelStatusRequest, apis.GetModelStatusResponse)

    def _track(self, state: grpc.ChannelConnectivity) -> None:
        self.state = state

    def connected(self) -> bool:
        """Whether the channel to the model server is up (not connecting, nor backing off)."""
        return self.state == grpc.ChannelConnectivity.READY

    def predict(self, images: np.ndarray, version: int | None = None, deadline: float | None = None) -> Prediction:
        """Class probabilities for a uint8 [N, 32, 32, 3] batch, from `version` (default: the latest).
        Until `deadline` (time.time()), a channel still (re)connecting is waited for and an
        UNAVAILABLE answer retried: the model server may have just come back."""
        request = apis.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = "serving_default"
        if version is not None:
            request.model_spec.version.value = version
        uint8_tensor(images, request.inputs[INPUT_NAME])
        response = self.call(self.predict_rpc, request, until=deadline)
        outputs = response.outputs
        with_ood = OOD_SCORE in outputs and IN_DISTRIBUTION in outputs
        return Prediction(
            model_version=response.model_spec.version.value,
            labels=string_rows(outputs["classes"], len(images)),
            probabilities=float_array(outputs["probabilities"]),
            ood_scores=float_array(outputs[OOD_SCORE]) if with_ood else None,
            in_distribution=bool_array(outputs[IN_DISTRIBUTION]) if with_ood else None,
        )

    def available_versions(self) -> list[int]:
        """Versions of the model in state AVAILABLE (empty if none is loaded)."""
        request = apis.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        try:
            response = self.call(self.status_rpc, request, retries=0)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise
        return sorted(s.version for s in response.model_version_status
                      if s.state == apis.ModelVersionStatus.AVAILABLE)

    def signatures(self, version: int) -> dict:
        """The version's SignatureDefs by name (GetModelMetadata)."""
        request = apis.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = self.model_name
        request.model_spec.version.value = version
        response = self.call(self.metadata_rpc, request, retries=0)
        packed = response.metadata["signature_def"]
        if packed.type_url != SIGNATURE_DEF_MAP:
            raise ValueError(f"GetModelMetadata answered {packed.type_url or 'nothing'} for signature_def")
        return dict(apis.SignatureDefMap.FromString(packed.value).signature_def)

    def signature(self, version: int):
        """The version's `serving_default` SignatureDef, None if it has none."""
        return self.signatures(version).get("serving_default")

    def model_card(self, version: int) -> str:
        """The version's model card, a JSON text: Predict on its `model_card` signature, which
        takes no input (training/ship/card.py writes it)."""
        request = apis.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = CARD_SIGNATURE
        request.model_spec.version.value = version
        response = self.call(self.predict_rpc, request, retries=0)
        if CARD_OUTPUT not in response.outputs or len(response.outputs[CARD_OUTPUT].string_val) != 1:
            raise ValueError(f"the {CARD_SIGNATURE} signature did not answer one string '{CARD_OUTPUT}'")
        return response.outputs[CARD_OUTPUT].string_val[0].decode()

    def call(self, method, request, retries: int | None = None, until: float | None = None):
        """One RPC with a deadline per attempt, retried with exponential backoff while UNAVAILABLE:
        `retries` times, or with `until` (time.time()) as long as time is left, each attempt then
        waiting for the channel to connect (wait_for_ready) rather than failing while it does."""
        retries = self.retries if retries is None else retries
        attempt = 0
        while True:
            left = None if until is None else until - time.time()
            try:
                if left is None:
                    return method(request, timeout=self.timeout_s)
                return method(request, timeout=max(0.05, min(self.timeout_s, left)), wait_for_ready=True)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                delay = min(self.backoff_s * 2 ** attempt, 1.0)
                out_of_time = attempt >= retries if until is None else until - time.time() <= delay
                if out_of_time:
                    raise
                attempt += 1
                log.warning("model server unavailable (%s); retry %d in %.2f s", exc.details(), attempt, delay)
                time.sleep(delay)

    def close(self) -> None:
        self.channel.close()
