"""Two processes on localhost (``jax.distributed``, gloo collectives) train like one.

Each process has one CPU device; together they form a 2-device mesh. The run
(checkpoint, interruption, resume from the checkpoint) must match a single
process with 2 forced devices, which computes the same thing.
"""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np

from bn_repro import run_records
from test_train import deterministic
from conftest import assert_resumed_from, metrics_lines, subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main_command(workdir, data_dir) -> list[str]:
    return [
        sys.executable, "-m", "bn_repro.main", "--config=configs/mnist.py:bn", f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}", "--config.data.verify_checksums=False", "--config.num_steps=100",
        "--config.eval_every=25", "--config.checkpoint_every=50", "--config.bn.population_batches=4",
    ]


def run_two_processes(workdir, data_dir) -> None:
    port = free_port()
    env = {**subprocess_env("--xla_force_host_platform_device_count=1"), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    procs = [
        subprocess.Popen(
            main_command(workdir, data_dir) + [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                               f"--process_id={i}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]


def test_two_processes_match_one_process_and_resume(small_mnist_dir, tmp_path):
    single = tmp_path / "single"
    env = subprocess_env("--xla_force_host_platform_device_count=2")
    result = subprocess.run(main_command(single, small_mnist_dir), cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]

    multi = tmp_path / "multi"
    run_two_processes(multi, small_mnist_dir)
    want = deterministic(run_records.read_metrics(str(single / "metrics.jsonl")))
    got = deterministic(run_records.read_metrics(str(multi / "metrics.jsonl")))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [25, 50, 75, 100, 100]
    for g, w in zip(got, want):
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=key)

    # As if interrupted before the checkpoint at 100 was written: both processes resume from 50.
    shutil.rmtree(multi / "checkpoints" / "100")
    before = metrics_lines(multi)
    run_two_processes(multi, small_mnist_dir)
    assert_resumed_from(multi, before, checkpoint_step=50)
    resumed = deterministic(run_records.read_metrics(str(multi / "metrics.jsonl")))
    assert resumed == got
    records = run_records.read_metrics(str(multi / "metrics.jsonl"))  # one writer: no duplicated lines
    assert len(records) == 5
    assert (multi / "summary.json").exists() and (multi / "final_model").is_dir()
