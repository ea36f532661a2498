"""The training loop every experiment shares, as flat functions (after flax's examples).

``train_and_evaluate`` decides everything derived from the config once, at
its top (:func:`create_setup`: the device layout, BN's statistics mode, the
training and evaluation models), asks the experiment family for its data
(:class:`Experiment`), and then only loops: train ``eval_every`` steps,
evaluate, record, checkpoint. At the end a net with BN gets Algorithm 2's
population statistics and is evaluated and saved with them.

The families are modules with the same three functions (``validate_config``,
``create_model``, ``experiment``), picked by ``config.experiment``:

* ``mnist`` (:mod:`bn_repro.mnist_experiment`): Sec. 4.1, the dataset in
  device memory, many steps per compiled call;
* ``classification`` (:mod:`bn_repro.classification_experiment`): Sec. 4.2,
  a TFDS image dataset (``imagenet2012``) streamed by grain workers.
"""

import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from bn_repro import checkpoints, parallel, run_records
from bn_repro import metrics as metrics_lib
from bn_repro.batchnorm import BatchNorm, Norm


class Experiment(NamedTuple):
    """What the training loop needs from an experiment family.

    ``run_steps(state, step, num_steps)`` -> ``(state, losses)`` trains steps
    ``step+1..step+num_steps`` (or fewer, one loss per step trained, once
    :func:`stop_requested`); ``evaluate(state)`` -> the evaluation record;
    ``final_batch_stats(state)`` -> Algorithm 2's population statistics (a
    ``batch_stats`` tree). ``accuracy_keys[0]`` is the accuracy the summary is
    about; ``population_keys`` are recorded for the final model.
    ``compiled_init``: the initial variables come from one compiled program (a
    deep net: one compilation instead of one per op) rather than op by op.
    """

    input_shape: tuple[int, ...]
    steps_per_epoch: int
    run_steps: Callable
    evaluate: Callable
    final_batch_stats: Callable
    accuracy_keys: tuple[str, ...]
    population_keys: tuple[str, ...]
    compiled_init: bool = False


class Setup(NamedTuple):
    """What the config determines before training starts.

    ``model`` is the network the training loop runs (BN placed as ``layout.train_bn``);
    ``program_model`` the one a single program evaluates, runs Algorithm 2 with
    and checkpoints (the same network and variables; BN as ``layout.program_bn``).
    """

    family: ModuleType
    layout: parallel.Layout
    model: nn.Module
    program_model: nn.Module


class TrainState(train_state.TrainState):
    """Parameters, optimizer state, step, and BN's moving averages."""

    batch_stats: Any


# GoogLeNet's auxiliary classifiers' loss weight (arXiv:1409.4842, Sec. 5).
AUX_LOSS_WEIGHT = 0.3
SCHEDULES = ("constant", "cosine", "exponential")


def experiment_family(config: ml_collections.ConfigDict) -> ModuleType:
    """The module implementing ``config.experiment``."""
    if config.experiment == "mnist":
        from bn_repro import mnist_experiment

        return mnist_experiment
    if config.experiment == "classification":
        from bn_repro import classification_experiment

        return classification_experiment
    raise ValueError(f"config.experiment must be 'mnist' or 'classification', got {config.experiment!r}")


