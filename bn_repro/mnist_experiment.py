"""The MNIST experiment of Sec. 4.1 (Figure 1): the 784-100-100-100-10 sigmoid MLP.

The whole dataset lives in device memory. ``make_train_chunk`` samples the
mini-batches on the device and fuses ``eval_every`` steps into one compiled
``lax.scan``, so the loop is not bound by Python; with
``data.on_device=False`` the same batches are cut on the host
(``host_batches``) and fed one jitted step at a time, the path a streamed
dataset takes. Evaluation covers the whole test set and follows one sigmoid's
input distribution (Figure 1(b, c)); Algorithm 2 runs over training
mini-batches drawn as in training (``population_stats_on_device``).
"""

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import flax.linen as nn

from bn_repro import mnist_data, parallel
from bn_repro.batchnorm import BATCH_MOMENTS, Norm, population_statistics
from bn_repro.mlp import MLP, SIGMOID_INPUT
from bn_repro.train import Experiment, Setup, cross_entropy_loss, make_streamed_step, train_step

ACCURACY_KEYS = ("test_accuracy",)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the offending MNIST field."""
    if not 0 <= config.model.tracked_unit < config.model.hidden_units[-1]:
        raise ValueError(
            f"config.model.tracked_unit ({config.model.tracked_unit}) must index a unit "
            f"of the last hidden layer (0..{config.model.hidden_units[-1] - 1})"
        )


def create_model(config: ml_collections.ConfigDict, norm: Norm | None) -> nn.Module:
    """The MLP of Sec. 4.1, with ``norm`` before each sigmoid (None: no BN)."""
    m = config.model
    return MLP(hidden_units=tuple(m.hidden_units), num_classes=m.num_classes, weight_init_std=m.weight_init_std,
               norm=norm)


def preprocess(images: jax.Array, binarize_threshold: float) -> jax.Array:
    """uint8 images -> float32 vectors; binary (pixel/255 > threshold) unless threshold < 0."""
    x = images.reshape((images.shape[0], -1)).astype(jnp.float32) / 255.0
    if binarize_threshold >= 0:
        x = (x > binarize_threshold).astype(jnp.float32)
    return x


def epoch_permutation(rng: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
    """The example order of one epoch: a function of the seed and the epoch only."""
    return jax.random.permutation(jax.random.fold_in(rng, epoch), num_examples)


def no_epoch_order(num_examples: int) -> tuple[jax.Array, jax.Array]:
    """An ``epoch_order`` matching no epoch: the first step computes its epoch's."""
    return jnp.zeros((num_examples,), jnp.int32), jnp.asarray(-1, jnp.int32)


