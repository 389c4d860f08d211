"""The worker talks TF Serving's protocol without TensorFlow (memory, start-up time, image size):
not started, and not even imported in part."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_worker_does_not_start_tensorflow():
    check = ("import sys, worker.main; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_serving')))")
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
