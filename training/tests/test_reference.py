"""training.lab.reference's edits for a machine without CUDA, on the lines of airbench94.py they
edit (quoted from legacy/airbench94.py of KellerJordan/cifar10-airbench: the file itself is not
part of this project, and PyTorch is not a dev dependency)."""

import pytest

from training.lab.reference import edited

REFERENCE_LINES = '''import torch
import torch.nn.functional as F

def load(data_path, gpu=0):
    data = torch.load(data_path, map_location=torch.device(gpu))
    self.images = (self.images.half() / 255).permute(0, 3, 1, 2).to(memory_format=torch.channels_last)

def make_net(net):
    net = net.half().cuda()
    return net

def main(run):
    starter = torch.cuda.Event(enable_timing=True)
    ender = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda.synchronize()
    torch.cuda.synchronize()

accs = torch.tensor([main(run) for run in range(25)])
'''


def test_on_the_cpu_nothing_is_left_of_cuda_or_float16_and_the_timers_measure_wall_time():
    code = edited(REFERENCE_LINES, cpu=True, runs=None)
    assert "cuda" not in code and "half" not in code and "range(25)" in code
    assert "map_location='cpu'" in code and "net = net.float()" in code
    namespace = {}
    compile(code, "airbench94.py", "exec")
    exec(code[code.index("import time"):code.index("def load")], namespace)  # WallClock, without torch
    start, end = namespace["WallClock"](), namespace["WallClock"]()
    start.record()
    sum(range(10**6))
    end.record()
    assert 0 < start.elapsed_time(end) < 10_000  # milliseconds, as torch.cuda.Event's


def test_runs_sets_how_many_runs_train_with_or_without_the_cpu_edits():
    assert "for run in range(1)" in edited(REFERENCE_LINES, cpu=False, runs=1)
    on_cpu = edited(REFERENCE_LINES, cpu=True, runs=3)
    assert "for run in range(3)" in on_cpu and "cuda" not in on_cpu
    assert edited(REFERENCE_LINES, cpu=False, runs=None) == REFERENCE_LINES


@pytest.mark.parametrize("line", ["    net = net.half().cuda()\n", "    torch.cuda.synchronize()\n"])
def test_a_reference_that_changed_is_refused_rather_than_run_half_edited(line):
    with pytest.raises(SystemExit, match="where [13] was expected"):
        edited(REFERENCE_LINES.replace(line, "", 1), cpu=True, runs=None)
    with pytest.raises(SystemExit, match="no 'for run in range"):
        edited(REFERENCE_LINES.replace("range(25)", "range(n)"), cpu=False, runs=2)
