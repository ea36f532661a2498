"""The record of a run in its workdir: ``config.json``, ``environment.json``,
``metrics.jsonl`` (one JSON object per line, each with ``step``) and
``summary.json``; where and with what code it ran; and whether a workdir may be
resumed with a config.

``wall_time_s`` and ``steps_per_sec`` are the only values of ``metrics.jsonl``
that differ between two runs of the same config on the same machine
(:data:`TIMING_KEYS`).
"""

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
from absl import logging

TIMING_KEYS = frozenset({"wall_time_s", "steps_per_sec"})
# Marks records written once training has ended (e.g. the evaluation with
# Algorithm 2's population statistics); a resumed run rewrites them.
AFTER_TRAINING = "after_training"


class MetricsFileError(ValueError):
    """A metrics.jsonl line other than the last cannot be read."""


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl file (an empty list if it does not exist).

    A torn last line (a partial record, as a kill mid-write or a full disk
    leaves it) is dropped with a warning; an unreadable line before it is an
    error naming the file and line.
    """
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if i < len(lines) - 1:
                raise MetricsFileError(
                    f"{path}, line {number}: not a JSON record ({error}); only a torn last line is dropped. "
                    "Repair or remove that line to continue the run."
                ) from None
            logging.warning("%s: dropping its torn last line %d (%r): a record cut short", path, number, line[:80])
    return records


def append_metrics(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: str, last_step: int, write: bool = True) -> list[dict]:
    """Keeps the records up to ``last_step`` (resuming from that checkpoint) and returns them.

    The file is replaced atomically, so an interruption here loses nothing.
    With ``write=False`` (a process that does not write the run's files) the
    file is left alone.
    """
    kept = [r for r in read_metrics(path) if r["step"] <= last_step and not r.get(AFTER_TRAINING)]
    if write:
        write_json_lines(path, kept)
    return kept


def write_json_lines(path: str, records: Iterable[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def write_json(path: str, obj: dict) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def flatten_config(config: dict, prefix: str = "config") -> dict:
    """A config (as in config.json) as ``{"config.a.b": value}``."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}.{key}"))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat


def config_differences(a: dict, b: dict) -> dict[str, tuple]:
    """``{dotted field: (a's value, b's value)}`` for the fields of two configs
    (as in config.json) that differ; a field only one has gets None for the other."""
    fa, fb = flatten_config(a), flatten_config(b)
    return {f: (fa.get(f), fb.get(f)) for f in sorted(set(fa) | set(fb)) if fa.get(f) != fb.get(f)}


def check_same_config(config_path: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a run in a workdir that was started with another config."""
    if not os.path.exists(config_path):
        return
    with open(config_path) as f:
        previous = json.load(f)
    current = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, as stored
    changed = config_differences(previous, current)
    if changed:
        raise ValueError(
            f"{config_path} was written by a run with a different config (fields: {', '.join(changed)}); "
            "resuming would mix two experiments. Use a new --workdir, or the same config."
        )


def cpu_model() -> str:
    """The CPU's model name and widest vector instructions (from /proc/cpuinfo on Linux; a virtual
    machine's model name, e.g. "AMD EPYC", can hide which CPU it is), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    return f"{name} ({vector_instructions(flags)})" if flags else name


def vector_instructions(flags: set[str]) -> str:
    """The widest x86 vector extensions among /proc/cpuinfo ``flags``, e.g. 'AVX-512, AVX512-BF16' or
    'AVX2, no AVX-512' (what bounds a CPU's float32 and bfloat16 matmul rates)."""
    if "avx512f" not in flags:
        return "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    extras = [label for flag, label in (("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX")) if flag in flags]
    return ", ".join(["AVX-512", *extras])


def git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout this package is in, else ``(None, None)``.

    ``dirty``: a tracked file differs from the commit. None, never an error,
    when git is missing or slow, or the package is not a tracked file of a
    checkout (e.g. installed into a venv that lies inside one).
    """
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", os.path.basename(__file__))
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment_info(command: str) -> dict:
    """Device, versions, code version and the command line of this run, for the run record."""
    import flax
    import jaxlib
    import optax

    device = jax.devices()[0]
    commit, dirty = git_state()
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "cpu": cpu_model(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "command": command,
    }


TENSORBOARD = "tensorboard"


def tensorboard_writer(workdir: str, start_step: int) -> Any:
    """A TensorBoard event writer for ``<workdir>/tensorboard`` (tensorboardX: no TensorFlow).
    A run resumed from step ``start_step`` purges the events a killed process wrote after it.
    Each writer gets its own file, named to sort in the order written (TensorBoard
    reads a directory's files in name order): tensorboardX names files by the
    second, and would truncate an earlier process's file started in the same second."""
    import tensorboardX  # imported here: only the writing process needs it

    return tensorboardX.SummaryWriter(os.path.join(workdir, TENSORBOARD),
                                      purge_step=start_step + 1 if start_step else None,
                                      filename_suffix=f".{time.time_ns()}.{os.getpid()}")


def write_scalars(writer: Any, step: int, scalars: dict) -> None:
    """Every finite number of ``scalars`` at ``step`` (``metrics.jsonl`` stays the source of truth)."""
    if writer is None:
        return
    for tag, value in scalars.items():
        if tag != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            writer.add_scalar(tag, value, step)
    writer.flush()