def validate_config(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raises ValueError naming the offending field: the fields the loop reads
    here, the family's own (its ``validate_config``), and the device split."""
    for name in ("batch_size", "num_steps", "eval_every", "checkpoint_every", "bn.population_batches",
                 "lr_reference_batch_size"):
        value = field(config, name)
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
    log_every = config.log_every
    if not (isinstance(log_every, int) and log_every > 0):
        raise ValueError(f"config.log_every must be a positive integer, got {log_every!r}")
    eval_at = config.get("eval_at", ())
    if not all(isinstance(s, int) and s > 0 for s in eval_at):
        raise ValueError(f"config.eval_at must be a tuple of positive step numbers, got {eval_at!r}")
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
    if config.lr_schedule not in SCHEDULES:
        raise ValueError(f"config.lr_schedule must be one of {SCHEDULES}, got {config.lr_schedule!r}")
    if config.lr_schedule == "exponential":
        for name in ("lr_decay_epochs", "lr_decay_speedup"):
            if not field(config, name) > 0:
                raise ValueError(f"config.{name} must be > 0, got {field(config, name)!r}")
    if config.lr_scaling not in ("none", "linear"):
        raise ValueError(f"config.lr_scaling must be 'none' or 'linear', got {config.lr_scaling!r}")
    experiment_family(config).validate_config(config)
    parallel.validate_config(config, device_count or jax.device_count())


def evaluation_steps(config: ml_collections.ConfigDict) -> list[int]:
    """The steps after which the loop evaluates: every ``eval_every`` steps, each
    step of ``eval_at`` (extra evaluations, e.g. denser early in a run), and the last."""
    every = range(config.eval_every, config.num_steps + 1, config.eval_every)
    extra = (s for s in config.get("eval_at", ()) if s < config.num_steps)
    return sorted({*every, *extra, config.num_steps})


def field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    """``config.a.b`` for ``dotted`` = ``'a.b'``."""
    for part in dotted.split("."):
        config = config[part]
    return config


def create_norm(config: ml_collections.ConfigDict, placement: parallel.BNPlacement) -> Norm | None:
    """The run's BN layer, handed to every model: ``BatchNorm`` with every
    ``config.bn`` setting and the device ``placement`` bound (None without BN)."""
    if not config.model.use_bn:
        return None
    return functools.partial(
        BatchNorm, momentum=config.bn.momentum, epsilon=config.bn.epsilon,
        use_fast_variance=config.bn.use_fast_variance, axis_name=placement.axis_name,
        virtual_batch_size=placement.virtual_batch_size,
    )


def create_setup(config: ml_collections.ConfigDict, device_count: int | None = None) -> Setup:
    """The family, device layout and models of a (validated) config."""
    family = experiment_family(config)
    layout = parallel.layout(config, device_count or jax.device_count())
    model, program_model = (
        family.create_model(config, create_norm(config, placement)) for placement in (layout.train_bn, layout.program_bn)
    )
    return Setup(family, layout, model, program_model)


def initial_learning_rate(config: ml_collections.ConfigDict) -> float:
    """``learning_rate`` times ``lr_multiplier`` (Sec. 4.2.1 item 1; 1 if the config has
    none), and, with ``lr_scaling='linear'``, times ``batch_size / lr_reference_batch_size``
    (the linear scaling rule for a larger global batch over more devices)."""
    lr = config.learning_rate * config.get("lr_multiplier", 1.0)
    if config.lr_scaling == "linear":
        lr *= config.batch_size / config.lr_reference_batch_size
    return lr


def create_learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """``constant``; ``cosine`` decay to 0 over ``num_steps``; or ``exponential``:
    GoogLeNet's staircase, x``lr_decay_rate`` every ``lr_decay_epochs`` /
    ``lr_decay_speedup`` epochs (Sec. 4.2.1 item 4 speeds it up 6x)."""
    lr = initial_learning_rate(config)
    if config.lr_schedule == "constant":
        return optax.constant_schedule(lr)
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(lr, config.num_steps)
    every = max(1, round(config.lr_decay_epochs / config.lr_decay_speedup * steps_per_epoch))
    return optax.exponential_decay(lr, every, config.lr_decay_rate, staircase=True)


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
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
    rng: jax.Array, config: ml_collections.ConfigDict, model: nn.Module, input_shape: tuple[int, ...],
    steps_per_epoch: int, compiled_init: bool = False,
) -> TrainState:
    """The initial state. With ``compiled_init`` the variables come from one
    compiled program; XLA may then round them differently from op-by-op
    initialisation (the default)."""
    init = jax.jit(model.init, static_argnames="train") if compiled_init else model.init
    variables = init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=create_optimizer(config, steps_per_epoch),
        batch_stats=variables.get("batch_stats", {}),
    )


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


