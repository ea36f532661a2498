"""Training and evaluation: flat functions in the style of the flax examples.

``train_step`` is one SGD step on one mini-batch and knows nothing about where
the batch came from. Two drivers feed it:

* in-memory datasets (MNIST) live whole on the device; ``make_train_chunk``
  samples the mini-batches on the device and fuses ``eval_every`` steps into
  one compiled ``lax.scan``, so the loop is not bound by Python;
* streamed datasets (a host-side iterator of batches, as an ImageNet loader
  gives) call a jitted ``train_step`` once per batch (``make_streamed_step``).

The final model's BN layers get the population statistics of Algorithm 2
(``compute_population_statistics``).
"""

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from bn_repro import checkpoints, mnist_data
from bn_repro import metrics as metrics_lib
from bn_repro.batchnorm import BATCH_MOMENTS, population_statistics
from bn_repro.mlp import MLP, SIGMOID_INPUT


class TrainState(train_state.TrainState):
    """Parameters, optimizer state, step, and BN's moving averages."""

    batch_stats: Any


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the offending field for inconsistent values."""
    positive = ("batch_size", "num_steps", "eval_every", "checkpoint_every", "bn.population_batches")
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
    if not 0 <= config.model.tracked_unit < config.model.hidden_units[-1]:
        raise ValueError(
            f"config.model.tracked_unit ({config.model.tracked_unit}) must index a unit "
            f"of the last hidden layer (0..{config.model.hidden_units[-1] - 1})"
        )
    if not 0.0 <= config.bn.momentum < 1.0:
        raise ValueError(f"config.bn.momentum must be in [0, 1), got {config.bn.momentum}")
    if config.bn.epsilon < 0:
        raise ValueError(f"config.bn.epsilon must be >= 0, got {config.bn.epsilon}")
    create_learning_rate_schedule(config)  # raises for an unknown config.lr_schedule


def _get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def create_model(config: ml_collections.ConfigDict) -> MLP:
    return MLP(
        hidden_units=tuple(config.model.hidden_units),
        num_classes=config.model.num_classes,
        use_bn=config.model.use_bn,
        weight_init_std=config.model.weight_init_std,
        bn_momentum=config.bn.momentum,
        bn_epsilon=config.bn.epsilon,
        bn_use_fast_variance=config.bn.use_fast_variance,
    )


def create_learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """``constant``, or ``cosine`` decay from ``learning_rate`` to 0 over ``num_steps``."""
    if config.lr_schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(config.learning_rate, config.num_steps)
    raise ValueError(f"config.lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}")


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD (with momentum if ``config.momentum``), plus L2 weight decay on the
    layers' weight matrices (not biases or BN's gamma/beta) if ``config.weight_decay``."""
    sgd = optax.sgd(create_learning_rate_schedule(config), momentum=config.momentum or None)
    if not config.weight_decay:
        return sgd
    kernels_only = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: path[-1].key == "kernel", params
    )
    return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=kernels_only), sgd)


def create_train_state(
    rng: jax.Array, config: ml_collections.ConfigDict, model: MLP, input_shape: tuple[int, ...]
) -> TrainState:
    variables = model.init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=create_optimizer(config),
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


def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
    """One SGD step; BN uses batch statistics and updates its moving averages."""

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        return cross_entropy_loss(logits, batch["label"]), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
    """
    batch_size = config.batch_size
    threshold = config.data.binarize_threshold

    @functools.partial(jax.jit, static_argnames="num_steps", donate_argnums=(0, 1))
    def chunk(state, epoch_order, images, labels, rng, start_step, num_steps):
        num_examples = images.shape[0]
        steps_per_epoch = num_examples // batch_size

        def body(carry, step):
            state, (order, order_epoch) = carry
            epoch, position = jnp.divmod(step, steps_per_epoch)
            order = jax.lax.cond(
                epoch == order_epoch,
                lambda: order,
                lambda: epoch_permutation(rng, epoch, num_examples),
            )
            index = jax.lax.dynamic_slice_in_dim(order, position * batch_size, batch_size)
            batch = {"image": preprocess(images[index], threshold), "label": labels[index]}
            state, step_metrics = train_step(state, batch)
            return (state, (order, epoch)), step_metrics["loss"]

        steps = start_step + jnp.arange(num_steps)
        (state, epoch_order), losses = jax.lax.scan(body, (state, epoch_order), steps)
        return state, epoch_order, losses

    return chunk


def no_epoch_order(num_examples: int) -> tuple[jax.Array, jax.Array]:
    """An ``epoch_order`` matching no epoch: the first step computes its epoch's."""
    return jnp.zeros((num_examples,), jnp.int32), jnp.asarray(-1, jnp.int32)


def make_streamed_step(config: ml_collections.ConfigDict) -> Callable:
    """``step(state, images, labels)`` -> (state, loss) for host-fed uint8 batches."""
    threshold = config.data.binarize_threshold

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, images, labels):
        state, step_metrics = train_step(state, {"image": preprocess(images, threshold), "label": labels})
        return state, step_metrics["loss"]

    return step


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

    @jax.jit
    def evaluate(state, images, labels):
        x = preprocess(images, threshold)
        logits, sigmoid_input = forward(state, x, train=False)
        if config.model.use_bn:
            _, sigmoid_input = forward(state, x, train=True)
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
    changed = sorted(_diff_fields(previous, current))
    if changed:
        raise ValueError(
            f"{config_path} was written by a run with a different config (fields: {', '.join(changed)}); "
            "resuming would mix two experiments. Use a new --workdir, or the same config."
        )


