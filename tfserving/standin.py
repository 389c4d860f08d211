"""LOCAL STAND-IN for `tensorflow_model_server`, for machines where the real one cannot be installed.

Implements the part of TF Serving's gRPC API the worker uses, with TF Serving's behaviour and status
codes: PredictionService/Predict and GetModelMetadata, ModelService/GetModelStatus, model name,
version and signature selection in ModelSpec, NOT_FOUND for unknown models or versions, and the
default version policy (serve the highest version under --model_base_path, picking up new version
directories, and falling back when one is removed, without a restart). Of the REST API, only the
model status (GET /v1/models/<name>, what health checks ask) on --rest_api_port. It is not a
production server: no REST predictions, no model config files, no server-side batching (the
worker batches).

    python -m tfserving.standin --port=8500 --rest_api_port=0 --model_name=cifar10 \
        --model_base_path=/abs/path/models/cifar10
"""
import argparse
import json
import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import error_codes_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfserving.versions import list_versions

log = logging.getLogger("tfserving.standin")
DEFAULT_SIGNATURE = "serving_default"


class ServingError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class LoadedVersion:
    version: int
    signatures: dict  # signature name -> concrete function
    signature_defs: dict  # signature name -> SignatureDef proto, for GetModelMetadata


def read_signature_defs(version_dir: Path) -> dict:
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    serve_graph = next(mg for mg in saved_model.meta_graphs if "serve" in mg.meta_info_def.tags)
    return dict(serve_graph.signature_def)


def warm_up(signature) -> None:
    # The first call of a loaded function is slow; pay for it before the version goes live.
    _, kwargs = signature.structured_input_signature
    dummy = {name: tf.zeros([1 if d is None else d for d in spec.shape], spec.dtype)
             for name, spec in kwargs.items()}
    signature(**dummy)


def load_version(base_path: Path, version: int) -> LoadedVersion:
    version_dir = base_path / str(version)
    loaded = tf.saved_model.load(str(version_dir), tags=["serve"])
    signatures = dict(loaded.signatures)
    if DEFAULT_SIGNATURE in signatures:
        warm_up(signatures[DEFAULT_SIGNATURE])
    # Keep `loaded` alive through the functions' captured variables.
    return LoadedVersion(version, signatures, read_signature_defs(version_dir))


class Model:
    """One model name with TF Serving's default version policy: the highest version is served."""

    def __init__(self, name: str, base_path: Path):
        self.name = name
        self.base_path = base_path
        self.current: LoadedVersion | None = None
        self.retired: set[int] = set()  # versions served before and unloaded since: state END
        self.failed: set[int] = set()  # versions that did not load; not retried
        self.lock = threading.Lock()

    def sync_with_disk(self) -> None:
        """Load the highest version on disk if it is not the one served (new, or the served one was removed)."""
        candidates = [v for v in list_versions(self.base_path) if v not in self.failed]
        target = candidates[-1] if candidates else None
        current = self.current.version if self.current else None
        if target == current:
            return
        if target is None:
            log.warning("no versions of model %s under %s; unloading %s", self.name, self.base_path, current)
            self.swap(None)
            return
        log.info("loading model %s version %d", self.name, target)
        started = time.monotonic()
        try:
            new = load_version(self.base_path, target)
        except Exception:  # a broken export must not take the served version down
            log.exception("could not load model %s version %d; keeping %s", self.name, target, current)
            self.failed.add(target)
            return
        self.swap(new)
        log.info("serving model %s version %d (loaded in %.1f s)", self.name, target, time.monotonic() - started)

    def swap(self, new: LoadedVersion | None) -> None:
        with self.lock:
            if self.current is not None:
                self.retired.add(self.current.version)
            self.current = new
            if new is not None:
                self.retired.discard(new.version)

    def version_states(self) -> dict[int, int]:
        """Every version served so far: AVAILABLE (the current one) or END."""
        with self.lock:
            states = {v: get_model_status_pb2.ModelVersionStatus.END for v in self.retired}
            if self.current is not None:
                states[self.current.version] = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return states

    def resolve(self, model_spec) -> LoadedVersion:
        """The loaded version a ModelSpec asks for, or TF Serving's error for it."""
        if model_spec.name != self.name:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: Latest({model_spec.name})")
        current = self.current
        if model_spec.HasField("version_label"):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Unrecognized servable version label: {model_spec.version_label}")
        if model_spec.HasField("version"):
            wanted = model_spec.version.value
            if current is None or current.version != wanted:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Servable not found for request: Specific({self.name}, {wanted})")
            return current
        if current is None:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({self.name})")
        return current


