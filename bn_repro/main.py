"""Runs one experiment: ``python -m bn_repro.main --config=configs/mnist.py:bn --workdir=runs/mnist_bn``.

Any config field can be overridden with ``--config.FIELD=VALUE``; an unknown
field or a value of the wrong type stops the run before it starts, naming the
field. Running the same command again resumes from the last checkpoint in
``--workdir``.
"""

import logging as std_logging
import os
import runpy
import shlex
import sys
from collections.abc import Sequence

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from bn_repro import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics, checkpoints and summary.")
flags.mark_flags_as_required(["config", "workdir"])
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False,
    "Initialise jax.distributed for a run over several processes (hosts); without --coordinator_address "
    "the cluster is auto-detected (TPU pods, SLURM, ...).",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --multihost).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")

CONFIG_PREFIX = "--config."
# The exit status of a run stopped by SIGTERM/SIGINT with a checkpoint (128 + SIGTERM, as schedulers expect).
PREEMPTED_EXIT = 143


def check_config_file(argv: list[str]) -> None:
    """Raises ``flags.IllegalFlagValueError`` naming the path if ``--config=path[:variant]`` is not a file
    (ml_collections' own error names neither)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is not None and not os.path.isfile(spec.partition(":")[0]):
        raise flags.IllegalFlagValueError(
            f"--config={spec}: no config file {os.path.abspath(spec.partition(':')[0])!r}; give a path to one of "
            "the files in configs/, optionally with a variant, e.g. --config=configs/mnist.py:bn"
        )


def check_override_fields(argv: list[str]) -> None:
    """Raises ``flags.IllegalFlagValueError`` for a ``--config.a.b=v`` naming no field.

    (ml_collections reports only the last path component, and only once the
    override is applied; this names the whole field and lists its siblings.)
    """
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len(CONFIG_PREFIX):].split("=", 1)[0] for a in argv if a.startswith(CONFIG_PREFIX)]
    if spec is None or not overrides:
        return
    path, _, variant = spec.partition(":")
    get_config = runpy.run_path(path)["get_config"]
    config = get_config(variant) if variant else get_config()
    for field in overrides:
        node, walked = config, "config"
        for part in field.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none"
                raise flags.IllegalFlagValueError(
                    f"--config.{field}: {walked} has no field {part!r} in {path} (its fields: {known})"
                )
            node, walked = node[part], f"{walked}.{part}"


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config ``--config=spec`` with ``--config.FIELD=VALUE`` overrides, as main sees it."""
    argv = ["load_config", f"--config={spec}", *overrides]
    check_config_file(argv)
    check_override_fields(argv)
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with unknown config fields caught up front."""
    try:
        check_config_file(argv)
        check_override_fields(argv)
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.stderr.write(f"FATAL Flags parsing error: {error}\n")
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        train.check_workdir(_WORKDIR.value)
    except NotADirectoryError as error:
        raise app.UsageError(str(error)) from None
    logging.set_verbosity(logging.INFO)
    # Keep the terminal to our progress lines: orbax logs every save at INFO.
    logging.get_absl_logger().addFilter(
        lambda record: record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname
    )
    if _MULTIHOST.value or _COORDINATOR.value:
        # Before any other JAX call. On CPU, JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo.
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    command = shlex.join(["python", "-m", "bn_repro.main", *sys.argv[1:]])
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, command=command)
    if "preempted_at_step" in summary:
        sys.exit(PREEMPTED_EXIT)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
