"""Orbax checkpoints of the training state, for resuming interrupted runs."""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def checkpoint_manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A manager writing ``<workdir>/checkpoints/<step>``."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, int]:
    """The newest checkpoint restored into ``target``'s structure, and its step.

    Returns ``(target, 0)`` when there is none.
    """
    step = manager.latest_step()
    if step is None:
        return target, 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract)), step
