"""Data parallelism: one training step over many devices (and hosts).

Two loops share the model, loss, optimizer and metrics code (``config.parallel``):

* ``jit`` (default): the global batch is one array sharded over a 1-D mesh of
  every device (``NamedSharding``), the state is replicated, and XLA inserts
  the collectives. BN's plain reductions over the batch are then global.
* ``pmap``: each local device gets its share of the batch and a copy of the
  state; gradients are averaged with ``pmean``, and BN synchronises its
  statistics only when told to (``axis_name``).

Where BN takes its statistics from is ``config.bn.statistics``:

* ``global``: the whole global batch (synchronised BN);
* ``per_device``: each device's share, as unsynchronised data parallelism does;
* ``virtual``: groups of ``config.bn.virtual_batch_size`` consecutive examples,
  whatever the device count: the paper's per-worker mini-batch of 32 (Sec. 4.2).

Under ``pmap`` with per-device or virtual statistics, the devices' moving
averages drift apart; ``sync_batch_stats`` averages them before every
evaluation and checkpoint, which equals what ``jit`` keeps (the mean over groups).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "batch"
LOOPS = ("jit", "pmap")
STATISTICS = ("global", "per_device", "virtual")


def with_global_batch(config: ml_collections.ConfigDict, device_count: int) -> ml_collections.ConfigDict:
    """``config`` with ``batch_size`` = ``per_device_batch_size`` x devices when
    ``per_device_batch_size`` is set (> 0); otherwise ``config`` itself
    (``batch_size`` is then the global batch, whatever the device count)."""
    per_device = config.get("per_device_batch_size", 0)
    if not per_device:
        return config
    config = config.copy_and_resolve_references()
    config.batch_size = per_device * device_count
    return config


def validate(config: ml_collections.ConfigDict, device_count: int) -> None:
    """Raises ValueError naming the field when the batch cannot be split as asked."""
    if config.parallel not in LOOPS:
        raise ValueError(f"config.parallel must be one of {LOOPS}, got {config.parallel!r}")
    if config.bn.statistics not in STATISTICS:
        raise ValueError(f"config.bn.statistics must be one of {STATISTICS}, got {config.bn.statistics!r}")
    if config.batch_size % device_count:
        raise ValueError(
            f"config.batch_size ({config.batch_size}) must be a multiple of the {device_count} devices "
            "(the global batch is split evenly)"
        )
    if jax.process_count() > 1 and config.parallel != "jit":
        raise ValueError("config.parallel must be 'jit' with several processes (the pmap loop runs on one host)")
    if jax.process_count() > 1 and config.get("eval_batch_size", device_count) % device_count:
        raise ValueError(
            f"config.eval_batch_size ({config.eval_batch_size}) must be a multiple of the {device_count} devices "
            "with several processes (each evaluates its share of every batch)"
        )
    if config.bn.statistics == "virtual":
        v, per_device = config.bn.virtual_batch_size, config.batch_size // device_count
        if not (isinstance(v, int) and v > 0 and per_device % v == 0):
            raise ValueError(
                f"config.bn.virtual_batch_size ({v}) must be a positive divisor of the per-device batch "
                f"({per_device} = config.batch_size / {device_count} devices)"
            )


def bn_settings(config: ml_collections.ConfigDict, device_count: int) -> dict:
    """The BatchNorm fields (``bn_axis_name``, ``bn_virtual_batch_size``) that
    give ``config.bn.statistics`` under ``config.parallel`` on ``device_count`` devices."""
    mode, pmap = config.bn.statistics, config.parallel == "pmap"
    if mode == "global":
        return {"bn_axis_name": DATA_AXIS if pmap and device_count > 1 else None, "bn_virtual_batch_size": None}
    if mode == "per_device":
        per_device = config.batch_size // device_count
        return {"bn_axis_name": None, "bn_virtual_batch_size": None if pmap or device_count == 1 else per_device}
    return {"bn_axis_name": None, "bn_virtual_batch_size": config.bn.virtual_batch_size}


def data_mesh() -> Mesh:
    """A 1-D mesh of every device of every process."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """This process's slice of the global batch -> global arrays sharded over ``mesh``."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate_on_mesh(tree: Any, mesh: Mesh) -> Any:
    """One global array per leaf, replicated on every device of ``mesh``; every
    process must pass the same values (they are copied from this host, not across hosts)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), tree)


def replicate_for_pmap(tree: Any) -> Any:
    """One copy per local device, along a new leading axis (``pmap``'s layout)."""
    devices = jax.local_devices()
    sharding = NamedSharding(Mesh(np.asarray(devices), (DATA_AXIS,)), P(DATA_AXIS))
    return jax.tree.map(
        lambda x: jax.device_put(jnp.broadcast_to(jnp.asarray(x), (len(devices), *np.shape(x))), sharding), tree
    )


def unreplicate(tree: Any) -> Any:
    """Device 0's copy of a ``pmap``-replicated tree."""
    return jax.tree.map(lambda x: x[0], tree)


def split_for_pmap(batch: Any) -> Any:
    """(b, ...) -> (local devices, b / local devices, ...)."""
    n = jax.local_device_count()
    return jax.tree.map(lambda x: np.asarray(x).reshape((n, -1) + np.shape(x)[1:]), batch)


def sync_batch_stats(batch_stats: Any) -> Any:
    """The mean over devices of ``pmap``-replicated moving averages (every copy set to it)."""
    return jax.pmap(lambda bs: jax.lax.pmean(bs, DATA_AXIS), DATA_AXIS)(batch_stats)
