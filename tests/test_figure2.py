"""Sec. 4.2's comparisons: the readings of Figures 2 and 3 from workdirs
(bn_repro/figure2.py), the sweep's plan, and scripts/reproduce_figure2.py end
to end on a tiny configuration (real runs of the entry point on a small
synthetic Fashion-MNIST)."""

import json
import os
import shutil

import pytest

from bn_repro import compare, figure2, run_records, sweep
from conftest import assert_resumed_from, metrics_lines
from test_fashion_mnist_data import synthetic_files
from test_scripts import load_script, table

from bn_repro import fashion_mnist_data


def fake_run(path, variant, curve, seed=0, diverged_at=None, population=None, lr=0.01):
    """A RunRecord with evaluations ``curve`` ({step: accuracy})."""
    records = [{"step": s, "val_top1": a, "train_loss": 1.0, "wall_time_s": s / 10} for s, a in curve.items()]
    summary = {"variant": variant}
    if diverged_at:
        records.append({"step": diverged_at, "diverged": True})
        summary.update(diverged=True, diverged_at_step=diverged_at)
    if population is not None:
        summary["final_val_top1_population_stats"] = population
    config = {"experiment": "classification", "variant": f"{variant}:fashion", "seed": seed, "learning_rate": lr,
              "lr_multiplier": 1.0, "model": {"num_classes": 10}}
    return compare.RunRecord(str(path), config, records, summary)


def test_steps_to_target_best_accuracy_and_rows_over_seeds(tmp_path):
    inception = [fake_run(tmp_path / f"i{s}", "inception", {100: 0.5, 200: 0.7 + s / 100, 300: 0.6}, seed=s)
                 for s in range(2)]
    bn = [fake_run(tmp_path / "b0", "bn_x5", {100: 0.705, 200: 0.9}, population=0.91),
          fake_run(tmp_path / "b1", "bn_x5", {100: 0.6, 200: 0.71}, seed=1, population=0.89)]
    failed = [fake_run(tmp_path / "f0", "inception_x5", {100: 0.1}, diverged_at=150)]
    stuck = [fake_run(tmp_path / "s0", "inception_sigmoid", {100: 0.1, 200: 0.19})]
    groups = figure2.group_by_variant([*inception, *bn, *failed, *stuck])
    assert sorted(groups) == ["bn_x5", "inception", "inception_sigmoid", "inception_x5"]
    target = figure2.reference_accuracy(groups)
    assert target == pytest.approx(0.705)  # the mean of the inception runs' best (0.70, 0.71)
    assert [figure2.steps_to(r, target) for r in bn] == [100, 200]
    row = figure2.group_row("bn_x5", bn, target)
    assert row["steps_to_target"] == {"mean": 150, "std": pytest.approx(70.7107, rel=1e-4)}
    assert row["max_accuracy"]["mean"] == pytest.approx(0.805)
    assert row["final_accuracy_population_stats"]["mean"] == pytest.approx(0.90)
    assert row["reached_target"] == 2 and row["diverged"] == 0
    row = figure2.group_row("inception_x5", failed, target)
    assert row["diverged_at_steps"] == [150] and row["reached_target"] == 0
    assert figure2.group_row("inception_sigmoid", stuck, target)["did_not_learn"] == 1
    assert figure2.group_row("bn_x5", bn, target)["did_not_learn"] == 0
    table3 = figure2.figure3(groups)
    assert [r["label"] for r in table3["rows"]] == ["inception", "bn_x5", "inception_x5", "inception_sigmoid"]
    text = figure2.figure3_markdown(table3)
    assert "2.1e6" in text and "73.0%" in text and "1 of 1 diverged (steps 150)" in text and "never" in text
    assert "1 of 1 did not learn (max < 20%, 2x chance)" in text
    reference = figure2.group_row("inception", inception, target)
    _, relative = table(figure2.rows_markdown([figure2.group_row("bn_x5", bn, target)], target, reference=reference))
    assert relative[0][5:7] == ["x0.75", "+10.00 pts"]  # 150 vs 200 steps; 80.5% vs 70.5%
    with pytest.raises(ValueError, match="no 'inception' runs"):
        figure2.reference_accuracy({"bn_x5": bn})
    figure2.plot_accuracy_curves(groups, ["inception", "bn_x5"], target, str(tmp_path / "f.png"), x="wall_time")
    assert os.path.getsize(tmp_path / "f.png") and os.path.getsize(tmp_path / "f.pdf")


