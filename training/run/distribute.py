"""Where one training run's replicas are: one device, several GPUs of one process, or several
processes (pods), each with its devices. One function, `from_environment`, chooses by backend:

- TensorFlow: `tf.distribute.MultiWorkerMirroredStrategy` when TF_CONFIG (or the Kubernetes
  Job's environment, below) names several workers; `MirroredStrategy` when one process sees
  several GPUs; else none (the default strategy: one device).
- JAX: `keras.distribution.DataParallel` over every device of every process
  (`keras.distribution.initialize` joins the processes first). Its arrays are global, so
  BatchNorm's statistics are the global batch's without anything more to do.

What follows the strategy, whichever it is:
- The configuration's `batch_size` is the global batch: each of R replicas computes the
  gradient of batch_size / R images and the gradients are summed (Keras divides each replica's
  mean loss by R), so one step is the single-device step on the same batch. The learning rate
  therefore stays the configuration's. `scaled_for_replicas` gives the other choice, a batch of
  batch_size per replica with the learning rate scaled to it (linear for SGD, square root for
  Adam), for `make train-k8s ... SCALE_BATCH=1`.
- BatchNorm is synchronized: its mean and variance are the global batch's (`synchronized=True`
  on TensorFlow; JAX's global arrays give the same), so the statistics do not depend on R.
- Checkpoints: only the chief (worker 0) writes into the run directory, atomically (state.json
  is replaced last). Every other worker runs the same steps, collectives included, against a
  private scratch copy of the run directory that it discards: the way Keras'
  BackupAndRestore has non-chief workers write to temporary directories, and no write races.
- Resume, as BackupAndRestore defines it: when a worker dies, the survivors' collectives fail
  (TensorFlow's health check aborts them) and they exit; the whole group is started again
  (Kubernetes replaces the failed pods of the Job), every worker restores the chief's last
  completed epoch from the shared run directory, and training continues from there.

In a Kubernetes Indexed Job (k8s/trainjob), TF_CONFIG is built from the pod's environment:
JOB_COMPLETION_INDEX (this worker), JOB_NAME, TRAIN_WORKERS (the Job's completions),
TRAIN_SERVICE (the headless Service the pods are a subdomain of) and TRAIN_PORT; worker i is
reachable at `<JOB_NAME>-<i>.<TRAIN_SERVICE>:<TRAIN_PORT>`, its pod's stable DNS name.

TensorFlow and JAX are imported only when a placement is made: the Kubernetes tool imports
this module for `tf_config_from_job` and `scaled_for_replicas` without either.
"""

import atexit
import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_PORT = 12345
# What a non-chief worker copies from the shared run directory to resume from it.
RESUME_FILES = ("config.json", "state.json", "checkpoints", "teacher-logits.npz")


def tf_config_from_job(env=None) -> dict | None:
    """TF_CONFIG for this pod of a multi-worker Indexed Job, or None when it has one worker."""
    env = os.environ if env is None else env
    workers = int(env.get("TRAIN_WORKERS", "1"))
    if workers < 2:
        return None
    missing = [k for k in ("JOB_NAME", "TRAIN_SERVICE", "JOB_COMPLETION_INDEX") if not env.get(k)]
    if missing:
        raise ValueError(f"TRAIN_WORKERS={workers} needs {', '.join(missing)} in the environment")
    index = int(env["JOB_COMPLETION_INDEX"])
    if not 0 <= index < workers:
        raise ValueError(f"JOB_COMPLETION_INDEX {index} is not a worker of {workers}")
    port = int(env.get("TRAIN_PORT", DEFAULT_PORT))
    addresses = [f"{env['JOB_NAME']}-{i}.{env['TRAIN_SERVICE']}:{port}" for i in range(workers)]
    return {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}


def cluster_from_tf_config(tf_config) -> tuple[list[str], int]:
    """(worker addresses, this worker's index) of a TF_CONFIG; a "chief" task counts as worker 0."""
    cluster, task = tf_config.get("cluster", {}), tf_config.get("task", {})
    addresses = list(cluster.get("chief", [])) + list(cluster.get("worker", []))
    index = task.get("index", 0) + (len(cluster.get("chief", [])) if task.get("type") == "worker" else 0)
    return addresses, index


def scaled_for_replicas(config, replicas: int):
    """`config` with a batch of config.batch_size per replica (global batch_size x replicas) and
    its learning rate scaled to that batch: linearly for SGD (Goyal et al. 2017; the one-cycle
    schedules warm up already), by the square root for Adam. The default is not to scale: the
    configuration's batch is the global one, and a run on R replicas is the same run."""
    if replicas <= 1:
        return config
    factor = replicas if config.optimizer in ("sgd", "nesterov") else math.sqrt(replicas)
    return replace(config, batch_size=config.batch_size * replicas, learning_rate=config.learning_rate * factor)