def tensor_inputs(request, signature) -> dict:
    """Request inputs as tensors, checked against the signature the way TF Serving checks them."""
    _, expected = signature.structured_input_signature
    if set(request.inputs) != set(expected):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"Expected inputs {sorted(expected)} but got {sorted(request.inputs)}")
    tensors = {}
    for name, spec in expected.items():
        array = tf.make_ndarray(request.inputs[name])
        if tf.as_dtype(array.dtype) != spec.dtype:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Expects arg[{name}] to be {spec.dtype.name} but {tf.as_dtype(array.dtype).name} is provided")
        if not spec.shape.is_compatible_with(array.shape):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Input {name} has shape {list(array.shape)}, signature expects {spec.shape}")
        tensors[name] = tf.constant(array)
    return tensors


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, model: Model):
        self.model = model

    def Predict(self, request, context):
        with grpc_errors(context):
            served = self.model.resolve(request.model_spec)
            signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
            signature = served.signatures.get(signature_name)
            if signature is None:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f'Serving signature key "{signature_name}" not found.')
            outputs = signature(**tensor_inputs(request, signature))
            wanted = list(request.output_filter) or list(outputs)
            unknown = set(wanted) - set(outputs)
            if unknown:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"output tensor alias not found in signature: {sorted(unknown)}")
            response = predict_pb2.PredictResponse()
            fill_model_spec(response.model_spec, self.model.name, served.version, signature_name)
            for name in wanted:
                response.outputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(outputs[name])))
            return response

    def GetModelMetadata(self, request, context):
        with grpc_errors(context):
            served = self.model.resolve(request.model_spec)
            if not request.metadata_field:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "GetModelMetadataRequest must specify at least one metadata_field")
            for field in request.metadata_field:
                if field != "signature_def":
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            for name, signature_def in served.signature_defs.items():
                signature_map.signature_def[name].CopyFrom(signature_def)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            fill_model_spec(response.model_spec, self.model.name, served.version)
            response.metadata["signature_def"].Pack(signature_map)
            return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, model: Model):
        self.model = model

    def GetModelStatus(self, request, context):
        with grpc_errors(context):
            spec = request.model_spec
            if spec.name != self.model.name:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}")
            states = self.model.version_states()
            if spec.HasField("version"):
                if spec.version.value not in states:
                    raise ServingError(grpc.StatusCode.NOT_FOUND,
                                       f"Could not find version {spec.version.value} of model {spec.name}")
                states = {spec.version.value: states[spec.version.value]}
            if not states:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}")
            response = get_model_status_pb2.GetModelStatusResponse()
            for version in sorted(states, reverse=True):
                status = response.model_version_status.add(version=version, state=states[version])
                status.status.error_code = error_codes_pb2.OK
            return response


def serve_model_status(model: Model, port: int) -> ThreadingHTTPServer:
    """TF Serving's REST model status, GET /v1/models/<name>, in its JSON form."""
    state_names = get_model_status_pb2.ModelVersionStatus.State.Name

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.rstrip("/") != f"/v1/models/{model.name}":
                return self.reply(404, {"error": f"Could not find any versions of model {self.path.split('/')[-1]}"})
            states = model.version_states()
            if not states:
                return self.reply(404, {"error": f"Could not find any versions of model {model.name}"})
            self.reply(200, {"model_version_status": [
                {"version": str(v), "state": state_names(states[v]), "status": {"error_code": "OK", "error_message": ""}}
                for v in sorted(states, reverse=True)]})

        def reply(self, status, body):
            data = json.dumps(body, indent=1).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # health checks every few seconds would flood the log
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="rest", daemon=True).start()
    return server


def fill_model_spec(spec, name: str, version: int, signature_name: str | None = None) -> None:
    spec.name = name
    spec.version.value = version
    if signature_name:
        spec.signature_name = signature_name


class grpc_errors:
    """Turns ServingError into its gRPC status and any other failure into INTERNAL, never a traceback."""

    def __init__(self, context):
        self.context = context

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, grpc.RpcError):
            return False
        if isinstance(exc, ServingError):
            self.context.abort(exc.code, str(exc))
        if isinstance(exc, (tf.errors.InvalidArgumentError, ValueError, TypeError)):
            self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.exception("internal error")
        self.context.abort(grpc.StatusCode.INTERNAL, f"{exc_type.__name__}: {exc}")


def parse_bool(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


def parse_flags(argv=None) -> argparse.Namespace:
    # tensorflow_model_server's flag names, so compose and k8s can swap in the real server unchanged.
    parser = argparse.ArgumentParser(prog="python -m tfserving.standin", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--rest_api_port", type=int, default=0)
    parser.add_argument("--model_name", default="default")
    parser.add_argument("--model_base_path", required=True)
    parser.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0)
    parser.add_argument("--tensorflow_intra_op_parallelism", type=int, default=0)
    parser.add_argument("--tensorflow_inter_op_parallelism", type=int, default=0)
    parser.add_argument("--enable_batching", type=parse_bool, nargs="?", const=True, default=False)
    parser.add_argument("--grpc_max_threads", type=int, default=8)
    flags, ignored = parser.parse_known_args(argv)
    if ignored:
        log.warning("stand-in ignores these tensorflow_model_server flags: %s", " ".join(ignored))
    if flags.enable_batching:
        log.warning("stand-in does no server-side batching (the worker batches); --enable_batching ignored")
    return flags


def watch_versions(model: Model, poll_seconds: float, stop: threading.Event) -> None:
    while not stop.wait(poll_seconds):
        model.sync_with_disk()


def serve(flags: argparse.Namespace) -> None:
    tf.config.threading.set_intra_op_parallelism_threads(flags.tensorflow_intra_op_parallelism)
    tf.config.threading.set_inter_op_parallelism_threads(flags.tensorflow_inter_op_parallelism)
    model = Model(flags.model_name, Path(flags.model_base_path))
    model.sync_with_disk()  # like TF Serving: initial load before the port opens
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=flags.grpc_max_threads),
                         options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(model), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(model), server)
    server.add_insecure_port(f"0.0.0.0:{flags.port}")
    server.start()
    rest = serve_model_status(model, flags.rest_api_port) if flags.rest_api_port else None
    log.info("stand-in model server on gRPC port %d%s, model %s from %s", flags.port,
             f" (REST model status on {flags.rest_api_port})" if rest else "", model.name, model.base_path)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    watcher = threading.Thread(target=watch_versions, args=(model, flags.file_system_poll_wait_seconds, stop),
                               daemon=True)
    watcher.start()
    stop.wait()
    if rest:
        rest.shutdown()
    server.stop(grace=2).wait()


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(parse_flags(argv))


if __name__ == "__main__":
    main()
