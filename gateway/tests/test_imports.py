"""The gateway image carries no TensorFlow, gRPC or Pillow: importing the app must not need them."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gateway_imports_without_tensorflow_grpc_or_pillow():
    # A None entry in sys.modules makes any import of that package fail.
    check = ("import sys; sys.modules.update(tensorflow=None, tensorflow_serving=None, grpc=None, PIL=None, "
             "numpy=None); import gateway.app, gateway.settings; gateway.app.create_app; print('ok')")
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
