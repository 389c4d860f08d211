"""What changes the weights: the learning-rate schedules, airbench's SGD and Lookahead, and the
compiled model that fit() trains (the augmentation step in front, or the Distiller)."""

import numpy as np
import keras
from keras import ops

from training.recipe.augment import Augmented
from training.run.distill import Distiller


def learning_rate(config, steps_per_epoch):
    total = config.epochs * steps_per_epoch
    if config.schedule == "constant":
        return config.learning_rate
    if config.schedule == "step":
        boundary = (config.epochs - config.fine_tune_epochs) * steps_per_epoch
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [boundary], [config.learning_rate, config.fine_tune_lr])
    if config.schedule == "onecycle":
        return OneCycle(config.learning_rate, total, config.warmup_fraction, *config.onecycle_ends)
    raise ValueError(f"unknown schedule {config.schedule!r}")


@keras.saving.register_keras_serializable("cifar10")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear from start * peak up to `peak`, then linear down to end * peak at `total_steps`."""

    def __init__(self, peak, total_steps, warmup_fraction, start=0.0, end=0.0):
        self.peak, self.total_steps, self.warmup_fraction = peak, total_steps, warmup_fraction
        self.start, self.end = start, end

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warmup = max(1.0, self.warmup_fraction * self.total_steps)
        rise = self.start + (1 - self.start) * step / warmup
        fall = self.end + (1 - self.end) * (self.total_steps - step) / max(1.0, self.total_steps - warmup)
        return self.peak * keras.ops.clip(keras.ops.minimum(rise, fall), 0.0, 1.0)

    def get_config(self):
        return dict(peak=self.peak, total_steps=self.total_steps, warmup_fraction=self.warmup_fraction,
                    start=self.start, end=self.end)


@keras.saving.register_keras_serializable("cifar10")
class BiasScaledSGD(keras.optimizers.SGD):
    """SGD whose BatchNorm biases take `bias_lr_scale` times larger steps (airbench: with their
    scales frozen, BatchNorm biases are the only per-channel knobs, and they learn slowly), and
    whose whitening stem's bias, with `whiten_bias_steps`, stops after that many steps: no
    gradient, momentum or decay from then on, as when airbench sets requires_grad=False."""

    def __init__(self, *args, bias_lr_scale=1.0, whiten_bias_steps=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias_lr_scale, self.whiten_bias_steps = bias_lr_scale, whiten_bias_steps

    def build(self, variables):
        super().build(variables)
        self._bias_indexes = {self._get_variable_index(v) for v in variables if v.path.endswith("/beta")}
        self._whiten_bias_indexes = (set() if self.whiten_bias_steps is None else
                                     {self._get_variable_index(v) for v in variables
                                      if v.path.endswith("whiten/bias")})

    def _learns(self, variable):
        """For the whitening bias, 1 while it learns and then 0 (a tensor: the step compiles once);
        None for every other variable."""
        if self._get_variable_index(variable) not in self._whiten_bias_indexes:
            return None
        return ops.cast(self.iterations < self.whiten_bias_steps, variable.dtype)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        if index in self._bias_indexes:
            learning_rate = learning_rate * self.bias_lr_scale
        learns = self._learns(variable)
        if learns is not None:
            gradient = gradient * learns
            if self.momentums:
                self.assign(self.momentums[index], self.momentums[index] * learns)
        super().update_step(gradient, variable, learning_rate)

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return
        for variable in variables:
            if self._use_weight_decay(variable):
                decay = ops.cast(self.learning_rate, variable.dtype) * ops.cast(self.weight_decay, variable.dtype)
                learns = self._learns(variable)
                variable.assign(variable - variable * (decay if learns is None else decay * learns))

    def get_config(self):
        return {**super().get_config(), "bias_lr_scale": self.bias_lr_scale,
                "whiten_bias_steps": self.whiten_bias_steps}


class Lookahead(keras.callbacks.Callback):
    """airbench's lookahead (from hlb-cifar10): from the 4th epoch on, every 5 steps the weights
    move to a slow average of themselves, whose weight grows as 0.95^5 * progress^3, and every
    epoch ends on the average. The average stays a backend tensor on the training device, and the
    model is only touched on the steps that average (under JAX, touching it syncs its state)."""

    PERIOD, FIRST_EPOCH = 5, 3

    def __init__(self, steps_per_epoch, total_steps, slow=None):
        super().__init__()
        self.steps_per_epoch, self.total_steps, self.epoch = steps_per_epoch, total_steps, 0
        self.slow = None if slow is None else [ops.convert_to_tensor(s) for s in slow]

    def averaged_variables(self):
        # BatchNorm's moving statistics included: airbench averages every float tensor of the net.
        return [v for v in self.model.weights if "float" in str(v.dtype)]

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self.epoch * self.steps_per_epoch + batch + 1  # = optimizer.iterations, without a sync
        if step <= self.FIRST_EPOCH * self.steps_per_epoch:
            return
        if step % self.PERIOD == 0:
            if self.slow is None:
                self.slow = [ops.copy(v.value) for v in self.averaged_variables()]
            else:
                decay = 0.95 ** self.PERIOD * (step / self.total_steps) ** 3
                self.move_to_average(decay)
        if step % self.steps_per_epoch == 0 and self.slow is not None:
            self.move_to_average(decay=1.0)

    def move_to_average(self, decay):
        variables = self.averaged_variables()
        self.slow = [slow + (1 - decay) * (variable.value - slow) for slow, variable in zip(self.slow, variables)]
        for slow, variable in zip(self.slow, variables):
            # A copy: under JAX the next step donates the variables' buffers, which must not be the average's.
            variable.assign(ops.copy(slow))

    def slow_arrays(self):
        return [np.asarray(ops.convert_to_numpy(s)) for s in self.slow]


def make_optimizer(config, steps_per_epoch):
    lr = learning_rate(config, steps_per_epoch)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    if config.optimizer in ("sgd", "nesterov"):
        frozen = None if config.whiten_bias_epochs is None else config.whiten_bias_epochs * steps_per_epoch
        return BiasScaledSGD(lr, momentum=config.momentum, nesterov=config.optimizer == "nesterov",
                             weight_decay=config.weight_decay or None, bias_lr_scale=config.bn_bias_lr_scale,
                             whiten_bias_steps=frozen)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def jit_compile():
    """Whether XLA compiles the whole training step (it can: augmentation is part of it). Under
    JAX always; under TensorFlow where a GPU is visible, which is Keras' own "auto" choice: on
    CPUs, TensorFlow's oneDNN kernels outrun XLA's (measured in the README), and with op
    determinism (--deterministic) Keras refuses XLA."""
    if keras.backend.backend() != "tensorflow":
        return True
    import tensorflow as tf
    from tensorflow.python.framework.config import is_op_determinism_enabled
    return bool(tf.config.list_physical_devices("GPU")) and not is_op_determinism_enabled()


def compile_model(model, config, steps_per_epoch, augmentation=None, jit=None):
    """The model that fit() trains and checkpoints hold: `model` behind the augmentation step
    (training.recipe.augment.Augmented), or with a teacher or outliers the Distiller, which is one too. `jit`:
    XLA or not (default: jit_compile())."""
    if config.teacher or config.outliers:
        trained = Distiller(model, config.distill_alpha if config.teacher else 1.0, config.distill_temperature,
                            config.label_smoothing, augmentation, config.outlier_weight if config.outliers else 0.0)
        loss = None
    else:
        trained = Augmented(model, augmentation)
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)
    # Weighted: the Distiller weighs outliers' rows 0 (compiled `metrics` ignore sample weights).
    trained.compile(optimizer=make_optimizer(config, steps_per_epoch), loss=loss,
                    weighted_metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                    jit_compile=jit_compile() if jit is None else jit)
    return trained
