"""Multi-crop and ensemble evaluation of ImageNet runs (Sec. 4.2.3, Figure 4).

The paper's best results evaluate each network on GoogLeNet's 144 crops of
every validation image (``imagenet_preprocessing.multicrop_images``) and
predict with the class probabilities averaged over the crops and then over an
ensemble of 6 networks. Figure 4's rows are (crops, models) = (1, 1), the
single central crop that training evaluates; (144, 1); and (144, 6).

A run is a training workdir (``bn_repro.main --workdir``): its
``config.json`` and, by default, its ``final_model`` (for a BN net the
parameters with Algorithm 2's population statistics), or a training
checkpoint (moving averages). Evaluation is single-process: this process
reads every example of the split exactly once, decoding and cropping in grain
worker processes (guard the main module: they are spawned).
"""

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bn_repro import checkpoints, classification_experiment, image_data, parallel, run_records, train

# What members of an ensemble must agree on (crop_fraction only for the central crop).
# The same examples in the same input shape, and the same classes (a config written before
# data.channels existed had 3 channels).
SHARED_FIELDS = ("data.dataset", "data.image_size", "data.channels", "model.num_classes")
DEFAULTS = {"data.channels": 3}


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """One trained network: its config, model and variables ``{"params", "batch_stats"}``."""

    workdir: str
    step: int | None  # None: the final model.
    config: ml_collections.ConfigDict
    model: nn.Module
    variables: Any


