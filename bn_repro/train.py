"""Training and evaluation: flat functions in the style of the flax examples.

``train_step`` is one SGD step on one mini-batch and knows nothing about where
the batch came from. Two drivers feed it:

* in-memory datasets (MNIST, Sec. 4.1) live whole on the device;
  ``make_train_chunk`` samples the mini-batches on the device and fuses
  ``eval_every`` steps into one compiled ``lax.scan``, so the loop is not
  bound by Python;
* streamed datasets (ImageNet, Sec. 4.2: batches decoded and augmented by
  grain workers on the host) call a jitted ``train_step`` once per batch
  (``make_streamed_step``).

``mnist_experiment`` and ``imagenet_experiment`` bind a dataset to these; the
loop in ``train_and_evaluate`` is shared. The final model's BN layers get the
population statistics of Algorithm 2 (``compute_population_statistics``,
``population_statistics_from_batches``).
"""

import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import flax.linen as nn
import optax
from absl import logging
from flax.training import train_state

from bn_repro import checkpoints, imagenet_data, mnist_data, parallel
from bn_repro import metrics as metrics_lib
from bn_repro.batchnorm import BATCH_MOMENTS, population_statistics
from bn_repro.mlp import MLP, SIGMOID_INPUT
from bn_repro.models.bn_inception import BNInception
from bn_repro.models.googlenet import GoogLeNet
from bn_repro.models.layers import NONLINEARITIES


