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

import dataclasses
import functools
from typing import Any, NamedTuple

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


def validate_config(config: ml_collections.ConfigDict, device_count: int) -> None:
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


class BNPlacement(NamedTuple):
    """Where a BatchNorm takes its training statistics from: synchronised over the
    ``pmap`` axis ``axis_name``, and/or per group of ``virtual_batch_size`` examples."""

    axis_name: str | None
    virtual_batch_size: int | None


def bn_placement(statistics: str, loop: str, device_count: int, batch_size: int, virtual_batch_size: int) -> BNPlacement:
    """The BatchNorm fields that give ``statistics`` ('global', 'per_device' or
    'virtual') in the training loop ``loop`` on ``device_count`` devices."""
    pmap = loop == "pmap"
    if statistics == "global":
        return BNPlacement(DATA_AXIS if pmap and device_count > 1 else None, None)
    if statistics == "per_device":
        return BNPlacement(None, None if pmap or device_count == 1 else batch_size // device_count)
    return BNPlacement(None, virtual_batch_size)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one run spreads over the devices, decided once from the config.

    ``train_bn`` is BN's placement in the training loop; ``program_bn`` in the
    single program that evaluates, computes Algorithm 2 and checkpoints (the
    same under ``jit``; under ``pmap`` that program sees the whole batch, so
    per-device statistics become virtual batches of the per-device size).
    ``mesh`` is the 1-D mesh of every device under ``jit`` on several devices.
    """

    loop: str
    device_count: int
    mesh: Mesh | None
    train_bn: BNPlacement
    program_bn: BNPlacement

    @property
    def pmap(self) -> bool:
        return self.loop == "pmap"

    def place_state(self, state: Any) -> Any:
        """``state`` laid out for the training loop: replicated over every device
        (``jit`` on several devices), one copy per local device (``pmap``), or as is."""
        if self.pmap:
            return replicate_for_pmap(state)
        return replicate_on_mesh(state, self.mesh) if self.mesh is not None else state

    def place_data(self, tree: Any) -> Any:
        """Arrays every step reads whole (an in-memory dataset): one replicated
        global array each under ``jit`` on several devices, else device arrays."""
        if self.mesh is not None:
            return replicate_on_mesh(tree, self.mesh)
        return jax.tree.map(jnp.asarray, tree)

    def sync_batch_stats(self, state: Any) -> Any:
        """Under ``pmap``, every device's moving averages set to their mean over devices
        (they differ with per-device or virtual statistics); otherwise ``state``."""
        if not self.pmap or not state.batch_stats:
            return state
        return state.replace(batch_stats=sync_batch_stats(state.batch_stats))

    def single_program(self, state: Any, program_apply_fn: Any) -> Any:
        """The state as one program sees it: under ``pmap``, device 0's copy with
        ``program_apply_fn`` (a model that needs no device axis); otherwise ``state``."""
        return unreplicate(state).replace(apply_fn=program_apply_fn) if self.pmap else state

    def unstack(self, per_device: Any) -> Any:
        """Device 0's value of a ``pmap`` output (they are equal after ``pmean``); else as is."""
        return per_device[0] if self.pmap else per_device


def layout(config: ml_collections.ConfigDict, device_count: int) -> Layout:
    """The run's :class:`Layout` (``config`` already validated)."""
    placement = functools.partial(
        bn_placement, config.bn.statistics, device_count=device_count, batch_size=config.batch_size,
        virtual_batch_size=config.bn.virtual_batch_size,
    )
    mesh = data_mesh() if config.parallel == "jit" and device_count > 1 else None
    return Layout(config.parallel, device_count, mesh, placement(config.parallel), placement("jit"))


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
