"""Smoke runs of the scripts whose outputs the README quotes, each in this process
(a subprocess pays seconds of imports) at the smallest size its flags allow."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from bn_repro import checkpoints, parallel, run_records, train
from bn_repro.main import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_CONFIG = os.path.join(REPO, "configs", "mnist.py")


def load_script(relpath: str, monkeypatch):
    """The script at ``relpath`` imported as a module (its ``__main__`` block not run),
    with its directory on sys.path as when it runs."""
    path = os.path.join(REPO, relpath)
    monkeypatch.syspath_prepend(os.path.dirname(path))
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, body rows) of the one Markdown table in ``text``, as stripped cells."""
    lines = [line.strip() for line in text.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert len(rows) >= 2 and set("".join(rows[1])) <= set("-:"), text
    assert all(len(row) == len(rows[0]) for row in rows), text
    return rows[0], rows[2:]


# --- scripts/parallel_equivalence.py ---------------------------------------------------

def fake_training(runs: list):
    """A stand-in for the script's ``python -m bn_repro.main`` subprocess: checks the
    command, then writes a final model and metrics whose values say what the run computed.

    Runs that compute the same thing (the same BN groups: the whole batch, B/devices,
    or the virtual batch) write the same values, offset by 1e-4 under pmap and 1e-5 on
    several devices, so a setting compared with the right reference differs by exactly
    that, and by >= 4e-3 from any other reference."""

    def run(command, cwd=None, env=None, **kwargs):
        assert command[:4] == [sys.executable, "-m", "bn_repro.main", "--config=configs/mnist.py:bn"] and cwd == REPO
        workdir = command[4].removeprefix("--workdir=")
        devices = int(re.fullmatch(r"--xla_force_host_platform_device_count=(\d+)", env["XLA_FLAGS"])[1])
        config = load_config(f"{MNIST_CONFIG}:bn", command[5:])  # Unknown fields or bad values raise.
        config = parallel.with_global_batch(config, devices)
        train.validate_config(config, devices)
        group = {"global": config.batch_size, "per_device": config.batch_size // devices,
                 "virtual": config.bn.virtual_batch_size}[config.bn.statistics]
        offset = 1e-4 * (config.parallel == "pmap") + 1e-5 * (devices > 1)
        value = np.float32(1e-3 * group + offset)
        variables = {"params": {"hidden0": {"kernel": np.full((2, 3), value)}},
                     "batch_stats": {"bn0": {"mean": np.full((3,), -value)}}}
        checkpoints.save_final_model(workdir, variables)
        for step, accuracy in ((500, 0.5), (config.num_steps, 0.9 + 1e-3 * group + offset)):
            record = {"step": step, "test_accuracy": accuracy}
            run_records.append_metrics(os.path.join(workdir, "metrics.jsonl"), record)
        runs.append((devices, config.parallel, config.bn.statistics, group, workdir))
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_parallel_equivalence_compares_each_setting_with_its_reference(tmp_path, monkeypatch, capsys):
    """The README's command: 3 one-device references and 8 runs on 8 devices, each row
    comparing a setting with the reference that computes the same thing."""
    script = load_script("scripts/parallel_equivalence.py", monkeypatch)
    runs = []
    monkeypatch.setattr(script, "subprocess", types.SimpleNamespace(run=fake_training(runs)))
    output = tmp_path / "equivalence.md"
    argv = ["parallel_equivalence.py", f"--workdir={tmp_path / 'runs'}", f"--output={output}"]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()

    text = output.read_text()
    assert text in capsys.readouterr().out
    assert text.startswith("# Data-parallel equivalence: MNIST BN net, 8 forced CPU devices vs one device")
    assert sorted(run[:4] for run in runs) == sorted(
        [(1, "jit", "global", 64), (1, "jit", "virtual", 8), (1, "jit", "virtual", 4)]
        + [(8, loop, statistics, group) for loop in ("jit", "pmap")
           for statistics, group in (("global", 64), ("per_device", 8), ("virtual", 8), ("virtual", 4))]
    )
    assert len({run[4] for run in runs}) == len(runs)  # each run its own workdir
    header, body = table(text)
    assert header == ["loop", "bn.statistics on 8 devices", "one-device reference", "final test accuracy",
                      "max abs diff, parameters & statistics", "max abs diff, test accuracy"]
    expected = [("global", "global", 64), ("per_device", "virtual 8", 8), ("virtual 8", "virtual 8", 8),
                ("virtual 4", "virtual 4", 4)]
    assert [row[:3] for row in body] == [[loop, s, ref] for s, ref, _ in expected for loop in ("jit", "pmap")]
    for row, (_, _, group) in zip(body, [e for e in expected for _ in range(2)]):
        offset = 1e-5 + 1e-4 * (row[0] == "pmap")
        assert float(row[3]) == pytest.approx(0.9 + 1e-3 * group + offset, abs=1e-4)
        assert float(row[4]) == pytest.approx(offset, rel=0.01)
        assert float(row[5]) == pytest.approx(offset, abs=1e-4)


def test_parallel_equivalence_reports_a_failed_run(tmp_path, monkeypatch):
    """A run that fails stops the script, naming its command and showing its stderr."""
    script = load_script("scripts/parallel_equivalence.py", monkeypatch)

    def failed(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "Traceback ...\nValueError: boom")

    monkeypatch.setattr(script, "subprocess", types.SimpleNamespace(run=failed))
    monkeypatch.setattr(sys, "argv", ["parallel_equivalence.py", f"--workdir={tmp_path}"])
    failure = r"(?s)-m bn_repro\.main --config=configs/mnist\.py:bn --workdir=.* failed:.*ValueError: boom"
    with pytest.raises(SystemExit, match=failure):
        script.main()


# --- scripts/model_stats.py -------------------------------------------------------------

def test_model_stats_rows_match_the_committed_table(tmp_path, monkeypatch, capsys):
    """Two of the six networks (the script has no size flag; all six compile in ~40 s
    cold): the default BN-Inception and GoogLeNet, with the counts and FLOPs of
    results/models/model_stats.md, which the README quotes."""
    script = load_script("scripts/model_stats.py", monkeypatch)
    names = ["BN-Inception (Figure 5, pool proj 96 in 4c/4d, separable stem)", "GoogLeNet (2014), no auxiliary heads"]
    monkeypatch.setattr(script, "VARIANTS", {name: script.VARIANTS[name] for name in names})
    output = tmp_path / "model_stats.md"
    assert script.main(["--output", str(output)]) == 0
    text = output.read_text()
    assert text in capsys.readouterr().out
    assert text.startswith(f"Command: `python scripts/model_stats.py --output {output}`")
    header, body = table(text)
    with open(os.path.join(REPO, "results", "models", "model_stats.md")) as f:
        committed_header, committed = table(f.read())
    assert header == committed_header
    committed = {row[0]: row for row in committed}
    assert [row[0] for row in body] == names
    for row in body:
        assert row[1:3] == committed[row[0]][1:3]  # parameters, BN statistics: exact
        assert float(row[3]) == pytest.approx(float(committed[row[0]][3]), rel=0.02)  # XLA's FLOPs


# --- benchmarks/bench_mnist.py ----------------------------------------------------------

def hand_matmul_flops(batch: int = 60) -> int:
    dims = [784, 100, 100, 100, 10]
    forward = 2 * batch * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    return 3 * forward - 2 * batch * 784 * 100  # backward: weight and input gradients, not the image's


def test_bench_mnist_one_thread(tmp_path, monkeypatch, capsys):
    """Both nets at one thread, 5 steps per call, one call, and if torch imports its eager and
    torch.compile'd (inductor, compiled cold: seconds to tens of seconds a net) peers. The script's child
    process per thread setting (there to set XLA's threading flag and the CPU affinity before
    jax starts) is replaced by the same function called in this process."""
    bench = load_script("benchmarks/bench_mnist.py", monkeypatch)
    monkeypatch.setattr(bench, "run_child",
                        lambda threads, args: bench.child(threads, args.steps, args.repeats, args.torch_compile))
    output = tmp_path / "mnist_cpu.md"
    assert bench.main(["--threads", "1", "--steps", "5", "--repeats", "1", "--output", str(output)]) == 0
    text = output.read_text()
    assert text in capsys.readouterr().out
    rows = json.loads((tmp_path / "mnist_cpu.json").read_text())["rows"]
    assert [(r["net"], r["threads"], r["steps_per_call"], r["repeats"]) for r in rows] == [
        ("baseline", 1, 5, 1), ("bn", 1, 5, 1)]
    with_torch = rows[0]["torch_error"] is None
    for r in rows:
        assert r["hand_matmul_flops_per_step"] == hand_matmul_flops() == 26_376_000
        assert 1.0 <= r["xla_flops_per_step"] / r["hand_matmul_flops_per_step"] <= 1.1
        assert r["ours_steps_per_s"] > 0 and r["matmul_gflops"] > 0 and r["matmul_only_steps_per_s"] > 0
        assert r["ceiling_steps_per_s"] == pytest.approx(r["matmul_gflops"] * 1e9 / r["xla_flops_per_step"])
        assert r["fraction_of_ceiling"] == pytest.approx(r["ours_steps_per_s"] / r["ceiling_steps_per_s"])
        assert r["torch_compile"] == "inductor"
        for peer in ("torch", "torch_compiled"):
            if not with_torch:
                assert r[f"{peer}_error"].startswith("import torch failed")
                continue
            assert r[f"{peer}_error"] is None and r[f"{peer}_steps_per_s"] > 0
            assert r[f"ratio_ours_{peer}"] == pytest.approx(r["ours_steps_per_s"] / r[f"{peer}_steps_per_s"])
        if with_torch:  # The same seed: the same initial weights and first batch.
            assert abs(r["torch_first_loss"] - math.log(10)) < 0.5
            assert r["torch_compiled_first_loss"] == pytest.approx(r["torch_first_loss"], abs=1e-5)
            assert r["torch_compiled_first_step_s"] > 0
    header, body = table(text)
    torch_columns = ["torch eager steps/s (min-max)", "ours/eager", "eager first-step loss",
                     "torch compiled steps/s (min-max)", "ours/compiled", "compiled first-step loss",
                     "compile s ours / compiled"] if with_torch else []
    assert header == ["net", "threads", "ours steps/s (min-max)", *torch_columns, "FLOPs/step XLA (hand matmul)",
                      "matmul GFLOP/s (1024^3)", "ceiling steps/s", "fraction of ceiling", "matmul-only steps/s"]
    assert [row[:2] for row in body] == [["baseline", "1"], ["bn", "1"]]
    assert all(row[header.index("FLOPs/step XLA (hand matmul)")].endswith("(26.38M)") for row in body)
    assert ("not measured" in text) != with_torch


# --- benchmarks/bench_model.py ----------------------------------------------------------

def test_bench_model_small_bn_inception(tmp_path, monkeypatch, capsys):
    """Our compiled step of the :small BN-Inception (width 1/16, 32x32, batch 8), one
    warm-up and one timed step, also with nn.Conv everywhere; if torch imports (it is optional), the eager PyTorch peer
    and the torch.compile'd one, with the aot_eager backend: dynamo and AOTAutograd as
    with inductor, but no kernels to generate (inductor compiles this net's ~60 conv
    units cold for minutes on CPU, twice: once a layout)."""
    bench = load_script("benchmarks/bench_model.py", monkeypatch)
    with_torch = bench.torch_available()
    output = tmp_path / "bn_inception.md"
    argv = ["--config", os.path.join(REPO, "configs", "imagenet.py") + ":bn_x30:small", "--batch_size", "8",
            "--image_size", "32", "--warmup", "1", "--repeats", "1", "--steps", "1",
            # The peak matmul does ~0.2 TFLOP per timed call whatever its size; 1024 was the quickest.
            "--matmul_size", "1024", "--torch" if with_torch else "--no-torch", "--torch_compile", "aot_eager",
            "--loops", "jit,pmap", "--output", str(output)]
    assert bench.main(argv) == 0
    text = output.read_text()
    assert text in capsys.readouterr().out
    assert text.startswith("# BN-Inception (Figure 5) training throughput, 32x32, batch 8")
    rows = json.loads((tmp_path / "bn_inception.json").read_text())["rows"]
    torch_rows = ["torch eager", "torch compiled"] if with_torch else []
    assert [r["implementation"] for r in rows] == [
        "ours (JAX/XLA jit)", "ours, jit loop, host-fed batch", "ours, pmap loop, host-fed batch",
        "ours, nn.Conv everywhere (before)", *torch_rows]  # on CPU: the formulation before, in the same run
    for r in rows[1:4]:  # the same function (bn_x30 has no dropout, so pmap's per-device masks do not matter)
        assert r["first_loss"] == pytest.approx(rows[0]["first_loss"], rel=1e-5), r["implementation"]
    assert not any(r.get("error") for r in rows), [r.get("error") for r in rows]
    for r in rows:
        assert (r["precision"], r["batch_size"], r["image_size"]) == ("float32", 8, 32)
        assert 0 < r["flops_per_step"] < 1e11 and r["images_per_s"] > 0 and r["peak_gflops"] > 0
        assert abs(r["first_loss"] - math.log(1000)) < 1.0  # ~ln(classes) at initialisation
        assert r["achieved_gflops"] == pytest.approx(r["flops_per_step"] * r["steps_per_s"] / 1e9)
        assert r["ratio_ours"] == pytest.approx(rows[0]["steps_per_s"] / r["steps_per_s"])
    if with_torch:  # The same initial weights and batch: the same first loss.
        eager, compiled = rows[4:]
        assert eager["first_loss"] == pytest.approx(rows[0]["first_loss"], abs=1e-3)
        assert compiled["first_loss"] == pytest.approx(eager["first_loss"], abs=1e-4)
        assert (eager["torch_compile"], eager["compile_s"]) == (None, None)
        assert compiled["torch_compile"] == "aot_eager" and compiled["compile_s"] > 0
        for r in (eager, compiled):  # both layouts measured, the faster one reported
            assert {r["layout"], *r["other_layouts"]} == {"contiguous", "channels_last"}
    header, body = table(text)
    assert header[:3] == ["implementation", "precision", "device"] and len(header) == 14
    assert header[-3:] == ["ours/this", "first-step loss", "compile s"]
    assert [row[0] for row in body] == [r["implementation"] for r in rows]

# --- benchmarks/bench_conv_layers.py ----------------------------------------------------

def test_bench_conv_layers_times_every_convolution_of_the_network_once_per_shape(tmp_path, monkeypatch):
    """The :small BN-Inception at 32x32, batch 2: every 4-D kernel of the model is one layer of a row (the counts
    add up), the first layer reads the image and its input gradient is left out of the totals, which are the
    count-weighted sums of the rows."""
    pytest.importorskip("torch")
    bench = load_script("benchmarks/bench_conv_layers.py", monkeypatch)
    output = tmp_path / "layers.md"
    argv = ["--config", os.path.join(REPO, "configs", "imagenet.py") + ":bn_x30:small", "--batch_size", "2",
            "--image_size", "32", "--repeats", "1", "--output", str(output)]
    assert bench.main(argv) == 0
    record = json.loads((tmp_path / "layers.json").read_text())
    rows = record["layers"]
    config = load_config(os.path.join(REPO, "configs", "imagenet.py") + ":bn_x30:small",
                         ["--config.batch_size=2", "--config.data.image_size=32"])
    model = train.create_setup(config).model
    import jax

    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((2, 32, 32, 3), np.float32),
                                               train=False))["params"]
    kernels = [leaf for leaf in jax.tree.leaves(params) if leaf.ndim == 4]
    assert sum(r["count"] for r in rows) == len(kernels)
    assert [r["reads_image"] for r in rows] == [True] + [False] * (len(rows) - 1)
    assert rows[0]["name"] == "conv1/depthwise" and rows[0]["input_shape"] == [2, 32, 32, 3]
    assert {r["kind"] for r in rows if r["kernel_shape"][:2] == [1, 1]} == {"PointwiseConv"}  # on CPU
    for who in ("ours", "torch"):
        totals = record["totals_ms"][who]
        assert totals["input gradient"] == pytest.approx(sum(r["count"] * r[f"{who}_ms"]["input gradient"]
                                                             for r in rows[1:]))
        assert totals["forward"] == pytest.approx(sum(r["count"] * r[f"{who}_ms"]["forward"] for r in rows))
        assert all(ms > 0 for r in rows for ms in r[f"{who}_ms"].values())
    header, body = table(output.read_text().split("Totals over")[0])
    assert len(body) == len(rows) and body[0][header.index("ours fwd / dx / dW ms")].count("[") == 1