class TrainState(train_state.TrainState):
    """Parameters, optimizer state, step, and BN's moving averages."""

    batch_stats: Any


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# GoogLeNet's auxiliary classifiers' loss weight (arXiv:1409.4842, Sec. 5).
AUX_LOSS_WEIGHT = 0.3


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the offending field for inconsistent values."""
    positive = ("batch_size", "num_steps", "eval_every", "checkpoint_every", "bn.population_batches")
    if config.experiment == "imagenet":
        positive += ("eval_batch_size", "data.image_size", "data.shuffle_window", "model.num_classes")
    for name in positive:
        value = _get_field(config, name)
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
    if config.checkpoint_every % config.eval_every:
        raise ValueError(
            f"config.checkpoint_every ({config.checkpoint_every}) must be a multiple of "
            f"config.eval_every ({config.eval_every}), so that a resumed run evaluates "
            "and checkpoints at the same steps as an uninterrupted one"
        )
    if not 0.0 <= config.bn.momentum < 1.0:
        raise ValueError(f"config.bn.momentum must be in [0, 1), got {config.bn.momentum}")
    if config.bn.epsilon < 0:
        raise ValueError(f"config.bn.epsilon must be >= 0, got {config.bn.epsilon}")
    if config.experiment == "mnist":
        if not 0 <= config.model.tracked_unit < config.model.hidden_units[-1]:
            raise ValueError(
                f"config.model.tracked_unit ({config.model.tracked_unit}) must index a unit "
                f"of the last hidden layer (0..{config.model.hidden_units[-1] - 1})"
            )
    elif config.experiment == "imagenet":
        choices = {
            "model.architecture": ("bn_inception", "googlenet"),
            "model.nonlinearity": tuple(NONLINEARITIES),
            "model.dtype": tuple(DTYPES),
            "data.shuffle": ("global", "window"),
        }
        for name, allowed in choices.items():
            if _get_field(config, name) not in allowed:
                raise ValueError(f"config.{name} must be one of {allowed}, got {_get_field(config, name)!r}")
        if not 0.0 <= config.model.dropout_rate < 1.0:
            raise ValueError(f"config.model.dropout_rate must be in [0, 1), got {config.model.dropout_rate}")
        if not 0.0 < config.data.crop_fraction <= 1.0:
            raise ValueError(f"config.data.crop_fraction must be in (0, 1], got {config.data.crop_fraction}")
        for name in ("lr_multiplier", "l2_reduction", "lr_decay_epochs", "lr_decay_speedup", "model.width"):
            if not _get_field(config, name) > 0:
                raise ValueError(f"config.{name} must be > 0, got {_get_field(config, name)!r}")
    else:
        raise ValueError(f"config.experiment must be 'mnist' or 'imagenet', got {config.experiment!r}")
    create_learning_rate_schedule(config, steps_per_epoch=1)  # raises for an unknown config.lr_schedule
    parallel.validate(config, jax.device_count())
    if config.lr_scaling not in ("none", "linear"):
        raise ValueError(f"config.lr_scaling must be 'none' or 'linear', got {config.lr_scaling!r}")
    if not (isinstance(config.lr_reference_batch_size, int) and config.lr_reference_batch_size > 0):
        raise ValueError(
            f"config.lr_reference_batch_size must be a positive integer, got {config.lr_reference_batch_size!r}"
        )


def _get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def create_model(config: ml_collections.ConfigDict, loop: str | None = None) -> nn.Module:
    """The experiment's network: the MNIST MLP, BN-Inception (Figure 5) or GoogLeNet.

    Its BN layers take their statistics as ``config.bn.statistics`` says, in
    the training loop ``loop`` (default ``config.parallel``; ``'jit'`` gives
    the model a single program evaluates).
    """
    m = config.model
    bn = parallel.bn_settings(config if loop is None else _with_loop(config, loop), jax.device_count())
    if config.experiment == "mnist":
        return MLP(
            hidden_units=tuple(m.hidden_units),
            num_classes=m.num_classes,
            use_bn=m.use_bn,
            weight_init_std=m.weight_init_std,
            bn_momentum=config.bn.momentum,
            bn_epsilon=config.bn.epsilon,
            bn_use_fast_variance=config.bn.use_fast_variance,
            **bn,
        )
    common = dict(
        num_classes=m.num_classes, use_bn=m.use_bn, nonlinearity=m.nonlinearity, dropout_rate=m.dropout_rate,
        use_lrn=m.use_lrn, width=m.width, bn_momentum=config.bn.momentum, bn_epsilon=config.bn.epsilon,
        dtype=DTYPES[m.dtype], **bn,
    )
    if m.architecture == "googlenet":
        return GoogLeNet(aux_heads=m.aux_heads, **common)
    return BNInception(separable_stem=m.separable_stem, pool_proj_4cd=m.pool_proj_4cd, **common)


def _with_loop(config: ml_collections.ConfigDict, loop: str) -> ml_collections.ConfigDict:
    config = config.copy_and_resolve_references()
    config.parallel = loop
    return config


def initial_learning_rate(config: ml_collections.ConfigDict) -> float:
    """``learning_rate`` times ``lr_multiplier`` (Sec. 4.2.1 item 1; 1 if the config has
    none), and, with ``lr_scaling='linear'``, times ``batch_size / lr_reference_batch_size``
    (the linear scaling rule for a larger global batch over more devices)."""
    lr = config.learning_rate * config.get("lr_multiplier", 1.0)
    if config.lr_scaling == "linear":
        lr *= config.batch_size / config.lr_reference_batch_size
    return lr


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int | None = None
) -> optax.Schedule:
    """``constant``; ``cosine`` decay to 0 over ``num_steps``; or ``exponential``:
    GoogLeNet's staircase, x``lr_decay_rate`` every ``lr_decay_epochs`` /
    ``lr_decay_speedup`` epochs (Sec. 4.2.1 item 4 speeds it up 6x)."""
    lr = initial_learning_rate(config)
    if config.lr_schedule == "constant":
        return optax.constant_schedule(lr)
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(lr, config.num_steps)
    if config.lr_schedule == "exponential":
        if steps_per_epoch is None:
            raise ValueError("the 'exponential' schedule needs the number of steps per epoch")
        every = max(1, round(config.lr_decay_epochs / config.lr_decay_speedup * steps_per_epoch))
        return optax.exponential_decay(lr, every, config.lr_decay_rate, staircase=True)
    raise ValueError(
        f"config.lr_schedule must be 'constant', 'cosine' or 'exponential', got {config.lr_schedule!r}"
    )


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int | None = None
) -> optax.GradientTransformation:
    """SGD (with momentum if ``config.momentum``), plus an L2 penalty of
    ``weight_decay`` / ``l2_reduction`` (Sec. 4.2.1 item 3) on the layers'
    weights (not biases or BN's gamma/beta)."""
    sgd = optax.sgd(create_learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum or None)
    weight_decay = config.weight_decay / config.get("l2_reduction", 1.0)
    if not weight_decay:
        return sgd
    kernels_only = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: path[-1].key == "kernel", params
    )
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=kernels_only), sgd)


def create_train_state(
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    model: nn.Module,
    input_shape: tuple[int, ...],
    steps_per_epoch: int | None = None,
) -> TrainState:
    variables = model.init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=create_optimizer(config, steps_per_epoch),
        batch_stats=variables.get("batch_stats", {}),
    )


