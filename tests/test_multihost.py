"""Two processes on localhost (``jax.distributed``, gloo collectives) train like one.

Each process has one CPU device; together they form a 2-device mesh. The run
(checkpoint, interruption, resume from the checkpoint) must match a single
process with 2 forced devices, which computes the same thing.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from bn_repro import fashion_mnist_data, run_records
from test_fashion_mnist_data import synthetic_files
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


def start_two_processes(workdir, data_dir, command=main_command) -> list[subprocess.Popen]:
    port = free_port()
    env = {**subprocess_env("--xla_force_host_platform_device_count=1"), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    return [
        subprocess.Popen(
            command(workdir, data_dir) + [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                               f"--process_id={i}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]


def finish(procs: list[subprocess.Popen], returncode: int = 0) -> list[str]:
    """Each process's stderr, once all have exited with ``returncode``."""
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == returncode, err[-4000:]
    return [err for _, err in outputs]


def run_two_processes(workdir, data_dir, command=main_command) -> None:
    finish(start_two_processes(workdir, data_dir, command))


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


def streamed_command(workdir, data_dir) -> list[str]:
    """BN-x5 on a generated Fashion-MNIST: the streamed (grain) path an ImageNet run takes."""
    return [
        sys.executable, "-m", "bn_repro.main", "--config=configs/imagenet.py:bn_x5:fashion", f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}", "--config.model.width=0.0625", "--config.data.image_size=32",
        "--config.batch_size=8", "--config.bn.virtual_batch_size=4", "--config.eval_batch_size=4",
        "--config.bn.population_batches=3", "--config.num_steps=4", "--config.eval_every=2",
        "--config.checkpoint_every=2", "--config.eval_at=()",
    ]


def test_two_processes_on_the_streamed_path_match_one_process_algorithm_2_included(tmp_path):
    # Each process reads its half of every global batch; Algorithm 2 must still average the
    # moments of the global batches (m = 4 examples x H x W per virtual batch), as one process does.
    _, checksums = synthetic_files(tmp_path / "data" / "downloads" / "manual")
    data_dir = fashion_mnist_data.prepare_fashion_mnist(str(tmp_path / "data"), expected=checksums)
    single = tmp_path / "single"
    env = subprocess_env("--xla_force_host_platform_device_count=2")
    result = subprocess.run(streamed_command(single, data_dir), cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]

    multi = tmp_path / "multi"
    run_two_processes(multi, data_dir, streamed_command)
    want = deterministic(run_records.read_metrics(str(single / "metrics.jsonl")))
    got = deterministic(run_records.read_metrics(str(multi / "metrics.jsonl")))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4, 4]
    assert "val_loss_population_stats" in want[-1]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_resumed_run_matches(small_mnist_dir, tmp_path):
    """A preemption notice to one process (SIGTERM to process 1 only): both stop at the step JAX's preemption
    sync agreed on, with one checkpoint there, exit 143, and resume with the same command to the metrics of one
    process with two devices."""
    def command(workdir, data_dir):
        return main_command(workdir, data_dir) + ["--config.num_steps=1000", "--config.eval_every=250",
                                                  "--config.checkpoint_every=500", "--config.log_every=10"]

    single = tmp_path / "single"
    env = subprocess_env("--xla_force_host_platform_device_count=2")
    result = subprocess.run(command(single, small_mnist_dir), cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]

    multi = tmp_path / "multi"
    procs = start_two_processes(multi, small_mnist_dir, command)
    deadline = time.monotonic() + 240
    metrics = multi / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline and procs[1].poll() is None:
        time.sleep(0.05)  # until the evaluation at step 250 is written
    procs[1].send_signal(signal.SIGTERM)
    errors = finish(procs, returncode=143)
    stopped = {int(m) for err in errors for m in re.findall(r"all processes stop after step (\d+)", err)}
    assert len(stopped) == 1, errors[0][-3000:]
    (step,) = stopped
    assert 250 < step < 1000 and step % 10 == 0  # the end of the 10-step chunk that holds the agreed step
    assert step in [int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()]
    assert not (multi / "summary.json").exists()

    run_two_processes(multi, small_mnist_dir, command)
    want = deterministic(run_records.read_metrics(str(single / "metrics.jsonl")))
    got = deterministic(run_records.read_metrics(str(multi / "metrics.jsonl")))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [250, 500, 750, 1000, 1000]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=key)