def make_streamed_step(layout: parallel.Layout, preprocess: Callable[[jax.Array], jax.Array] | None = None) -> Callable:
    """``step(state, batch, rng)`` -> ``(state, loss)``: one jitted training step on
    a host-fed batch ``{"image", "label"}``, ``preprocess`` applied to the images
    on the device. ``rng`` seeds dropout. The state is donated. ``batch`` is
    this process's share of the global batch; the step splits it over the
    devices as ``layout`` says (``state`` laid out by ``layout.place_state``)."""
    preprocess = preprocess or (lambda images: images)

    def step(state, batch, rng):
        batch = {"image": preprocess(batch["image"]), "label": batch["label"]}
        if layout.pmap:  # Each device its own dropout masks.
            rng = jax.random.fold_in(rng, jax.lax.axis_index(parallel.DATA_AXIS))
        state, step_metrics = train_step(state, batch, rng, axis_name=parallel.DATA_AXIS if layout.pmap else None)
        return state, step_metrics["loss"]

    if layout.pmap:
        pmapped = jax.pmap(step, parallel.DATA_AXIS, in_axes=(0, 0, None), donate_argnums=0)

        def pmap_step(state, batch, rng):
            state, loss = pmapped(state, parallel.split_for_pmap(batch), rng)
            return state, loss[0]

        return pmap_step
    if layout.mesh is None:
        return jax.jit(step, donate_argnums=0)
    mesh = layout.mesh
    jitted = jax.jit(
        step, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh), parallel.replicated(mesh)),
        out_shardings=parallel.replicated(mesh), donate_argnums=0,
    )
    return lambda state, batch, rng: jitted(state, parallel.shard_batch(batch, mesh), rng)


@jax.jit
def params_finite(params: Any) -> jax.Array:
    """False if any parameter is NaN or infinite (a run that reached "machine infinity")."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def is_primary() -> bool:
    """Whether this process writes the run's files (with several processes, only process 0)."""
    return jax.process_index() == 0


def _record(metrics_path: str, record: dict) -> None:
    if is_primary():
        run_records.append_metrics(metrics_path, record)


def log_progress(config: ml_collections.ConfigDict, step: int, losses: np.ndarray, steps_per_sec: float,
                 seconds_per_step: float) -> None:
    """A progress line: step, mean train loss since the last line, steps/s and images/s over those steps, and
    the time left at this process's average pace so far (evaluations included)."""
    left = (config.num_steps - step) * seconds_per_step
    logging.info(
        "[%s] step %d/%d  train_loss %.4f  %.1f steps/s  %.0f images/s  about %s left",
        config.variant, step, config.num_steps, float(losses.mean()), steps_per_sec, steps_per_sec * config.batch_size,
        time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.1f} days",
    )


# Set on a preemption (SIGTERM or SIGINT; on several processes, the step they agreed
# on): the loop stops after the current step, checkpoints there and returns.
PREEMPTION = threading.Event()
PREEMPTED = "preempted"  # the metrics record of the stop: the evaluation interval's losses so far
_asked_up_to = [0]  # the last step stop_requested has asked JAX's preemption sync about


def stop_requested(step: int) -> bool:
    """Whether the run stops after ``step`` steps (a preemption).

    On one process: whether SIGTERM or SIGINT arrived (:data:`PREEMPTION`). On
    several: JAX's preemption sync service (started by ``jax.distributed``)
    catches SIGTERM on any process, tells every process, and they agree on the
    first step all of them still reach; every process stops there. The service
    must be asked about every step in order, on every process: this asks about
    each step up to ``step`` not yet asked, so a family's ``run_steps`` that
    loops over steps asks before each (stopping at the agreed step itself), and
    ``train_and_evaluate`` asks after each chunk for one that does not (stopping
    at the end of the chunk that holds the agreed step).
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        for s in range(_asked_up_to[0] + 1, step + 1):
            if multihost_utils.reached_preemption_sync_point(s) and not PREEMPTION.is_set():
                logging.warning("A process was preempted (the agreed step: %d): all processes stop after step %d, "
                                "with a checkpoint there.", s, step)
                PREEMPTION.set()
            _asked_up_to[0] = s
    return PREEMPTION.is_set()


@contextlib.contextmanager
def preemption_handlers(start_step: int):
    """SIGTERM and SIGINT set :data:`PREEMPTION` instead of killing the run (one
    process, main thread only). On several processes SIGTERM is left to JAX's
    preemption sync service (:func:`stop_requested`), and SIGINT keeps its default."""
    PREEMPTION.clear()
    _asked_up_to[0] = start_step
    if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
        yield
        return

    def request_stop(signum, frame):
        logging.warning("Received %s: stopping after the current step, with a checkpoint there.",
                        signal.Signals(signum).name)
        PREEMPTION.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def preempt(config: ml_collections.ConfigDict, workdir: str, manager: Any, metrics_path: str, step: int,
            state: TrainState, interval_losses: list[np.ndarray], writer: Any) -> dict:
    """Ends a preempted run resumably: a checkpoint at ``step``, and a metrics
    record of the evaluation interval's losses so far (the resumed run takes
    them back and drops the record, so that its metrics are an uninterrupted
    run's). Written in that order, each atomically."""
    if step not in manager.all_steps():
        checkpoints.save(manager, step, state)
    losses = np.concatenate(interval_losses).tolist() if interval_losses else []
    _record(metrics_path, {"step": step, PREEMPTED: True, "interval_losses": losses})
    manager.close()
    if writer is not None:
        writer.close()
    logging.warning("Stopped at step %d/%d with a checkpoint there; run the same command to resume %s.",
                    step, config.num_steps, workdir)
    return {"variant": config.variant, "preempted_at_step": step}


