"""Orbax checkpoints: the training state, for resuming interrupted runs, and the
final model (parameters and the BN statistics it is evaluated with)."""

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
