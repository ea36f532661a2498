"""Image classification over a TFDS dataset (Sec. 4.2: ImageNet, Figures 2 and 3).

``config.data.dataset`` names the TFDS dataset (``imagenet2012`` for the
paper); its training split is streamed by grain workers as augmented crops of
``data.image_size`` (Inception crops, flips, photometric distortions of
``data.distortion_strength``, ``data.shuffle`` 'global' or 'window'), and its
``data.eval_split`` is evaluated whole, each example once in a central crop
(``data.crop_fraction``), for top-1, top-5 and the loss. Algorithm 2 runs over
freshly drawn training batches (``population_stats_from_stream``). The networks
are BN-Inception (Figure 5, with or without BN) and GoogLeNet.
"""

from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bn_repro import fashion_mnist_data, image_data, imagenet_data, parallel
from bn_repro.batchnorm import BATCH_MOMENTS, Norm, population_statistics
from bn_repro.models.bn_inception import BNInception
from bn_repro.models.googlenet import GoogLeNet
from bn_repro.models.layers import NONLINEARITIES
from bn_repro.train import Experiment, Setup, field, make_streamed_step, stop_requested

ACCURACY_KEYS = ("val_top1", "val_top5")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ARCHITECTURES = ("bn_inception", "googlenet")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the offending field of a classification config."""
    for name in ("eval_batch_size", "data.image_size", "data.shuffle_window", "model.num_classes"):
        value = field(config, name)
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
    choices = {
        "model.architecture": ARCHITECTURES,
        "model.nonlinearity": tuple(NONLINEARITIES),
        "model.dtype": tuple(DTYPES),
        "data.shuffle": image_data.SHUFFLES,
        "data.channels": image_data.CHANNELS,
    }
    for name, allowed in choices.items():
        if field(config, name) not in allowed:
            raise ValueError(f"config.{name} must be one of {allowed}, got {field(config, name)!r}")
    if config.data.shuffle == "window" and config.data.shuffle_window % config.batch_size:
        raise ValueError(
            f"config.data.shuffle_window ({config.data.shuffle_window}) must be a multiple of the global batch "
            f"(config.batch_size = {config.batch_size}) with config.data.shuffle='window', so that every "
            "mini-batch holds the same examples in every epoch (the baseline's shuffling, Sec. 4.2.1 item 6)"
        )
    if not 0.0 <= config.model.dropout_rate < 1.0:
        raise ValueError(f"config.model.dropout_rate must be in [0, 1), got {config.model.dropout_rate}")
    if not 0.0 < config.data.crop_fraction <= 1.0:
        raise ValueError(f"config.data.crop_fraction must be in (0, 1], got {config.data.crop_fraction}")
    if not 0.0 <= config.data.distortion_strength <= 1.0:
        raise ValueError(f"config.data.distortion_strength must be in [0, 1], got {config.data.distortion_strength}")
    for name in ("lr_multiplier", "l2_reduction", "model.width"):
        if not field(config, name) > 0:
            raise ValueError(f"config.{name} must be > 0, got {field(config, name)!r}")


def create_model(config: ml_collections.ConfigDict, norm: Norm | None) -> nn.Module:
    """BN-Inception (Figure 5) or GoogLeNet, with ``norm`` after every convolution (None: no BN)."""
    m = config.model
    common = dict(num_classes=m.num_classes, norm=norm, nonlinearity=m.nonlinearity, dropout_rate=m.dropout_rate,
                  use_lrn=m.use_lrn, width=m.width, dtype=DTYPES[m.dtype])
    if m.architecture == "googlenet":
        return GoogLeNet(aux_heads=m.aux_heads, **common)
    return BNInception(separable_stem=m.separable_stem, pool_proj_4cd=m.pool_proj_4cd, **common)


def open_split(dataset: str, split: str, data_dir: str | None) -> Sequence[dict]:
    """A split of the TFDS dataset; for ``imagenet2012`` an unreadable one is
    diagnosed (tars missing or incomplete, not prepared, tfrecord format);
    ``fashion_mnist`` is prepared from its original files if it is not yet
    (on a data dir shared by several hosts, prepare it once beforehand)."""
    if dataset == imagenet_data.NAME:
        return imagenet_data.open_split(split, data_dir)
    if dataset == fashion_mnist_data.NAME:  # Prepared from its original files on first use.
        data_dir = fashion_mnist_data.prepare_fashion_mnist(data_dir)
    return image_data.open_split(dataset, split, data_dir)


@jax.jit
def classification_eval_step(state: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
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


def evaluate_classification(state: Any, batches: Iterable[dict]) -> dict:
    """Top-1, top-5 and mean loss over every real example of ``batches``."""
    totals = None
    for batch in batches:
        sums = classification_eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    count = totals["count"]
    return {"val_top1": totals["top1"] / count, "val_top5": totals["top5"] / count, "val_loss": totals["loss"] / count}


def population_stats_from_stream(state: Any, batches: Iterable[dict], rng: jax.Array,
                                 mesh: jax.sharding.Mesh | None = None) -> Any:
    """Algorithm 2 over a stream of training mini-batches: each goes through the
    network in training mode with fixed parameters, and the moments every BN
    layer sees are averaged with the m/(m-1) correction.

    With a ``mesh`` (``jit`` on several devices, one or many processes) each
    batch is this process's slice of a global batch: the slices are assembled
    into one global array sharded over the mesh, so that every process computes
    the same statistics, over the m of the global batch that training normalised
    over (not over its own slice)."""

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

    if mesh is not None:
        batches = (parallel.shard_batch(batch, mesh) for batch in batches)
    per_batch = [moments(state, batch["image"]) for batch in batches]
    return population_statistics(jax.tree.map(lambda *xs: jnp.stack(xs), *per_batch))


def experiment(config: ml_collections.ConfigDict, setup: Setup, data_rng: jax.Array,
               population_rng: jax.Array) -> Experiment:
    """The dataset streamed by grain workers: augmented training crops, and the
    whole evaluation split (each example once, the last batch padded) in central crops."""
    d, layout = config.data, setup.layout
    train_source = open_split(d.dataset, "train", d.data_dir)
    eval_source = open_split(d.dataset, d.eval_split, d.data_dir)
    if config.batch_size > len(train_source):
        raise ValueError(
            f"config.batch_size ({config.batch_size}) is larger than the training set ({len(train_source)} examples)"
        )
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    seed = int(jax.random.randint(data_rng, (), 0, 2**31 - 1))
    population_seed = int(jax.random.randint(population_rng, (), 0, 2**31 - 1))

    def training_batches(seed, start_step, num_steps):
        return image_data.train_batches(
            train_source, seed=seed, global_batch_size=config.batch_size, image_size=d.image_size,
            distortion_strength=d.distortion_strength, shuffle=d.shuffle, shuffle_window=d.shuffle_window,
            start_step=start_step, num_steps=num_steps, num_workers=d.num_workers, channels=d.channels, **process,
        )

    streamed_step = make_streamed_step(layout)
    batches, next_step = None, None

    def run_steps(state, step, num_steps):
        nonlocal batches, next_step
        if batches is None or next_step != step:  # (re)start the stream where the run is
            batches = iter(training_batches(seed, step, config.num_steps - step))
        losses = []
        for i in range(num_steps):
            if stop_requested(step + i):  # a preemption: train_and_evaluate checkpoints after step + i
                break
            state, loss = streamed_step(state, next(batches), data_rng)
            losses.append(loss)
        next_step = step + len(losses)
        return state, losses  # device scalars, fetched by the loop (no program built per interval length)

    shard = layout.mesh is not None and config.eval_batch_size % layout.device_count == 0

    cached_eval_batches = None

    def evaluate(state):
        nonlocal cached_eval_batches
        batches = cached_eval_batches or image_data.eval_batches(
            eval_source, global_batch_size=config.eval_batch_size, image_size=d.image_size,
            crop_fraction=d.crop_fraction, num_workers=d.num_workers, channels=d.channels, **process,
        )
        if d.cache_eval_batches and cached_eval_batches is None:  # central crops: the same every evaluation
            batches = cached_eval_batches = list(batches)
        if shard:  # each process's share of every global evaluation batch
            batches = (parallel.shard_batch(batch, layout.mesh) for batch in batches)
        return evaluate_classification(state, batches)

    return Experiment(
        input_shape=(d.image_size, d.image_size, d.channels),
        steps_per_epoch=image_data.steps_per_epoch(len(train_source), config.batch_size),
        run_steps=run_steps,
        evaluate=evaluate,
        final_batch_stats=lambda state: population_stats_from_stream(
            state, training_batches(population_seed, 0, config.bn.population_batches), population_rng, layout.mesh
        ),
        accuracy_keys=ACCURACY_KEYS,
        population_keys=("val_top1", "val_top5", "val_loss"),
        compiled_init=True,
    )