# --- benchmarks/profile_model.py --------------------------------------------------------

def test_profile_model_puts_the_traced_step_into_operation_kinds(tmp_path, monkeypatch):
    """The :small BN-Inception at 32x32, batch 2, two traced steps: convolutions by kernel size both ways, BN,
    pooling, the optimizer, each a share of the step's thread time, with little time left unnamed."""
    bench = load_script("benchmarks/profile_model.py", monkeypatch)
    output = tmp_path / "profile.md"
    argv = ["--config", os.path.join(REPO, "configs", "imagenet.py") + ":bn_x30:small", "--batch_size", "2",
            "--image_size", "32", "--warmup", "1", "--steps", "2", "--output", str(output)]
    assert bench.main(argv) == 0
    record = json.loads((tmp_path / "profile.json").read_text())
    kinds = record["thread_s_per_step"]
    for kind in ("conv 3x3, forward", "conv 3x3, backward", "BN (statistics, normalisation, their gradients)",
                 "pooling", "optimizer and the rest (outside the network)"):
        assert kinds.get(kind, 0) > 0, (kind, kinds)
    assert any(k.startswith("conv 1x1 as a matmul") for k in kinds)  # PointwiseConv on CPU
    assert record["untraced_names_s_per_step"] < 0.2 * sum(kinds.values())
    header, body = table(output.read_text())
    assert header == ["operation kind", "thread ms/step", "share"] and len(body) == len(kinds)
