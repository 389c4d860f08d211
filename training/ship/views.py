"""Re-export a flip_translate export with fewer test-time views, from the SavedModel alone.

A model exported with `flip_translate` runs its network six times per image. Its run directory
(checkpoints) is not committed, yet an operator may want the same weights at a sixth or a third
of the cost. The network's six calls are separate subgraphs of the served graph: this freezes the
graph, keeps the calls the chosen TTA needs, and exports them under the same contract as a new
version. Before writing, it rebuilds the six-view average from the kept subgraphs and checks it
against what the original serves, so a graph it does not understand is refused, not mangled.

    python -m training.ship.views models/cifar10/3 --tta none --export-base models/teacher
"""

import argparse
import re
import sys

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from training.recipe.configs import TTA
from training.recipe.contract import INPUT, SIGNATURE, predict_exported, served_temperature
from training.recipe.data import CLASS_NAMES, load_cifar10
from training.ship.export import write_version

# Keras names the k-th call of the model's last layer logits_<2k-1> in the traced graph; a version
# re-saved with its model card (training/ship/card.py) nests it in one more StatefulPartitionedCall.
LOGITS = re.compile(r"^(?:StatefulPartitionedCall/)+logits_(\d+)/add$")


def view_functions(export_dir):
    """A function from uint8 images to the six views' logits: the image, its mirror, then the
    1-pixel shift up-left and its mirror, then down-right and its mirror (export.averaged_logits'
    order of calls)."""
    loaded = tf.saved_model.load(str(export_dir))
    graph_def = convert_variables_to_constants_v2(loaded.signatures[SIGNATURE]).graph.as_graph_def()
    calls = sorted((int(m.group(1)), node.name) for node in graph_def.node if (m := LOGITS.match(node.name)))
    if len(calls) != 6:
        raise ValueError(f"{export_dir}: expected the 6 network calls of a flip_translate export, found {len(calls)}")
    imported = tf.compat.v1.wrap_function(lambda: tf.graph_util.import_graph_def(graph_def, name=""), [])
    return [imported.prune(f"{INPUT}:0", f"{name}:0") for _, name in calls]


def combine(views, tta):
    """export.averaged_logits over precomputed views."""
    if tta == "none":
        return views[0]
    mirrored = [(views[i] + views[i + 1]) / 2 for i in range(0, len(views), 2)]
    return mirrored[0] if tta == "flip" else (mirrored[0] + (mirrored[1] + mirrored[2]) / 2) / 2


class Views(tf.Module):
    """Fewer views, their logits divided by the original's temperature (fitted on its six views;
    not refitted for fewer). No out-of-distribution head: it is fitted on one network's features,
    which a views export does not keep as an output."""
    def __init__(self, views, tta, temperature):
        super().__init__()
        self.views = views[:1] if tta == "none" else views[:2] if tta == "flip" else views
        self.tta, self.temperature = tta, temperature

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8, name=INPUT)])
    def serve(self, images):
        logits = combine([view(images) for view in self.views], self.tta) / self.temperature
        return {"probabilities": tf.nn.softmax(logits),
                "classes": tf.tile(tf.constant(CLASS_NAMES)[tf.newaxis], [tf.shape(images)[0], 1])}


def check_views(views, export_dir, temperature, images):
    """The six kept subgraphs must give back what the original export serves."""
    logits = combine([view(tf.constant(images)) for view in views], "flip_translate")
    rebuilt = tf.nn.softmax(logits / temperature).numpy()
    served = predict_exported(export_dir, images)
    if not np.allclose(rebuilt, served, atol=1e-5):
        raise ValueError(f"{export_dir}: the network calls found do not rebuild its served probabilities "
                         f"(max difference {np.abs(rebuilt - served).max():.2e})")


def export_views(export_dir, tta, base_path, check_images):
    views, temperature = view_functions(export_dir), served_temperature(export_dir)
    check_views(views, export_dir, temperature, check_images)
    module = Views(views, tta, temperature)
    return write_version(base_path, lambda path: tf.saved_model.save(module, path, signatures={SIGNATURE: module.serve}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="a SavedModel version exported with --tta flip_translate")
    parser.add_argument("--tta", choices=[t for t in TTA if t != "flip_translate"], required=True)
    parser.add_argument("--export-base", required=True, help="write the result as the next version here")
    parser.add_argument("--data", default="data", help="CIFAR-10, for the check (64 training images)")
    args = parser.parse_args(argv)
    train, _ = load_cifar10(args.data)
    try:
        path = export_views(args.export, args.tta, args.export_base, train.images[:64])
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    print(f"exported {path}")


if __name__ == "__main__":
    main()