def preprocess(images: jax.Array, binarize_threshold: float) -> jax.Array:
    """uint8 images -> float32 vectors; binary (pixel/255 > threshold) unless threshold < 0."""
    x = images.reshape((images.shape[0], -1)).astype(jnp.float32) / 255.0
    if binarize_threshold >= 0:
        x = (x > binarize_threshold).astype(jnp.float32)
    return x


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(
    state: TrainState, batch: dict[str, jax.Array], dropout_rng: jax.Array | None = None,
    axis_name: str | None = None,
) -> tuple[TrainState, dict]:
    """One SGD step; BN uses batch statistics and updates its moving averages.

    Dropout (if the model has any) draws from ``dropout_rng`` folded with the
    step, so a resumed run draws the same masks. GoogLeNet's auxiliary
    classifiers, when on, add their losses with weight 0.3. Inside ``pmap``,
    ``axis_name`` averages the gradients and the loss over the devices.
    """
    rngs = None if dropout_rng is None else {"dropout": jax.random.fold_in(dropout_rng, state.step)}

    def loss_fn(params):
        outputs, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        logits, aux_logits = outputs if isinstance(outputs, tuple) else (outputs, ())
        loss = cross_entropy_loss(logits, batch["label"])
        for aux in aux_logits:
            loss += AUX_LOSS_WEIGHT * cross_entropy_loss(aux, batch["label"])
        return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads, loss = jax.lax.pmean((grads, loss), axis_name)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    return state, {"loss": loss}


def epoch_permutation(rng: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
    """The example order of one epoch: a function of the seed and the epoch only."""
    return jax.random.permutation(jax.random.fold_in(rng, epoch), num_examples)


def make_train_chunk(config: ml_collections.ConfigDict) -> Callable:
    """``chunk(state, epoch_order, images, labels, rng, start_step, num_steps)``
    -> ``(state, epoch_order, losses)``.

    Runs ``num_steps`` training steps in one compiled call. Mini-batches are
    drawn on the device without replacement: each epoch is a fresh
    permutation of the training set (``epoch_permutation``), cut into
    ``num_examples // batch_size`` consecutive batches (a remainder smaller
    than a batch is skipped). Batch k of a run is a function of the seed and
    k alone, so a resumed run sees exactly the batches it would have seen.

    ``epoch_order`` is ``(order, epoch)``, the current epoch's permutation,
    carried from one call to the next so that each epoch's permutation is
    computed once; start a run (or a resumed run) with
    ``no_epoch_order(num_examples)``.

    With ``config.parallel='pmap'`` every argument but ``state`` and
    ``epoch_order`` is broadcast, each device takes its slice of every global
    batch, and ``losses`` has a leading device axis. With ``'jit'`` on several
    devices the batch is sharded over them.
    """
    batch_size = config.batch_size
    threshold = config.data.binarize_threshold
    pmap = config.parallel == "pmap"
    local_batch = batch_size // jax.device_count() if pmap else batch_size
    mesh = parallel.data_mesh() if not pmap and jax.device_count() > 1 else None

    def chunk(state, epoch_order, images, labels, rng, start_step, num_steps):
        num_examples = images.shape[0]
        steps_per_epoch = num_examples // batch_size
        offset = jax.lax.axis_index(parallel.DATA_AXIS) * local_batch if pmap else 0

        def body(carry, step):
            state, (order, order_epoch) = carry
            epoch, position = jnp.divmod(step, steps_per_epoch)
            order = jax.lax.cond(
                epoch == order_epoch,
                lambda: order,
                lambda: epoch_permutation(rng, epoch, num_examples),
            )
            index = jax.lax.dynamic_slice_in_dim(order, position * batch_size + offset, local_batch)
            batch = {"image": preprocess(images[index], threshold), "label": labels[index]}
            if mesh is not None:
                batch = jax.lax.with_sharding_constraint(batch, parallel.batch_sharded(mesh))
            state, step_metrics = train_step(state, batch, axis_name=parallel.DATA_AXIS if pmap else None)
            return (state, (order, epoch)), step_metrics["loss"]

        steps = start_step + jnp.arange(num_steps)
        (state, epoch_order), losses = jax.lax.scan(body, (state, epoch_order), steps)
        return state, epoch_order, losses

    if pmap:
        return jax.pmap(
            chunk, parallel.DATA_AXIS, in_axes=(0, 0, None, None, None, None),
            static_broadcasted_argnums=6, donate_argnums=(0, 1),
        )
    return jax.jit(chunk, static_argnames="num_steps", donate_argnums=(0, 1))


def no_epoch_order(num_examples: int) -> tuple[jax.Array, jax.Array]:
    """An ``epoch_order`` matching no epoch: the first step computes its epoch's."""
    return jnp.zeros((num_examples,), jnp.int32), jnp.asarray(-1, jnp.int32)


def make_streamed_step(config: ml_collections.ConfigDict) -> Callable:
    """``step(state, batch, rng)`` -> ``(state, loss)``: one jitted training step on
    a host-fed batch ``{"image", "label"}`` (MNIST: uint8 images, binarised on
    the device; ImageNet: float32 crops preprocessed on the host). ``rng``
    seeds dropout. The state is donated. ``batch`` is this process's share of
    the global batch; the step splits it over the devices as
    ``config.parallel`` says (``state`` must be laid out for that loop:
    ``place_state``)."""
    if config.experiment == "mnist":
        threshold = config.data.binarize_threshold
        device_preprocess = lambda images: preprocess(images, threshold)  # noqa: E731
    else:
        device_preprocess = lambda images: images  # noqa: E731

    pmap = config.parallel == "pmap"

    def step(state, batch, rng):
        batch = {"image": device_preprocess(batch["image"]), "label": batch["label"]}
        if pmap:  # Each device its own dropout masks.
            rng = jax.random.fold_in(rng, jax.lax.axis_index(parallel.DATA_AXIS))
        state, step_metrics = train_step(state, batch, rng, axis_name=parallel.DATA_AXIS if pmap else None)
        return state, step_metrics["loss"]

    if pmap:
        pmapped = jax.pmap(step, parallel.DATA_AXIS, in_axes=(0, 0, None), donate_argnums=0)

        def pmap_step(state, batch, rng):
            state, loss = pmapped(state, parallel.split_for_pmap(batch), rng)
            return state, loss[0]

        return pmap_step
    if jax.device_count() == 1:
        return jax.jit(step, donate_argnums=0)
    mesh = parallel.data_mesh()
    jitted = jax.jit(
        step, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh), parallel.replicated(mesh)),
        out_shardings=parallel.replicated(mesh), donate_argnums=0,
    )
    return lambda state, batch, rng: jitted(state, parallel.shard_batch(batch, mesh), rng)