def load_trained_model(workdir: str, step: int | None = None) -> TrainedModel:
    """The final model of the run in ``workdir``, or its training checkpoint at ``step``."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{workdir} holds no run: {config_path} does not exist")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.experiment != "classification":
        raise ValueError(f"{workdir} is a {config.experiment!r} run; multi-crop evaluation is for classification runs")
    # Inference only: BN normalises with its stored statistics, wherever they came from.
    model = classification_experiment.create_model(config, train.create_norm(config, parallel.BNPlacement(None, None)))
    shape = (config.data.image_size, config.data.image_size, config.data.get("channels", 3))
    if step is None:
        abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
        target = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
        return TrainedModel(workdir, None, config, model, jax.device_put(checkpoints.load_final_model(workdir, target)))
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"{workdir} has no checkpoint at step {step} (no checkpoints/ directory)")
    abstract = jax.eval_shape(lambda: train.create_train_state(jax.random.PRNGKey(0), config, model, shape, 1))
    with checkpoints.checkpoint_manager(workdir) as manager:
        if step not in manager.all_steps():
            raise FileNotFoundError(
                f"{workdir} has no checkpoint at step {step} (its checkpoints: {sorted(manager.all_steps())})"
            )
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return TrainedModel(workdir, step, config, model, jax.device_put(variables))


@functools.partial(jax.jit, static_argnums=0)
def crop_probabilities(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
    """Class probabilities (softmax, inference mode) averaged over each example's crops.

    ``images``: (B, crops, S, S, 3), or (B, S, S, 3) for one crop; returns (B, classes) float32.
    """
    batch, crops = images.shape[0], images.shape[1] if images.ndim == 5 else 1
    outputs = model.apply(variables, images.reshape((batch * crops, *images.shape[-3:])), train=False)
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probabilities.reshape((batch, crops, -1)).mean(axis=1)


def _check_crops(crops: int) -> None:
    if crops not in image_data.EVAL_CROPS:
        raise ValueError(f"crops must be one of {image_data.EVAL_CROPS}, got {crops}")


def _as_runs(runs: Sequence[str | TrainedModel]) -> list[TrainedModel]:
    return [run if isinstance(run, TrainedModel) else load_trained_model(run) for run in runs]


def check_compatible(runs: Sequence[TrainedModel], crops: int) -> None:
    """Raises ValueError naming the field if the runs cannot be evaluated on the same crops."""
    fields = SHARED_FIELDS + (("data.crop_fraction",) if crops == 1 else ())
    for name in fields:
        values = {run.workdir: functools.reduce(lambda c, key: c.get(key, {}), name.split("."), run.config) or
                  DEFAULTS.get(name) for run in runs}
        if len(set(values.values())) > 1:
            raise ValueError(f"The runs disagree on config.{name}: {values}")


def probabilities(runs: Sequence[str | TrainedModel], *, crops: int = 144, data_dir: str | None = None,
                  split: str = "validation", num_workers: int | None = None,
                  batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, classes), labels (n,)) over every example of ``split``:
    the mean over ``runs`` of each run's crop-averaged class probabilities.

    Runs are workdirs (their final models) or loaded ``TrainedModel``s. Defaults come
    from the first run's config: its data dir and workers, and ``batch_size``
    (examples a batch) ``eval_batch_size // crops`` (at least 1).
    """
    _check_crops(crops)
    runs = _as_runs(runs)
    if not runs:
        raise ValueError("No runs to evaluate")
    check_compatible(runs, crops)
    config = runs[0].config
    source = classification_experiment.open_split(config.data.dataset, split, data_dir or config.data.data_dir)
    batches = image_data.eval_batches(
        source, crops=crops, image_size=config.data.image_size, crop_fraction=config.data.crop_fraction,
        global_batch_size=batch_size or max(1, config.eval_batch_size // crops),
        num_workers=config.data.num_workers if num_workers is None else num_workers,
        channels=config.data.get("channels", 3),
    )
    probs, labels = [], []
    for batch in batches:
        images, mask = jnp.asarray(batch["image"]), np.asarray(batch["mask"]) > 0
        mean = sum(crop_probabilities(run.model, run.variables, images) for run in runs) / len(runs)
        probs.append(np.asarray(mean)[mask])
        labels.append(np.asarray(batch["label"])[mask])
    return np.concatenate(probs), np.concatenate(labels)


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 and top-5 accuracy and error (ties to the lower class, as ``lax.top_k``),
    and the mean cross-entropy of the predicted probabilities."""
    top5 = np.asarray(jax.lax.top_k(jnp.asarray(probs), 5)[1])
    top1_acc = float(np.mean(top5[:, 0] == labels))
    top5_acc = float(np.mean(np.any(top5 == labels[:, None], axis=1)))
    p_label = np.take_along_axis(probs, labels[:, None].astype(np.int64), axis=1)[:, 0]
    loss = float(np.mean(-np.log(np.maximum(p_label, np.finfo(np.float32).tiny))))
    return {"top1": top1_acc, "top1_error": 1 - top1_acc, "top5": top5_acc, "top5_error": 1 - top5_acc, "loss": loss}


def evaluate(runs: Sequence[str | TrainedModel], *, crops: int = 144, data_dir: str | None = None,
             split: str = "validation", num_workers: int | None = None, batch_size: int | None = None) -> dict:
    """Figure 4's evaluation of one network or an ensemble: ``classification_metrics``
    of ``probabilities``, with the number of examples, crops and models."""
    _check_crops(crops)
    runs = _as_runs(runs)
    probs, labels = probabilities(runs, crops=crops, data_dir=data_dir, split=split, num_workers=num_workers,
                                  batch_size=batch_size)
    return {**classification_metrics(probs, labels), "num_examples": int(len(labels)), "crops": crops,
            "models": len(runs), "split": split, "workdirs": [os.path.abspath(r.workdir) for r in runs],
            "steps": [r.step for r in runs]}


def format_results(results: dict) -> str:
    """One line per metric."""
    keys = ("top1", "top1_error", "top5", "top5_error", "loss", "num_examples", "crops", "models", "split")
    return "\n".join(f"{k:<13}{results[k]:.4f}" if isinstance(results[k], float) else f"{k:<13}{results[k]}"
                     for k in keys)


def write_results(path: str, results: dict, command: str) -> None:
    """``results`` and the command that produced them, as JSON."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    run_records.write_json(path, {"command": command, **results})