def _diff_fields(a: dict, b: dict, prefix: str = "config") -> list[str]:
    fields = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            fields += _diff_fields(x, y, f"{prefix}.{key}")
        elif x != y:
            fields.append(f"{prefix}.{key}")
    return fields


def _to_python(tree: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, command: str = ""
) -> dict:
    """Trains, evaluating every ``eval_every`` steps, and returns the run's summary.

    Writes into ``workdir``: ``config.json`` (the resolved config),
    ``metrics.jsonl``, ``checkpoints/`` and ``summary.json``. If ``workdir``
    holds a checkpoint, training resumes from it, and the metrics recorded
    after it are dropped, so the finished run's metrics are those of an
    uninterrupted run.
    """
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, "config.json")
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    check_same_config(config_path, config)
    metrics_lib.write_json(config_path, config.to_dict())

    data = mnist_data.load_mnist(
        config.data.data_dir, expected=mnist_data.REAL_MNIST if config.data.verify_checksums else None
    )
    if config.batch_size > len(data["train_labels"]):
        raise ValueError(
            f"config.batch_size ({config.batch_size}) is larger than the training set "
            f"({len(data['train_labels'])} examples)"
        )
    train_images = jnp.asarray(data["train_images"])
    train_labels = jnp.asarray(data["train_labels"])
    test_images = jnp.asarray(data["test_images"])
    test_labels = jnp.asarray(data["test_labels"])

    init_rng, data_rng, population_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    model = create_model(config)
    state = create_train_state(init_rng, config, model, train_images.shape[1:])

    manager = checkpoints.checkpoint_manager(workdir)
    state, step = checkpoints.restore_latest(manager, state)
    if step:
        logging.info("Resuming from the checkpoint at step %d in %s", step, workdir)
    kept = metrics_lib.truncate_metrics(metrics_path, step)
    wall_time_before = next((r["wall_time_s"] for r in reversed(kept) if "wall_time_s" in r), 0.0)

    if config.data.on_device:
        train_chunk = make_train_chunk(config)
        epoch_order = no_epoch_order(train_images.shape[0])

        def run_steps(state, step, num_steps):
            nonlocal epoch_order
            state, epoch_order, losses = train_chunk(
                state, epoch_order, train_images, train_labels, data_rng, step, num_steps=num_steps
            )
            return state, losses
    else:
        streamed_step = make_streamed_step(config)
        host_images, host_labels = data["train_images"], data["train_labels"]

        def run_steps(state, step, num_steps):
            losses = []
            for images, labels in host_batches(host_images, host_labels, data_rng, step, num_steps, config.batch_size):
                state, loss = streamed_step(state, images, labels)
                losses.append(loss)
            return state, jnp.stack(losses)

    evaluate = make_eval_step(config)
    start = time.perf_counter()
    diverged_at = None
    while step < config.num_steps:
        num_steps = min(config.eval_every, config.num_steps - step)
        chunk_start = time.perf_counter()
        state, losses = run_steps(state, step, num_steps)
        losses = np.asarray(jax.device_get(losses))
        steps_per_sec = num_steps / (time.perf_counter() - chunk_start)
        bad = metrics_lib.first_non_finite(losses.tolist())
        if bad is not None:
            diverged_at = step + bad + 1
            metrics_lib.append_metrics(metrics_path, {"step": diverged_at, "diverged": True})
            logging.error("Training diverged: non-finite loss at step %d", diverged_at)
            break
        step += num_steps
        record = {"step": step, "train_loss": float(losses.mean())}
        record.update(_to_python(evaluate(state, test_images, test_labels)))
        record["steps_per_sec"] = steps_per_sec
        record["wall_time_s"] = wall_time_before + time.perf_counter() - start
        metrics_lib.append_metrics(metrics_path, record)
        logging.info(
            "[%s] step %d/%d  %.0f steps/s  train_loss %.4f  test_accuracy %.4f",
            config.variant, step, config.num_steps, steps_per_sec, record["train_loss"], record["test_accuracy"],
        )
        if step % config.checkpoint_every == 0 or step == config.num_steps:
            checkpoints.save(manager, step, state)
    wall_time = wall_time_before + time.perf_counter() - start

    records = metrics_lib.read_metrics(metrics_path)
    summary = {"variant": config.variant, **metrics_lib.summarize_accuracy(records)}
    if diverged_at is not None:
        summary["diverged"] = True
        summary["diverged_at_step"] = diverged_at
    elif config.model.use_bn:
        population_stats = compute_population_statistics(
            state, train_images, population_rng,
            config.bn.population_batches, config.batch_size, config.data.binarize_threshold,
        )
        final = _to_python(evaluate(state.replace(batch_stats=population_stats), test_images, test_labels))
        summary["final_test_accuracy_population_stats"] = final["test_accuracy"]
        summary["population_batches"] = config.bn.population_batches
        metrics_lib.append_metrics(
            metrics_path,
            {"step": step, metrics_lib.AFTER_TRAINING: True,
             "test_accuracy_population_stats": final["test_accuracy"],
             "test_loss_population_stats": final["test_loss"]},
        )
    summary["wall_time_s"] = wall_time
    rates = [r["steps_per_sec"] for r in records[1:] if "steps_per_sec" in r]  # [0] includes compilation
    summary["steps_per_sec_median"] = float(np.median(rates)) if rates else None
    summary["environment"] = metrics_lib.environment_info(command)
    metrics_lib.write_json(os.path.join(workdir, "summary.json"), summary)
    manager.close()
    return summary