def test_the_sweep_plan_shares_workdirs_between_groups_with_the_same_run(monkeypatch):
    script = load_script("scripts/reproduce_figure2.py", monkeypatch)
    planned = script.plan(list(script.GROUPS), seeds=3)
    runs = script.resolve(planned, "/r", [])
    count = lambda group: sum(p.group == group for p in planned)  # noqa: E731
    assert count("pilot") == 5 and count("figure2") == 21 and count("sigmoid") == 3
    assert count("lr_sweep") == 3 * (6 + 8) and count("ablation") == 3 * 9
    by_label = {(p.group, p.label, p.seed): runs[p].workdir for p in planned}
    assert by_label["lr_sweep", "bn_x5 x5", 1] == "/r/figure2/bn_x5-seed1"
    assert by_label["lr_sweep", "bn_x5 x30", 0] == "/r/figure2/bn_x30-seed0"
    assert by_label["lr_sweep", "inception x5", 2] == "/r/figure2/inception_x5-seed2"
    assert by_label["ablation", "1: learning rate back to x1", 0] == "/r/lr_sweep/bn_x5-lr_x1-seed0"
    assert by_label["ablation", "bn_baseline (all seven undone)", 0] == "/r/figure2/bn_baseline-seed0"
    assert by_label["pilot", "inception, lr 0.005", 0] == "/r/pilot/inception-lr0.005-seed0"
    assert len(set(runs.values())) == 5 + 21 + 3 + (42 - 12) + (27 - 9)
    # Group by group, and in each group every row's seed 0 before any seed 1.
    assert [p.group for p in planned] == sorted((p.group for p in planned), key=script.GROUPS.index)
    for group in script.GROUPS:
        seeds = [p.seed for p in planned if p.group == group]
        assert seeds == sorted(seeds)


TINY = ("--config.model.width=0.0625", "--config.data.image_size=32", "--config.batch_size=8",
        "--config.bn.virtual_batch_size=8", "--config.eval_batch_size=8", "--config.data.shuffle_window=8",
        "--config.bn.population_batches=2", "--config.num_steps=4", "--config.eval_every=2",
        "--config.checkpoint_every=2", "--config.eval_at=()")


def test_the_sweep_end_to_end_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, monkeypatch, capsys):
    _, checksums = synthetic_files(tmp_path / "data" / "downloads" / "manual")
    fashion_mnist_data.prepare_fashion_mnist(str(tmp_path / "data"), expected=checksums)
    script = load_script("scripts/reproduce_figure2.py", monkeypatch)
    root, results = tmp_path / "runs", tmp_path / "results"
    argv = [f"--workdir={root}", f"--results={results}", "--groups=figure2", "--variants=inception,bn_x5",
            "--seeds=1", "--jobs=1", f"--config.data.data_dir={tmp_path / 'data'}", *TINY]
    assert script.main(argv) == 0
    for name in ("figure2.png", "figure2.pdf", "figure2_wall_time.png", "figure3.md", "figure3.json"):
        assert os.path.getsize(results / name), name
    header, rows = table((results / "figure3.md").read_text())
    assert [r[0] for r in rows] == ["inception", "bn_x5"] and header[-1] == "paper: max top-1"
    assert rows[1][-1] == "73.0%" and rows[0][2] == "1"
    saved = json.loads((results / "figure3.json").read_text())
    assert saved["rows"][1]["final_accuracy_population_stats"]["mean"] is not None  # Algorithm 2 ran
    assert sorted(os.listdir(results / "runs" / "figure2" / "bn_x5-seed0")) == [
        "config.json", "metrics.jsonl", "summary.json"]
    config = json.loads((root / "figure2" / "bn_x5-seed0" / "config.json").read_text())
    assert config["data"]["dataset"] == "fashion_mnist" and config["variant"] == "bn_x5:fashion"

    # Interrupt bn_x5 after its step-2 checkpoint: what a kill before step 4 leaves.
    bn = root / "figure2" / "bn_x5-seed0"
    lines = metrics_lines(bn)
    (bn / "summary.json").unlink()
    shutil.rmtree(bn / "final_model")
    shutil.rmtree(bn / "checkpoints" / "4")
    (bn / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 2
                                              and "after_training" not in line))
    inception_lines = metrics_lines(root / "figure2" / "inception-seed0")
    capsys.readouterr()
    assert script.main(argv) == 0
    assert "1 of 2 runs finished; running 1, 1 at a time." in capsys.readouterr().out
    assert metrics_lines(root / "figure2" / "inception-seed0") == inception_lines  # skipped, not rerun
    assert_resumed_from(bn, lines, checkpoint_step=2)
    assert sweep.is_finished(bn)


