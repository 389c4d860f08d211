"""TF Serving's generated proto and gRPC modules, loaded without starting TensorFlow.

tensorflow-serving-api's modules import their shared protos from `tensorflow.core...`, and a
plain import of that runs tensorflow/__init__.py: 3.4 s and ~650 MB of resident memory per worker
for nothing the worker uses. The proto modules themselves are plain generated code, so while they
load, a bare package stands in for `tensorflow` (same directory, __init__ not run): 0.1 s, ~30 MB.
The stand-in is removed again, so a later `import tensorflow` in the same process loads the real one.
"""
import importlib.util
import sys
import types


def bare_tensorflow_package() -> types.ModuleType:
    package = types.ModuleType("tensorflow")
    package.__path__ = list(importlib.util.find_spec("tensorflow").submodule_search_locations)
    return package


_bare = None if "tensorflow" in sys.modules else bare_tensorflow_package()
if _bare is not None:
    sys.modules["tensorflow"] = _bare
try:
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,  # noqa: F401
                                         model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)
finally:
    if _bare is not None:
        del sys.modules["tensorflow"]