@dataclass
class Placement:
    """One process's part in a run: `replicas` in all, `workers` processes, this one `task`."""

    backend: str = "tensorflow"
    strategy: object = None  # a tf.distribute.Strategy, or JAX's keras.distribution.DataParallel
    replicas: int = 1
    workers: int = 1
    task: int = 0

    @property
    def chief(self) -> bool:
        return self.task == 0

    def describe(self) -> str:
        if self.strategy is None:
            return "one device"
        return (f"{type(self.strategy).__name__}: {self.replicas} replicas in {self.workers} "
                f"process{'es' if self.workers > 1 else ''}, this one worker {self.task}")

    def scope(self):
        """Where the model, its optimizer and its checkpoint restore must be created."""
        if self.strategy is not None and self.backend == "tensorflow":
            return self.strategy.scope()
        return contextlib.nullcontext()  # JAX: the distribution is set globally

    def write_dir(self, run_dir) -> Path:
        """Where this process writes: the run directory for the chief; for any other worker a
        private scratch copy of what resuming reads from it, deleted when the process ends."""
        run_dir = Path(run_dir)
        if self.chief:
            return run_dir
        scratch = Path(tempfile.mkdtemp(prefix=f"worker{self.task}-"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        for name in RESUME_FILES:
            source = run_dir / name
            if source.is_dir():
                shutil.copytree(source, scratch / name)
            elif source.is_file():
                shutil.copy2(source, scratch / name)
        return scratch

    def prepare(self, network, config):
        """Before compiling: the global batch must split evenly; BatchNorm synchronized."""
        if config.batch_size % self.replicas:
            raise ValueError(f"the global batch {config.batch_size} does not split evenly over "
                             f"{self.replicas} replicas")
        if self.replicas > 1 and self.backend == "tensorflow":
            import keras
            for layer in network._flatten_layers():
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.synchronized = True  # read at call time: moments over all replicas

    def adapt(self, trained):
        """After compiling, before fit: what Keras 3's fit needs under a TensorFlow strategy."""
        if self.strategy is None or self.backend != "tensorflow" or self.replicas < 2:
            return trained
        # XLA cannot compile the step of a model whose variables live on several devices
        # (https://www.tensorflow.org/xla/known_issues); the collectives run outside XLA.
        trained.jit_compile = False
        # Keras 3 builds metrics and loss before fit from a first batch that it reduces with
        # strategy.reduce, which fails for nested batches under MultiWorkerMirroredStrategy
        # (keras-team/keras#20585), and it takes that batch from the training iterator, whose
        # Python generator does not rewind: the first steps would see other batches than a
        # single-device run. The batch's spec is all the build needs.
        trained._maybe_symbolic_build = lambda iterator=None, data_batch=None: _build_from_spec(
            trained, iterator, data_batch)
        return trained


def _build_from_spec(model, iterator=None, data_batch=None):
    import tensorflow as tf
    from keras.src import tree
    if data_batch is None and iterator is not None:
        spec = iterator.data_adapter.get_tf_dataset().element_spec  # a new dataset: nothing consumed
        data_batch = tree.map_structure(
            lambda s: tf.zeros([1 if d is None else d for d in s.shape], s.dtype), spec)
    if data_batch is not None:
        with model.distribute_strategy.scope():
            model._symbolic_build(data_batch=data_batch)


def _reduce_scalars_across_workers(strategy):
    """Keras 3 averages each step's metrics over workers with strategy.reduce("MEAN", v, axis=0),
    which fails for the scalars they are (keras-team/keras#20585): for scalars, the mean over
    replicas is the reduction with axis=None. Patched on this strategy object only."""
    reduce = strategy.reduce

    def reduce_scalars_too(reduce_op, value, axis=None):
        if axis is not None:
            local = strategy.experimental_local_results(value)
            if local and getattr(local[0], "shape", None) is not None and local[0].shape.rank == 0:
                axis = None
        return reduce(reduce_op, value, axis=axis)

    strategy.reduce = reduce_scalars_too


def from_environment(env=None) -> Placement:
    """The placement this process's environment asks for (see the module's docstring)."""
    import keras
    env = os.environ if env is None else env
    backend = keras.backend.backend()
    tf_config = json.loads(env["TF_CONFIG"]) if env.get("TF_CONFIG") else tf_config_from_job(env)
    addresses, task = cluster_from_tf_config(tf_config) if tf_config else ([], 0)
    if backend == "jax":
        return _jax_placement(addresses, task)
    if backend != "tensorflow":
        return Placement(backend)
    import tensorflow as tf
    if len(addresses) > 1:
        os.environ["TF_CONFIG"] = json.dumps(tf_config)  # what TFConfigClusterResolver reads
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        _reduce_scalars_across_workers(strategy)
        return Placement(backend, strategy, strategy.num_replicas_in_sync, len(addresses), task)
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy([g.name for g in gpus])
        return Placement(backend, strategy, strategy.num_replicas_in_sync)
    return Placement(backend)


def _jax_placement(addresses, task) -> Placement:
    import keras
    if len(addresses) > 1:
        # JAX needs only the coordinator's address (worker 0's).
        keras.distribution.initialize(addresses[0], num_processes=len(addresses), process_id=task)
    devices = keras.distribution.list_devices()
    if len(devices) < 2:
        return Placement("jax")
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    return Placement("jax", distribution, len(devices), max(1, len(addresses)), task)