def make_train_chunk(config: ml_collections.ConfigDict, layout: parallel.Layout) -> Callable:
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

    Under ``pmap`` every argument but ``state`` and ``epoch_order`` is
    broadcast, each device takes its slice of every global batch, and
    ``losses`` has a leading device axis. Under ``jit`` on several devices
    the batch is sharded over them.
    """
    batch_size = config.batch_size
    threshold = config.data.binarize_threshold
    pmap, mesh = layout.pmap, layout.mesh
    local_batch = batch_size // layout.device_count if pmap else batch_size

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


def make_eval_step(config: ml_collections.ConfigDict, virtual_batch_size: int | None) -> Callable:
    """``evaluate(state, images, labels)`` -> test metrics over the whole set.

    Accuracy and loss in inference mode: BN normalises with
    ``state.batch_stats`` (moving averages, or population statistics once
    substituted). Also the 15th, 50th and 85th percentiles over the set of the
    input to sigmoid number ``config.model.tracked_unit`` of the last hidden
    layer (Figure 1(b, c)), as a training step feeds it: BN normalised with
    the statistics of the batch (here the whole set, or the whole virtual
    batches of ``virtual_batch_size`` it holds; nothing updated). The moving
    averages lag behind weights that move at every step, which would add
    noise unrelated to the distribution the sigmoid is trained on.
    """
    threshold = config.data.binarize_threshold
    unit = config.model.tracked_unit
    use_bn = config.model.use_bn

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
        if use_bn:
            v = virtual_batch_size
            _, sigmoid_input = forward(state, x[: x.shape[0] // v * v] if v else x, train=True)
        p15, p50, p85 = jnp.percentile(sigmoid_input, jnp.array([15.0, 50.0, 85.0]))
        return {
            "test_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "test_loss": cross_entropy_loss(logits, labels),
            "sigmoid_input_p15": p15,
            "sigmoid_input_p50": p50,
            "sigmoid_input_p85": p85,
        }

    return evaluate


@functools.partial(jax.jit, static_argnames=("num_batches", "batch_size", "binarize_threshold"))
def population_stats_on_device(
    state: Any, images: jax.Array, rng: jax.Array, num_batches: int, batch_size: int, binarize_threshold: float,
) -> Any:
    """Algorithm 2 over ``num_batches`` training mini-batches of the in-memory set.

    The mini-batches are drawn as in training (consecutive slices of fresh
    permutations of the training set, here from ``rng``); each goes through
    the network in training mode with the parameters fixed, and the moments
    every BN layer sees are averaged by
    :func:`bn_repro.batchnorm.population_statistics`, which applies the
    m/(m-1) correction. Returns a new ``batch_stats`` tree.
    """
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


def _to_python(tree: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def experiment(config: ml_collections.ConfigDict, setup: Setup, data_rng: jax.Array,
               population_rng: jax.Array) -> Experiment:
    """MNIST in device memory: mini-batches sampled on the device
    (``make_train_chunk``), or cut on the host and streamed (``data.on_device=False``)."""
    layout = setup.layout
    data = mnist_data.load_mnist(
        config.data.data_dir, expected=mnist_data.REAL_MNIST if config.data.verify_checksums else None
    )
    if config.batch_size > len(data["train_labels"]):
        raise ValueError(
            f"config.batch_size ({config.batch_size}) is larger than the training set "
            f"({len(data['train_labels'])} examples)"
        )
    arrays = layout.place_data({k: data[k] for k in ("train_images", "train_labels", "test_images", "test_labels")})
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    test_images, test_labels = arrays["test_images"], arrays["test_labels"]

    if config.data.on_device:
        train_chunk = make_train_chunk(config, layout)
        epoch_order = no_epoch_order(train_images.shape[0])
        epoch_order = parallel.replicate_for_pmap(epoch_order) if layout.pmap else epoch_order

        def run_steps(state, step, num_steps):
            nonlocal epoch_order
            state, epoch_order, losses = train_chunk(
                state, epoch_order, train_images, train_labels, data_rng, step, num_steps
            )
            return state, layout.unstack(losses)
    else:
        threshold = config.data.binarize_threshold
        streamed_step = make_streamed_step(layout, lambda images: preprocess(images, threshold))
        host_images, host_labels = data["train_images"], data["train_labels"]
        share = config.batch_size // jax.process_count()  # This process's slice of each global batch.
        mine = slice(jax.process_index() * share, (jax.process_index() + 1) * share)

        def run_steps(state, step, num_steps):
            losses = []
            for images, labels in host_batches(host_images, host_labels, data_rng, step, num_steps, config.batch_size):
                state, loss = streamed_step(state, {"image": images[mine], "label": labels[mine]}, data_rng)
                losses.append(loss)
            return state, jnp.stack(losses)

    eval_step = make_eval_step(config, layout.program_bn.virtual_batch_size)
    return Experiment(
        input_shape=train_images.shape[1:],
        steps_per_epoch=train_images.shape[0] // config.batch_size,
        run_steps=run_steps,
        evaluate=lambda state: _to_python(eval_step(state, test_images, test_labels)),
        final_batch_stats=lambda state: population_stats_on_device(
            state, train_images, population_rng,
            config.bn.population_batches, config.batch_size, config.data.binarize_threshold,
        ),
        accuracy_keys=ACCURACY_KEYS,
        population_keys=("test_accuracy", "test_loss"),
    )