def test_sweep_progress_counts_evaluations_and_tolerates_a_torn_line(tmp_path):
    # 10 steps/s, and each evaluation takes 1 s (= 10 steps of training): at step 20, 2 of 4 evaluations.
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 10, "steps_per_sec": 10, "wall_time_s": 2}\n{"step": 20, "steps_per_sec": 10, "wall_time_s": 4}\n'
        '{"step": 30, "val')
    assert sweep.fraction_done(str(tmp_path), [10, 20, 30, 40]) == pytest.approx((20 + 10 * 2) / (40 + 10 * 4))
    (tmp_path / "summary.json").write_text("{}")
    assert sweep.fraction_done(str(tmp_path), [10, 20, 30, 40]) == 1.0
    assert sweep.fraction_done(str(tmp_path / "none"), [10]) == 0.0
    assert sweep.format_duration(3725) == "1h02m" and sweep.format_duration(65) == "1m05s"


def test_a_run_locked_by_another_sweep_is_not_started_twice(tmp_path):
    fd = sweep.lock(str(tmp_path / "run"))
    with pytest.raises(sweep.AlreadyRunning, match="run.lock"):
        sweep.lock(str(tmp_path / "run"))
    printed = []
    run = sweep.Run(str(tmp_path / "run"), "configs/imagenet.py:bn_x5:small")
    assert sweep.run_all([run], lambda r: [4], jobs=1, print_fn=printed.append) == [run]
    assert any(line.startswith("skipped:") for line in printed)
    os.close(fd)
    os.close(sweep.lock(str(tmp_path / "run")))  # free again


def write_fake_workdir(run, curve, diverged_at=None, population=0.5):
    """A finished workdir for ``run`` (a sweep.Run) with evaluations ``curve``, as the entry point writes it."""
    from bn_repro.main import load_config

    os.makedirs(run.workdir, exist_ok=True)
    config = load_config(run.config, run.overrides)
    run_records.write_json(os.path.join(run.workdir, "config.json"), config.to_dict())
    records = [{"step": s, "train_loss": 1.0, "val_top1": a, "wall_time_s": s / 100} for s, a in curve.items()]
    summary = {"variant": config.variant}
    if diverged_at:
        records.append({"step": diverged_at, "diverged": True})
        summary.update(diverged=True, diverged_at_step=diverged_at)
    elif config.model.use_bn:
        summary["final_val_top1_population_stats"] = population
    run_records.write_json_lines(os.path.join(run.workdir, "metrics.jsonl"), records)
    run_records.write_json(os.path.join(run.workdir, "summary.json"), summary)


