"""Test-wide settings, and shared fixtures: small generated copies of the MNIST source (no network).

Before JAX starts, here and in every subprocess a test launches (they inherit
the environment):

* XLA's backend optimisation is lowered (``--xla_backend_optimization_level=0``)
  and its CPU fusion emitters are off (``--xla_cpu_use_fusion_emitters=false``):
  the tests check what is computed, not how fast, and XLA's CPU compile time
  dominates the suite (about 3x shorter at level 0; a BN-Inception training
  step then compiles in about 10 s instead of 15 s without the emitters);
* a persistent compilation cache under ``.pytest_cache/`` lets the many
  processes and tests that compile the same programs (the same small networks,
  the eager ops of every ``model.init``) compile each once.

Speed is measured by ``benchmarks/``, never by the tests, so neither setting
touches a number we report.
"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if _FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), _FLAGS]))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def subprocess_env(*xla_flags: str) -> dict[str, str]:
    """The environment for a subprocess: this one's (with the settings above), plus ``xla_flags``."""
    return {**os.environ, "XLA_FLAGS": " ".join([os.environ["XLA_FLAGS"], *xla_flags])}


def metrics_lines(workdir) -> list[str]:
    """The lines of ``workdir/metrics.jsonl`` as written (timings included)."""
    return (Path(workdir) / "metrics.jsonl").read_text().splitlines()


def assert_resumed_from(workdir, lines_before: list[str], checkpoint_step: int) -> None:
    """The run in ``workdir`` resumed from its checkpoint at ``checkpoint_step``
    rather than starting over: the metrics lines up to that step are still the
    ones written before the interruption, timings included (a restart from
    step 0 rewrites every line, with new ``wall_time_s``), and later lines exist."""
    after = metrics_lines(workdir)
    kept = [line for line in lines_before if json.loads(line)["step"] <= checkpoint_step]
    assert kept and any("wall_time_s" in json.loads(line) for line in kept), "nothing before the checkpoint to compare"
    assert after[: len(kept)] == kept, "records before the checkpoint were rewritten: the run did not resume"
    assert len(after) > len(kept)


import gzip  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import zipfile  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bn_repro import mnist_data  # noqa: E402

SIZES = {"train": 50, "valid": 10, "test": 20}


def make_source(directory: Path, seed: int = 0, scale: float = 256.0, sizes: dict[str, int] = SIZES):
    """Writes a fake wheel; returns it and the uint8 pixels/labels per part."""
    rng = np.random.default_rng(seed)
    parts = {}
    for name, n in sizes.items():
        pixels = rng.integers(0, 256, size=(n, 784), dtype=np.int64).astype(np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        parts[name] = (pixels, labels)
    data = tuple((p.astype(np.float32) / np.float32(scale), y) for p, y in parts.values())
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / mnist_data.SOURCE_WHEEL
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickle.dumps(data, protocol=2)))
    return wheel, parts


def source_checksums(parts) -> mnist_data.Checksums:
    """Independent computation of what the prepared data must hash to."""
    splits = {
        "train": (
            np.concatenate([parts["train"][0], parts["valid"][0]]),
            np.concatenate([parts["train"][1], parts["valid"][1]]),
        ),
        "test": parts["test"],
    }

    def sha(b):
        return hashlib.sha256(b).hexdigest()

    return mnist_data.Checksums(
        label_counts={s: tuple(np.bincount(y, minlength=10).tolist()) for s, (_, y) in splits.items()},
        sha256={
            **{f"{s}_images": sha(x.tobytes()) for s, (x, _) in splits.items()},
            **{f"{s}_labels": sha(y.astype("<i4").tobytes()) for s, (_, y) in splits.items()},
        },
    )


# Enough for a few epochs of batch 60 in the training tests.
TRAINING_SIZES = {"train": 300, "valid": 60, "test": 100}


@pytest.fixture(scope="session")
def small_mnist_dir(tmp_path_factory) -> str:
    """A prepared TFDS data dir holding a small generated `mnist` (360 train, 100 test)."""
    data_dir = tmp_path_factory.mktemp("small_mnist")
    _, parts = make_source(data_dir / "downloads" / "manual", seed=3, sizes=TRAINING_SIZES)
    mnist_data.prepare_mnist(str(data_dir), expected=source_checksums(parts))
    return str(data_dir)


@pytest.fixture(scope="session")
def imagenet_runs(tmp_path_factory, worker_id) -> dict:
    """The training runs of ``tests/mock_imagenet_runs.py`` (a few minutes on two
    cores), made once per session whichever pytest-xdist worker asks first (the
    others wait for them): ``{"root": their directory, "errors": {name: exception or None}}``."""
    import mock_imagenet_runs
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    shared = shared if worker_id == "master" else shared.parent  # the workers' common directory
    root, errors_path = shared / "imagenet_runs", shared / "imagenet_runs_errors.json"
    with FileLock(str(shared / "imagenet_runs.lock")):
        if not errors_path.exists():
            root.mkdir()
            errors = mock_imagenet_runs.train_all(root)
            errors_path.write_text(json.dumps({k: None if e is None else str(e) for k, e in errors.items()}))
    errors = json.loads(errors_path.read_text())
    return {"root": root, "errors": {k: None if e is None else AssertionError(e) for k, e in errors.items()}}


# The longest files first and the files that only read the shared ImageNet runs
# last, so that pytest-xdist's workers (one file each at a time, --dist
# loadfile) neither wait for those runs nor end with one long file running alone.
SLOWEST_FIRST = ("test_imagenet_train.py", "test_parallel.py", "test_multihost.py", "test_scripts.py", "test_train.py",
                 "test_figure2.py", "test_torch_peer.py")
LAST = ("test_ensemble.py",)


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    rank.update({name: len(rank) + 1 + i for i, name in enumerate(LAST)})
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))  # stable: file order kept otherwise
