"""What an exported model costs to serve, read from the SavedModel itself: multiply-adds per image
(counted in the frozen serving graph, so TTA views are included), parameters, size on disk, and
model-only throughput at a fixed batch size on this machine.

    python -m training.ship.cost models/cifar10/3 [models/cifar10/4 ...] [--batch 32] [--seconds 10]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from training.recipe.contract import INPUT, SIGNATURE
from training.ship.machine import describe

CONV_OPS = {"Conv2D", "DepthwiseConv2dNative"}


def multiply_adds(export_dir):
    """Multiply-adds per image of the served signature: every convolution and matrix product in
    the graph with the variables frozen in, functions inlined, so nothing is missed or assumed."""
    loaded = tf.saved_model.load(str(export_dir))  # the signature's variables live as long as this
    graph = convert_variables_to_constants_v2(loaded.signatures[SIGNATURE]).graph
    total = 0
    for op in graph.get_operations():
        if op.type in CONV_OPS:
            kernel = op.inputs[1].shape  # [kh, kw, in, out] (depthwise: [kh, kw, in, multiplier])
            _, height, width, channels = op.outputs[0].shape
            per_output = kernel[0] * kernel[1] * (kernel[2] if op.type == "Conv2D" else 1)
            total += height * width * channels * per_output
        elif op.type == "MatMul":
            rows, columns = op.inputs[1].shape
            total += rows * columns
    return int(total)


def parameters(export_dir):
    reader = tf.train.load_checkpoint(str(Path(export_dir) / "variables" / "variables"))
    return int(sum(np.prod(shape) for name, shape in reader.get_variable_to_shape_map().items()
                   if name != "_CHECKPOINTABLE_OBJECT_GRAPH"))


def size_bytes(export_dir):
    return sum(p.stat().st_size for p in Path(export_dir).rglob("*") if p.is_file())


def images_per_second(export_dir, batch=32, seconds=10.0):
    """Closed-loop Predict-sized calls of the signature in this process: the model alone, no
    queue, no gRPC, no image decoding."""
    loaded = tf.saved_model.load(str(export_dir))
    serve = loaded.signatures[SIGNATURE]
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), np.uint8))
    for _ in range(3):
        serve(**{INPUT: images})
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        serve(**{INPUT: images})["probabilities"].numpy()
        calls += 1
    return calls * batch / (time.perf_counter() - started)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", help="exported SavedModel version directories")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    print(f"# {describe()} (before)")
    for export in args.exports:
        row = {"export": export, "multiply_adds": multiply_adds(export), "parameters": parameters(export),
               "size_bytes": size_bytes(export),
               f"images_per_second_batch{args.batch}": round(images_per_second(export, args.batch, args.seconds), 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