def test_every_table_and_figure_of_the_sweep_from_finished_workdirs(tmp_path, monkeypatch, capsys):
    script = load_script("scripts/reproduce_figure2.py", monkeypatch)
    root, results = tmp_path / "runs", tmp_path / "results"
    runs = script.resolve(script.plan(list(script.GROUPS), seeds=1), str(root), [])
    for planned, run in runs.items():
        lr = float(run.overrides[-2].split("=")[1]) if planned.group == "pilot" else None
        if planned.group == "pilot":
            curve = {500: 0.3, 4000: 0.5 if lr == 0.015 else 0.4}
        elif planned.variant == "inception" and planned.label in ("inception", "inception x1"):
            curve = {100: 0.5, 1000: 0.8}
        else:
            curve = {100: 0.85, 1000: 0.9}
        write_fake_workdir(run, curve, diverged_at=150 if planned.label == "inception x100" else None)
    argv = ["--report_only", f"--workdir={root}", f"--results={results}", "--seeds=1"]
    assert script.main(argv) == 0
    assert "Wrote" in capsys.readouterr().out
    for name in ("pilot_lr.md", "figure2.png", "figure2.pdf", "figure2_wall_time.png", "figure3.md",
                 "figure3.json", "lr_sweep.png", "lr_sweep.md", "lr_sweep.json", "ablation.md", "ablation.json"):
        assert os.path.getsize(results / name), name
    _, pilot = table((results / "pilot_lr.md").read_text())
    assert [r[1] for r in pilot] == ["0.0015", "0.005", "0.015", "0.05", "0.15"]
    assert "Best: 0.015." in (results / "pilot_lr.md").read_text()
    _, rows = table((results / "figure3.md").read_text())
    assert [r[0] for r in rows] == [*script.FIGURE2_VARIANTS, script.SIGMOID_WITHOUT_BN]
    assert rows[2][3] == "100 ± 0"  # bn_x5 reaches Inception's 80% at its first evaluation
    _, sweep_rows = table((results / "lr_sweep.md").read_text())
    assert len(sweep_rows) == 14 and any("1 of 1 diverged (steps 150)" in r[-1] for r in sweep_rows)
    _, ablation = table((results / "ablation.md").read_text())
    assert [r[0] for r in ablation][1:8] == [label for label, _ in script.ABLATION]
    # Each run's record is kept, without checkpoints, once.
    assert os.path.isfile(results / "runs" / "figure2" / "bn_x5-seed0" / "summary.json")
    assert not os.path.exists(results / "runs" / "lr_sweep" / "bn_x5-lr_x5-seed0")

    # A fresh checkout: the workdirs are gone, the kept records bring the finished runs back.
    shutil.rmtree(root / "figure2")
    capsys.readouterr()
    assert script.main(argv) == 0
    assert "7 finished runs restored from" in capsys.readouterr().out  # figure2, 1 seed
    assert table((results / "figure3.md").read_text())[1] == rows
    assert (root / "figure2" / "bn_x5-seed0" / "summary.json").is_file()

    # Figures 2/3 from any set of workdirs, grouped by their configs' variant.
    out = tmp_path / "from_runs"
    paths = [str(root / "figure2" / f"{v}-seed0") for v in ("inception", "bn_x5", "bn_x30")]
    assert script.main(["--from_runs", *paths, f"--results={out}"]) == 0
    _, rows = table((out / "figure3.md").read_text())
    assert [r[0] for r in rows] == ["inception", "bn_x5", "bn_x30"]
    assert os.path.getsize(out / "figure2.png")


def test_lr_sweep_plot_with_equal_seeds_whose_mean_rounds_above_them(tmp_path):
    """Three runs stuck at chance (0.1 each): fmean gives 0.1 + 1.4e-17, and the min-max bar must not go negative."""
    row = {"max_accuracy_each": [0.1, 0.1, 0.1], "diverged": 0, "runs": 3}
    path = tmp_path / "lr_sweep.png"
    figure2.plot_lr_sweep({"no BN": [(10.0, row), (30.0, row)]}, 0.7675, str(path))
    assert path.exists()