def host_batches(
    images: np.ndarray, labels: np.ndarray, rng: jax.Array, start_step: int, num_steps: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The mini-batches of steps ``start_step..start_step+num_steps-1`` on the host.

    The same batches, in the same order, as ``make_train_chunk`` draws on the
    device: this is the streamed path a loader-fed dataset takes.
    """
    num_examples = images.shape[0]
    steps_per_epoch = num_examples // batch_size
    order, order_epoch = None, None
    for step in range(start_step, start_step + num_steps):
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = np.asarray(epoch_permutation(rng, epoch, num_examples)), epoch
        index = order[position * batch_size : (position + 1) * batch_size]
        yield images[index], labels[index]


def make_eval_step(config: ml_collections.ConfigDict) -> Callable:
    """``evaluate(state, images, labels)`` -> test metrics over the whole set.

    Accuracy and loss in inference mode: BN normalises with
    ``state.batch_stats`` (moving averages, or population statistics once
    substituted). Also the 15th, 50th and 85th percentiles over the set of the
    input to sigmoid number ``config.model.tracked_unit`` of the last hidden
    layer (Figure 1(b, c)), as a training step feeds it: BN normalised with
    the statistics of the batch (here the whole set, nothing updated). The
    moving averages lag behind weights that move at every step, which would
    add noise unrelated to the distribution the sigmoid is trained on.
    """
    threshold = config.data.binarize_threshold
    unit = config.model.tracked_unit

    def forward(state, x, train):
        logits, intermediates = state.apply_fn(
            {"params": state.params, "batch_stats": state.batch_stats},
            x,
            train=train,
            mutable=["intermediates"],
        )
        return logits, intermediates["intermediates"][SIGMOID_INPUT][0][:, unit]

    virtual = parallel.bn_settings(_with_loop(config, "jit"), jax.device_count())["bn_virtual_batch_size"]

    @jax.jit
    def evaluate(state, images, labels):
        x = preprocess(images, threshold)
        logits, sigmoid_input = forward(state, x, train=False)
        if config.model.use_bn:  # (with virtual batches: the whole ones the test set holds)
            _, sigmoid_input = forward(state, x[: x.shape[0] // virtual * virtual] if virtual else x, train=True)
        p15, p50, p85 = jnp.percentile(sigmoid_input, jnp.array([15.0, 50.0, 85.0]))
        return {
            "test_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "test_loss": cross_entropy_loss(logits, labels),
            "sigmoid_input_p15": p15,
            "sigmoid_input_p50": p50,
            "sigmoid_input_p85": p85,
        }

    return evaluate


def compute_population_statistics(
    state: TrainState,
    images: jax.Array,
    rng: jax.Array,
    num_batches: int,
    batch_size: int,
    binarize_threshold: float,
) -> Any:
    """Algorithm 2: population statistics from ``num_batches`` training mini-batches.

    The mini-batches are drawn as in training (consecutive slices of fresh
    permutations of the training set, here from ``rng``); each goes through
    the network in training mode with the parameters fixed, and the moments
    every BN layer sees are averaged by
    :func:`bn_repro.batchnorm.population_statistics`, which applies the
    m/(m-1) correction. Returns a new ``batch_stats`` tree.
    """

    @functools.partial(jax.jit, static_argnames="num_batches")
    def moments_over_batches(state, images, rng, num_batches):
        num_examples = images.shape[0]
        per_epoch = num_examples // batch_size
        epochs = jnp.arange(-(-num_batches // per_epoch))
        orders = jax.vmap(lambda e: epoch_permutation(rng, e, num_examples)[: per_epoch * batch_size])(epochs)
        batch_indices = orders.reshape(-1, batch_size)[:num_batches]

        def one_batch(_, index):
            _, moments = state.apply_fn(
                {"params": state.params, "batch_stats": state.batch_stats},
                preprocess(images[index], binarize_threshold),
                train=True,
                mutable=[BATCH_MOMENTS],
            )
            return None, moments[BATCH_MOMENTS]

        _, stacked = jax.lax.scan(one_batch, None, batch_indices)
        return population_statistics(stacked)

    return moments_over_batches(state, images, rng, num_batches)


def check_same_config(config_path: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a run in a workdir that was started with another config."""
    if not os.path.exists(config_path):
        return
    with open(config_path) as f:
        previous = json.load(f)
    current = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, as stored
    changed = metrics_lib.config_differences(previous, current)
    if changed:
        raise ValueError(
            f"{config_path} was written by a run with a different config (fields: {', '.join(changed)}); "
            "resuming would mix two experiments. Use a new --workdir, or the same config."
        )


@jax.jit
def classification_eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums over the batch's real examples (``batch["mask"]`` 1) of top-1 and
    top-5 hits and of the loss, and their count.

    Inference mode: BN normalises with ``state.batch_stats`` (moving
    averages, or Algorithm 2's population statistics once substituted).
    """
    outputs = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    labels, mask = batch["label"], batch["mask"]
    top5 = jax.lax.top_k(logits, 5)[1]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "top1": jnp.sum((top5[:, 0] == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=1) * mask),
        "loss": jnp.sum(losses * mask),
        "count": jnp.sum(mask),
    }


def evaluate_classification(state: TrainState, batches: Iterable[dict]) -> dict:
    """Top-1, top-5 and mean loss over every real example of ``batches``."""
    totals = None
    for batch in batches:
        sums = classification_eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    count = totals["count"]
    return {"val_top1": totals["top1"] / count, "val_top5": totals["top5"] / count, "val_loss": totals["loss"] / count}


def population_statistics_from_batches(state: TrainState, batches: Iterable[dict], rng: jax.Array) -> Any:
    """Algorithm 2 over a stream of training mini-batches (the streamed
    counterpart of ``compute_population_statistics``): each batch goes through
    the network in training mode with fixed parameters, and the moments every
    BN layer sees are averaged with the m/(m-1) correction."""

    @jax.jit
    def moments(state, images):
        _, collections = state.apply_fn(
            {"params": state.params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=[BATCH_MOMENTS],
            rngs={"dropout": rng},  # Dropout follows the last BN layer: it changes no moment.
        )
        return collections[BATCH_MOMENTS]

    per_batch = [moments(state, batch["image"]) for batch in batches]
    return population_statistics(jax.tree.map(lambda *xs: jnp.stack(xs), *per_batch))


@jax.jit
def params_finite(params: Any) -> jax.Array:
    """False if any parameter is NaN or infinite (a run that reached "machine infinity")."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def _to_python(tree: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


class Experiment(NamedTuple):
    """What the training loop needs from a dataset.

    ``run_steps(state, step, num_steps)`` -> ``(state, losses)`` trains steps
    ``step+1..step+num_steps``; ``evaluate(state)`` -> the evaluation record;
    ``population_statistics(state)`` -> Algorithm 2's ``batch_stats``.
    ``accuracy_keys[0]`` is the accuracy the summary is about.
    """

    input_shape: tuple[int, ...]
    steps_per_epoch: int
    run_steps: Callable
    evaluate: Callable
    population_statistics: Callable
    accuracy_keys: tuple[str, ...]
    population_keys: tuple[str, ...]
    milestones: tuple[int, ...]
    targets: tuple[float, ...]


def mnist_experiment(config: ml_collections.ConfigDict, data_rng: jax.Array, population_rng: jax.Array) -> Experiment:
    """MNIST (Sec. 4.1) in device memory: mini-batches sampled on the device
    (``make_train_chunk``), or cut on the host and streamed (``data.on_device=False``)."""
    data = mnist_data.load_mnist(
        config.data.data_dir, expected=mnist_data.REAL_MNIST if config.data.verify_checksums else None
    )
    if config.batch_size > len(data["train_labels"]):
        raise ValueError(
            f"config.batch_size ({config.batch_size}) is larger than the training set "
            f"({len(data['train_labels'])} examples)"
        )
    arrays = {k: data[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    if config.parallel == "jit" and jax.device_count() > 1:  # one replicated global array each
        arrays = parallel.replicate_on_mesh(arrays, parallel.data_mesh())
    else:
        arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    test_images, test_labels = arrays["test_images"], arrays["test_labels"]

    pmap = config.parallel == "pmap"
    if config.data.on_device:
        train_chunk = make_train_chunk(config)
        epoch_order = no_epoch_order(train_images.shape[0])
        epoch_order = parallel.replicate_for_pmap(epoch_order) if pmap else epoch_order

        def run_steps(state, step, num_steps):
            nonlocal epoch_order
            state, epoch_order, losses = train_chunk(
                state, epoch_order, train_images, train_labels, data_rng, step, num_steps
            )
            return state, losses[0] if pmap else losses
    else:
        streamed_step = make_streamed_step(config)
        host_images, host_labels = data["train_images"], data["train_labels"]
        share = config.batch_size // jax.process_count()  # This process's slice of each global batch.
        mine = slice(jax.process_index() * share, (jax.process_index() + 1) * share)

        def run_steps(state, step, num_steps):
            losses = []
            for images, labels in host_batches(host_images, host_labels, data_rng, step, num_steps, config.batch_size):
                state, loss = streamed_step(state, {"image": images[mine], "label": labels[mine]}, data_rng)
                losses.append(loss)
            return state, jnp.stack(losses)

    eval_step = make_eval_step(config)
    return Experiment(
        input_shape=train_images.shape[1:],
        steps_per_epoch=train_images.shape[0] // config.batch_size,
        run_steps=run_steps,
        evaluate=lambda state: _to_python(eval_step(state, test_images, test_labels)),
        population_statistics=lambda state: compute_population_statistics(
            state, train_images, population_rng,
            config.bn.population_batches, config.batch_size, config.data.binarize_threshold,
        ),
        accuracy_keys=("test_accuracy",),
        population_keys=("test_accuracy", "test_loss"),
        milestones=metrics_lib.MILESTONES,
        targets=metrics_lib.TARGETS,
    )


# Figure 3: the steps at which the paper's nets matched Inception's 72.2%, and
# the five nets' maximum top-1 accuracies.
IMAGENET_MILESTONES = (2_100_000, 2_700_000, 6_000_000, 13_300_000, 31_000_000)
IMAGENET_TARGETS = (0.698, 0.722, 0.727, 0.730, 0.748)


def imagenet_experiment(config: ml_collections.ConfigDict, data_rng: jax.Array, population_rng: jax.Array) -> Experiment:
    """ImageNet (Sec. 4.2) streamed from TFDS ``imagenet2012`` by grain workers:
    augmented training crops, and the whole validation split (each example
    once, the last batch padded) in central crops."""
    d = config.data
    train_source = imagenet_data.open_split("train", d.data_dir)
    eval_source = imagenet_data.open_split(d.eval_split, d.data_dir)
    if config.batch_size > len(train_source):
        raise ValueError(
            f"config.batch_size ({config.batch_size}) is larger than the training set ({len(train_source)} examples)"
        )
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    seed = int(jax.random.randint(data_rng, (), 0, 2**31 - 1))
    population_seed = int(jax.random.randint(population_rng, (), 0, 2**31 - 1))

    def training_batches(seed, start_step, num_steps):
        return imagenet_data.train_batches(
            train_source, seed=seed, global_batch_size=config.batch_size, image_size=d.image_size,
            distortion_strength=d.distortion_strength, shuffle=d.shuffle, shuffle_window=d.shuffle_window,
            start_step=start_step, num_steps=num_steps, num_workers=d.num_workers, **process,
        )

    streamed_step = make_streamed_step(config)
    batches, next_step = None, None

    def run_steps(state, step, num_steps):
        nonlocal batches, next_step
        if batches is None or next_step != step:  # (re)start the stream where the run is
            batches = iter(training_batches(seed, step, config.num_steps - step))
        losses = []
        for _ in range(num_steps):
            state, loss = streamed_step(state, next(batches), data_rng)
            losses.append(loss)
        next_step = step + num_steps
        return state, jnp.stack(losses)


    mesh = parallel.data_mesh() if config.parallel == "jit" and jax.device_count() > 1 else None
    shard = mesh is not None and config.eval_batch_size % jax.device_count() == 0

    def evaluate(state):
        batches = imagenet_data.eval_batches(
            eval_source, global_batch_size=config.eval_batch_size, image_size=d.image_size,
            crop_fraction=d.crop_fraction, num_workers=d.num_workers, **process,
        )
        if shard:  # each process's share of every global evaluation batch
            batches = (parallel.shard_batch(batch, mesh) for batch in batches)
        return evaluate_classification(state, batches)

    return Experiment(
        input_shape=(d.image_size, d.image_size, 3),
        steps_per_epoch=imagenet_data.steps_per_epoch(len(train_source), config.batch_size),
        run_steps=run_steps,
        evaluate=evaluate,
        population_statistics=lambda state: population_statistics_from_batches(
            state, training_batches(population_seed, 0, config.bn.population_batches), population_rng
        ),
        accuracy_keys=("val_top1", "val_top5"),
        population_keys=("val_top1", "val_top5", "val_loss"),
        milestones=IMAGENET_MILESTONES,
        targets=IMAGENET_TARGETS,
    )


def _is_primary() -> bool:
    """Whether this process writes the run's files (with several processes, only process 0)."""
    return jax.process_index() == 0


def _record(metrics_path: str, record: dict) -> None:
    if _is_primary():
        metrics_lib.append_metrics(metrics_path, record)


def _with_population_statistics(
    state: TrainState, experiment: Experiment, config: ml_collections.ConfigDict, summary: dict,
    metrics_path: str, step: int,
) -> TrainState:
    """The final model (Algorithm 2): ``state`` with population statistics,
    evaluated, recorded in the summary and as the last metrics line."""
    population_stats = experiment.population_statistics(state)
    state = state.replace(batch_stats=population_stats)
    final = experiment.evaluate(state)
    for key in experiment.accuracy_keys:
        summary[f"final_{key}_population_stats"] = final[key]
    summary["population_batches"] = config.bn.population_batches
    _record(
        metrics_path,
        {"step": step, metrics_lib.AFTER_TRAINING: True,
         **{f"{key}_population_stats": final[key] for key in experiment.population_keys}},
    )
    return state


def place_state(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
    """``state`` laid out for the training loop: replicated over every device
    (``jit`` on several devices), one copy per local device (``pmap``), or as is."""
    if config.parallel == "pmap":
        return parallel.replicate_for_pmap(state)
    if jax.device_count() > 1:
        return parallel.replicate_on_mesh(state, parallel.data_mesh())
    return state


def synchronize_batch_stats(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
    """Under ``pmap``, every device's moving averages set to their mean over devices
    (they differ with per-device or virtual statistics); otherwise ``state``."""
    if config.parallel != "pmap" or not state.batch_stats:
        return state
    return state.replace(batch_stats=parallel.sync_batch_stats(state.batch_stats))


def single_program_state(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
    """The state as one program sees it, for evaluation, Algorithm 2 and checkpoints:
    under ``pmap``, device 0's copy with a model that needs no device axis."""
    if config.parallel != "pmap":
        return state
    return parallel.unreplicate(state).replace(apply_fn=create_model(config, loop="jit").apply)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, command: str = ""
) -> dict:
    """Trains, evaluating every ``eval_every`` steps, and returns the run's summary.

    Writes into ``workdir``: ``config.json`` (the resolved config),
    ``environment.json`` (devices, processes, versions, git commit: at the
    start), ``metrics.jsonl``, ``checkpoints/``, ``summary.json`` and, for a net with
    BN, ``final_model/`` (parameters with Algorithm 2's population
    statistics). If ``workdir`` holds a checkpoint, training resumes from it,
    and the metrics recorded after it are dropped, so the finished run's
    metrics are those of an uninterrupted run. A NaN/Inf loss or parameter
    ends the run cleanly, recorded as diverged (Sec. 4.2.2 reports divergence
    as a result).
    """
    config = parallel.with_global_batch(config, jax.device_count())
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, "config.json")
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    check_same_config(config_path, config)
    if _is_primary():
        metrics_lib.write_json(config_path, config.to_dict())
        # Where and with what this run (or this resumption of it) runs, from its start.
        metrics_lib.write_json(os.path.join(workdir, "environment.json"), metrics_lib.environment_info(command))

    init_rng, data_rng, population_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    setup = mnist_experiment if config.experiment == "mnist" else imagenet_experiment
    experiment = setup(config, data_rng, population_rng)
    model = create_model(config)
    state = create_train_state(init_rng, config, model, experiment.input_shape, experiment.steps_per_epoch)

    manager = checkpoints.checkpoint_manager(workdir)
    state, step = checkpoints.restore_latest(manager, state)
    if step:
        logging.info("Resuming from the checkpoint at step %d in %s", step, workdir)
    state = place_state(state, config)
    kept = metrics_lib.truncate_metrics(metrics_path, step, write=_is_primary())
    wall_time_before = next((r["wall_time_s"] for r in reversed(kept) if "wall_time_s" in r), 0.0)

    accuracy_key = experiment.accuracy_keys[0]
    start = time.perf_counter()
    diverged_at = None
    while step < config.num_steps:
        num_steps = min(config.eval_every, config.num_steps - step)
        chunk_start = time.perf_counter()
        state, losses = experiment.run_steps(state, step, num_steps)
        losses = np.asarray(jax.device_get(losses))
        steps_per_sec = num_steps / (time.perf_counter() - chunk_start)
        bad = metrics_lib.first_non_finite(losses.tolist())
        if bad is None and not params_finite(state.params):
            bad = num_steps - 1
        if bad is not None:
            diverged_at = step + bad + 1
            _record(metrics_path, {"step": diverged_at, "diverged": True})
            logging.error("Training diverged: non-finite loss or parameters at step %d", diverged_at)
            break
        step += num_steps
        state = synchronize_batch_stats(state, config)
        record = {"step": step, "train_loss": float(losses.mean())}
        record.update(experiment.evaluate(single_program_state(state, config)))
        record["steps_per_sec"] = steps_per_sec
        record["wall_time_s"] = wall_time_before + time.perf_counter() - start
        _record(metrics_path, record)
        logging.info(
            "[%s] step %d/%d  %.1f steps/s  train_loss %.4f  %s %.4f",
            config.variant, step, config.num_steps, steps_per_sec, record["train_loss"],
            accuracy_key, record[accuracy_key],
        )
        if step % config.checkpoint_every == 0 or step == config.num_steps:
            checkpoints.save(manager, step, single_program_state(state, config))
    wall_time = wall_time_before + time.perf_counter() - start
    state = single_program_state(state, config)

    records = metrics_lib.read_metrics(metrics_path)
    summary = {
        "variant": config.variant,
        **metrics_lib.summarize_accuracy(records, accuracy_key, experiment.milestones, experiment.targets),
    }
    for key in experiment.accuracy_keys[1:]:
        summary.update(metrics_lib.final_and_best(records, key))
    if diverged_at is not None:
        summary["diverged"] = True
        summary["diverged_at_step"] = diverged_at
    else:
        if config.model.use_bn:
            state = _with_population_statistics(state, experiment, config, summary, metrics_path, step)
        checkpoints.save_final_model(workdir, {"params": state.params, "batch_stats": state.batch_stats})
    summary["wall_time_s"] = wall_time
    rates = [r["steps_per_sec"] for r in records[1:] if "steps_per_sec" in r]  # [0] includes compilation
    summary["steps_per_sec_median"] = float(np.median(rates)) if rates else None
    summary["global_batch_size"] = config.batch_size
    summary["images_per_sec_median"] = summary["steps_per_sec_median"] * config.batch_size if rates else None
    summary["precision"] = config.model.get("dtype", "float32")
    summary["environment"] = metrics_lib.environment_info(command)
    if _is_primary():
        metrics_lib.write_json(os.path.join(workdir, "summary.json"), summary)
    manager.close()
    return summary
