"""TF Serving's gRPC API as the worker speaks it, without TensorFlow or tensorflow-serving-api.

The messages are compiled from worker/protos/tfserving_apis.proto (TF Serving's, reduced to the
fields the worker uses) by grpcio-tools: `make setup` here, a throw-away stage in the worker's
image. The RPCs are called by TF Serving's own method paths, which is all the wire names.
"""
import grpc

try:
    from worker.protos import tfserving_apis_pb2 as apis
except ImportError as exc:  # a checkout where the messages were not compiled yet
    raise ImportError(f"{exc}: compile worker/protos/tfserving_apis.proto first (make setup, or: python -m "
                      "grpc_tools.protoc -I . --python_out=. worker/protos/tfserving_apis.proto)") from None

PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
GET_MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
SIGNATURE_DEF_MAP = "type.googleapis.com/tensorflow.serving.SignatureDefMap"


def rpc(channel: grpc.Channel, path: str, request_type, response_type):
    """A unary call of `path` on `channel`, taking a `request_type` and answering a `response_type`."""
    return channel.unary_unary(path, request_serializer=request_type.SerializeToString,
                               response_deserializer=response_type.FromString)