def check_workdir(workdir: str) -> None:
    """NotADirectoryError naming ``workdir`` if it exists and is not a directory."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"--workdir {workdir} is a file, not a directory: give a directory for the run's "
                                 "files (it is created if it does not exist)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, command: str = "") -> dict:
    """Trains, evaluating at :func:`evaluation_steps`, and returns the run's summary.

    Writes into ``workdir``: ``config.json`` (the resolved config),
    ``environment.json`` (devices, processes, versions, git commit: at the
    start), ``metrics.jsonl``, ``checkpoints/``, ``summary.json`` and
    ``final_model/`` (parameters, with Algorithm 2's population statistics
    for a net with BN). If ``workdir`` holds a checkpoint, training resumes
    from it, and the metrics recorded after it are dropped, so the finished
    run's metrics are those of an uninterrupted run. A NaN/Inf loss or
    parameter ends the run cleanly, recorded as diverged (Sec. 4.2.2 reports
    divergence as a result).
    """
    config = parallel.with_global_batch(config, jax.device_count())
    validate_config(config)
    setup = create_setup(config)
    layout = setup.layout
    check_workdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, "config.json")
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    run_records.check_same_config(config_path, config)
    init_rng, data_rng, population_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    experiment = setup.family.experiment(config, setup, data_rng, population_rng)  # (may refuse the data)
    if is_primary():
        run_records.write_json(config_path, config.to_dict())
        # Where and with what this run (or this resumption of it) runs, from its start.
        run_records.write_json(os.path.join(workdir, "environment.json"), run_records.environment_info(command))
    state = create_train_state(init_rng, config, setup.model, experiment.input_shape, experiment.steps_per_epoch,
                               experiment.compiled_init)
    single_program = functools.partial(layout.single_program, program_apply_fn=setup.program_model.apply)

    manager = checkpoints.checkpoint_manager(workdir)
    state, step = checkpoints.restore_latest(manager, state)
    if step:
        logging.info("Resuming from the checkpoint at step %d in %s", step, workdir)
    state = layout.place_state(state)
    kept = run_records.truncate_metrics(metrics_path, step, write=is_primary())
    wall_time_before = next((r["wall_time_s"] for r in reversed(kept) if "wall_time_s" in r), 0.0)

    interval_losses = []
    if kept and kept[-1].get(PREEMPTED) and kept[-1]["step"] == step:  # resuming a preempted run
        interval_losses = [np.asarray(kept[-1]["interval_losses"], np.float32)]
        if is_primary():
            run_records.write_json_lines(metrics_path, kept[:-1])
    accuracy_key = experiment.accuracy_keys[0]
    writer = run_records.tensorboard_writer(workdir, step) if is_primary() else None
    learning_rate = create_learning_rate_schedule(config, experiment.steps_per_epoch)
    start = time.perf_counter()
    diverged_at = None
    eval_steps = evaluation_steps(config)
    log_every = config.log_every
    first_step, interval_time, interval_steps = step, 0.0, 0
    with preemption_handlers(step):
        while step < config.num_steps and not PREEMPTION.is_set():
            next_eval = next(s for s in eval_steps if s > step)
            num_steps = min(next_eval, (step // log_every + 1) * log_every) - step
            chunk_start = time.perf_counter()
            state, losses = experiment.run_steps(state, step, num_steps)
            losses = np.asarray(jax.device_get(losses))
            chunk_time = time.perf_counter() - chunk_start
            num_steps = len(losses)  # fewer if a preemption stopped the chunk early
            bad = metrics_lib.first_non_finite(losses.tolist())
            if bad is None and not params_finite(state.params):
                bad = num_steps - 1
            if bad is not None:
                diverged_at = step + bad + 1
                _record(metrics_path, {"step": diverged_at, "diverged": True})
                run_records.write_scalars(writer, diverged_at, {"diverged": 1.0})
                logging.error("Training diverged: non-finite loss or parameters at step %d", diverged_at)
                break
            step += num_steps
            interval_losses.append(losses)
            interval_time += chunk_time
            interval_steps += num_steps
            if stop_requested(step) and step < next_eval:
                break  # mid-interval: no evaluation
            if step < next_eval:  # a progress line between evaluations
                log_progress(config, step, losses, num_steps / chunk_time,
                             (time.perf_counter() - start) / (step - first_step))
                run_records.write_scalars(writer, step, {"train_loss": float(losses.mean()),
                                                         "steps_per_sec": num_steps / chunk_time,
                                                         "learning_rate": float(learning_rate(step))})
                continue
            losses, steps_per_sec = np.concatenate(interval_losses), interval_steps / interval_time
            interval_losses, interval_time, interval_steps = [], 0.0, 0
            state = layout.sync_batch_stats(state)
            record = {"step": step, "train_loss": float(losses.mean())}
            record.update(experiment.evaluate(single_program(state)))
            record["steps_per_sec"] = steps_per_sec
            record["wall_time_s"] = wall_time_before + time.perf_counter() - start
            _record(metrics_path, record)
            run_records.write_scalars(writer, step, {**record, "learning_rate": float(learning_rate(step))})
            logging.info(
                "[%s] step %d/%d  %.1f steps/s  train_loss %.4f  %s %.4f",
                config.variant, step, config.num_steps, steps_per_sec, record["train_loss"],
                accuracy_key, record[accuracy_key],
            )
            if step % config.checkpoint_every == 0 or step == config.num_steps:
                checkpoints.save(manager, step, single_program(state))
    if PREEMPTION.is_set() and diverged_at is None and step < config.num_steps:
        return preempt(config, workdir, manager, metrics_path, step, single_program(state), interval_losses, writer)
    wall_time = wall_time_before + time.perf_counter() - start
    state = single_program(state)

    records = run_records.read_metrics(metrics_path)
    summary = {
        "variant": config.variant,
        **metrics_lib.summarize_accuracy(records, accuracy_key, config.milestones, config.targets),
    }
    for key in experiment.accuracy_keys[1:]:
        summary.update(metrics_lib.final_and_best(records, key))
    if diverged_at is not None:
        summary["diverged"] = True
        summary["diverged_at_step"] = diverged_at
    else:
        if config.model.use_bn:  # The final model (Algorithm 2): population statistics.
            state = state.replace(batch_stats=experiment.final_batch_stats(state))
            final = experiment.evaluate(state)
            for key in experiment.accuracy_keys:
                summary[f"final_{key}_population_stats"] = final[key]
            summary["population_batches"] = config.bn.population_batches
            population = {f"{key}_population_stats": final[key] for key in experiment.population_keys}
            _record(metrics_path, {"step": step, run_records.AFTER_TRAINING: True, **population})
            run_records.write_scalars(writer, step, population)
        checkpoints.save_final_model(workdir, {"params": state.params, "batch_stats": state.batch_stats})
    summary["wall_time_s"] = wall_time
    rates = [r["steps_per_sec"] for r in records[1:] if "steps_per_sec" in r]  # [0] includes compilation
    summary["steps_per_sec_median"] = float(np.median(rates)) if rates else None
    summary["global_batch_size"] = config.batch_size
    summary["images_per_sec_median"] = summary["steps_per_sec_median"] * config.batch_size if rates else None
    summary["precision"] = config.model.get("dtype", "float32")
    summary["environment"] = run_records.environment_info(command)
    if is_primary():
        run_records.write_json(os.path.join(workdir, "summary.json"), summary)
    manager.close()
    if writer is not None:
        writer.close()
    return summary
