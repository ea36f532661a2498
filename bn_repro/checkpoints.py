"""Orbax checkpoints: the training state, for resuming interrupted runs, and the
final model (parameters and the BN statistics it is evaluated with)."""

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


def checkpoint_manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A manager writing ``<workdir>/checkpoints/<step>``."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be read."""


DAMAGED = "checkpoints_damaged"


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, int]:
    """The newest readable checkpoint restored into ``target``'s structure, and its step.

    A checkpoint that cannot be read (e.g. files truncated by a disk fault or
    a copy cut short) is reported with its step and path, and the next newest
    is tried; once one is read, the unreadable newer ones are moved aside to
    ``<workdir>/checkpoints_damaged/<step>`` (never deleted), so that the run
    writes those steps afresh. Returns ``(target, 0)`` when there is none;
    CheckpointError, naming the directory and what to do, when none can be
    read (the checkpoints are then left as they are).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return target, 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    directory = os.fspath(manager.directory)
    damaged = []
    for step in steps:
        try:
            state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as error:  # noqa: BLE001 (orbax, tensorstore and JSON errors alike)
            logging.warning("The checkpoint at step %d (%s) cannot be read (%s: %s); trying the next newest.",
                            step, os.path.join(directory, str(step)), type(error).__name__, str(error)[:300])
            damaged.append(step)
            continue
        for bad in damaged:
            aside = os.path.join(os.path.dirname(directory), DAMAGED, str(bad))
            if os.path.exists(aside):
                shutil.rmtree(aside)  # an older copy of the same damaged step
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(os.path.join(directory, str(bad)), aside)
            logging.warning("Resuming from step %d; the unreadable checkpoint of step %d is now in %s.", step, bad, aside)
        if damaged:
            manager.reload()
        return state, step
    raise CheckpointError(
        f"No checkpoint in {directory} can be read (steps {', '.join(map(str, steps))}; the errors are logged above). "
        f"To continue the run, put an intact copy of a checkpoint in {directory}/<step>; to start it over, "
        f"delete {directory} (and the run's metrics.jsonl) or give it a new --workdir."
    )


FINAL_MODEL = "final_model"


def save_final_model(workdir: str, variables: Any) -> None:
    """Writes ``<workdir>/final_model``: ``{"params", "batch_stats"}`` (for a BN net,
    Algorithm 2's population statistics), replacing an earlier one."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(os.path.abspath(workdir), FINAL_MODEL), variables, force=True)


def load_final_model(workdir: str, target: Any = None) -> Any:
    """The variables ``save_final_model`` wrote, on this process's first device.

    ``target`` (a tree of arrays or shapes) gives the structure; without it,
    the saved one. Either way a model trained on any number of devices loads
    here.
    """
    path = os.path.join(os.path.abspath(workdir), FINAL_MODEL)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} holds no finished run (the final model is written when "
            "training ends without diverging)"
        )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        if target is None:
            target = checkpointer.metadata(path).item_metadata.tree
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
        return checkpointer.restore(path, abstract)
