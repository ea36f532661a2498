"""Reproduces Sec. 4.2's comparisons (Figures 2 and 3, the learning-rate sweep,
each Sec. 4.2.1 change) on Fashion-MNIST: ``configs/imagenet.py:VARIANT:fashion``.

Every run is a normal ``python -m bn_repro.main`` run with its own workdir under
``--workdir``. Finished runs are skipped, interrupted ones resume from their
checkpoints, and ``--jobs`` go at once, each pinned to its own core (default:
one per core). Progress and an estimate of the time left are printed every
minute. Run groups, in this order (``--groups`` picks some):

  pilot     inception at the base learning rates PILOT_RATES, seed 0, 4k steps:
            the proxy's base rate is the one it trains best with (set in
            configs/imagenet.py before the other groups ran)
  figure2   the seven variants (Figures 2 and 3)
  sigmoid   bn_x5_sigmoid without BN: the second reading of "Inception with sigmoid"
  lr_sweep  bn_x5's settings and inception's at learning-rate multipliers
            LR_MULTIPLIERS (and BN_EXTRA_MULTIPLIERS for the BN net)
  ablation  bn_x5 with one Sec. 4.2.1 change undone at a time

Each finished run's metrics.jsonl, config.json and summary.json (not its
checkpoints) are kept under ``--results``/runs/, and restored from there into a
missing workdir (a fresh checkout), so that finished runs are never redone.
The tables and figures of every group whose runs have all finished go to
``--results``: pilot_lr.md, figure2.png/.pdf (and figure2_wall_time.png),
figure3.md/.json, lr_sweep.png/.md/.json, ablation.md/.json.

    python scripts/reproduce_figure2.py                       # the whole sweep, resumable
    python scripts/reproduce_figure2.py --groups=figure2 --seeds=5
    python scripts/reproduce_figure2.py --report_only         # tables of what has finished
    python scripts/reproduce_figure2.py --from_runs runs/imagenet/* --results=/tmp/fig2   # any workdirs,
                                                              # e.g. real ImageNet runs of configs/imagenet.py

Extra ``--config.FIELD=VALUE`` arguments go to every run (e.g. a larger size on
a GPU: ``--config.model.width=0.25 --config.data.image_size=112``; give such a
sweep its own ``--workdir``).
"""

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys

from bn_repro import compare, figure2, run_records, sweep, train
from bn_repro.main import load_config

CONFIG = os.path.join(sweep.REPO, "configs", "imagenet.py")
SIZE = "fashion"
GROUPS = ("pilot", "figure2", "sigmoid", "lr_sweep", "ablation")
PILOT_RATES = (0.0015, 0.005, 0.015, 0.05, 0.15)
PILOT_OVERRIDES = ("--config.num_steps=4000", "--config.eval_every=500", "--config.eval_at=()",
                   "--config.checkpoint_every=1000")
FIGURE2_VARIANTS = tuple(figure2.PAPER_FIGURE3)
LR_MULTIPLIERS = (1, 2, 5, 10, 30, 100)
BN_EXTRA_MULTIPLIERS = (300, 1000)
LR_SWEEP_NETS = {"bn_x5": "BN (bn_x5's settings)", "inception": "no BN (inception's settings)"}
# Sec. 4.2.1's changes, each undone in bn_x5 (its value in bn_baseline).
ABLATION = (
    ("1: learning rate back to x1", "--config.lr_multiplier=1.0"),
    ("2: dropout back to 40%", "--config.model.dropout_rate=0.4"),
    ("3: L2 back to x1", "--config.l2_reduction=1.0"),
    ("4: lr decay back to the slow schedule", "--config.lr_decay_speedup=1.0"),
    ("5: LRN back", "--config.model.use_lrn=True"),
    ("6: shuffling back to the baseline's (window)", "--config.data.shuffle=window"),
    ("7: photometric distortions back to full", "--config.data.distortion_strength=1.0"),
)
SIGMOID_WITHOUT_BN = "bn_x5_sigmoid without BN"


@dataclasses.dataclass(frozen=True)
class Planned:
    group: str
    label: str  # the table row
    name: str  # the workdir's name, without the seed
    variant: str
    overrides: tuple[str, ...]
    seed: int


def plan(groups: list[str], seeds: int, variants: tuple[str, ...] = FIGURE2_VARIANTS) -> list[Planned]:
    """Every run of ``groups`` (figure2: of ``variants``), group by group, and in a group seed by seed
    (every row's seed 0 before any seed 1), so that the first groups' tables are complete first."""
    rows = []
    for group in groups:
        if group == "pilot":
            rows += [(group, f"inception, lr {lr:g}", f"inception-lr{lr:g}", "inception",
                      (*PILOT_OVERRIDES, f"--config.learning_rate={lr:g}"), 1) for lr in PILOT_RATES]
        elif group == "figure2":
            rows += [(group, v, v, v, (), seeds) for v in variants]
        elif group == "sigmoid":
            rows.append((group, SIGMOID_WITHOUT_BN, "bn_x5_sigmoid-no_bn", "bn_x5_sigmoid",
                         ("--config.model.use_bn=False",), seeds))
        elif group == "lr_sweep":
            for net in LR_SWEEP_NETS:
                extra = BN_EXTRA_MULTIPLIERS if net == "bn_x5" else ()
                rows += [(group, f"{net} x{m}", f"{net}-lr_x{m}", net, (f"--config.lr_multiplier={m:g}",), seeds)
                         for m in (*LR_MULTIPLIERS, *extra)]
        elif group == "ablation":
            rows.append((group, "bn_x5 (all seven changes)", "bn_x5", "bn_x5", (), seeds))
            rows += [(group, label, f"bn_x5-undo{label.split(':')[0]}", "bn_x5", (override,), seeds)
                     for label, override in ABLATION]
            rows.append((group, "bn_baseline (all seven undone)", "bn_baseline", "bn_baseline", (), seeds))
    return [Planned(g, label, name, v, overrides, seed)
            for group in groups
            for seed in range(seeds)
            for g, label, name, v, overrides, n in rows if g == group and seed < n]


def config_spec(variant: str) -> str:
    return f"{os.path.relpath(CONFIG)}:{variant}:{SIZE}"


def resolve(planned: list[Planned], root: str, overrides: list[str]) -> dict[Planned, sweep.Run]:
    """The run of each planned entry. Entries with the same resolved config (the
    variant's name aside), e.g. the lr sweep's BN x5 and figure2's bn_x5, share
    the first one's workdir."""
    by_config: dict[str, sweep.Run] = {}
    runs = {}
    for p in planned:
        run_overrides = (*overrides, *p.overrides, f"--config.seed={p.seed}")
        config = load_config(config_spec(p.variant), run_overrides).to_dict()
        config.pop("variant")
        key = json.dumps(config, sort_keys=True)
        if key not in by_config:
            workdir = os.path.join(root, p.group, f"{p.name}-seed{p.seed}")
            by_config[key] = sweep.Run(workdir, config_spec(p.variant), run_overrides)
        runs[p] = by_config[key]
    return runs


def evaluation_steps(run: sweep.Run) -> list[int]:
    return train.evaluation_steps(load_config(run.config, run.overrides))


def rows_by_label(planned: list[Planned], runs: dict[Planned, sweep.Run], group: str) -> dict[str, list]:
    groups: dict[str, list] = {}
    for p in planned:
        if p.group == group:
            groups.setdefault(p.label, []).append(compare.load_run_record(runs[p].workdir))
    return groups


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def report(planned: list[Planned], runs: dict[Planned, sweep.Run], root: str, results: str, command: str) -> list[str]:
    """Writes the tables and figures of every group whose runs have all finished; returns their names."""
    os.makedirs(results, exist_ok=True)
    complete = [g for g in GROUPS if any(p.group == g for p in planned)
                and all(sweep.is_finished(runs[p].workdir) for p in planned if p.group == g)]
    header = f"Written by `{command}` from the runs under runs/ beside this file.\n\n"
    if "pilot" in complete:
        groups = rows_by_label(planned, runs, "pilot")
        rows = [figure2.group_row(label, rs, target=float("inf")) for label, rs in groups.items()]
        best = max(rows, key=lambda r: r["max_accuracy"]["mean"] or 0.0)
        write(os.path.join(results, "pilot_lr.md"), header + compare.markdown_table((
            ["inception (no BN), 4k steps, seed 0", "base learning rate", "max test accuracy", "final train loss"],
            [[r["label"], f"{r['learning_rate']:g}", f"{r['max_accuracy']['mean']:.2%}",
              f"{last_train_loss(groups[r['label']][0]):.4f}"] for r in rows],
        )) + f"\n\nBest: {best['learning_rate']:g}.\n")
        chosen = load_config(config_spec("inception")).learning_rate
        if chosen != best["learning_rate"]:
            print(f"NOTE: the pilot's best rate is {best['learning_rate']:g}; configs/imagenet.py's "
                  f"FASHION_LEARNING_RATE is {chosen:g}.")
    target = None
    if "figure2" in complete:
        groups = rows_by_label(planned, runs, "figure2")
        if "sigmoid" in complete:
            groups.update(rows_by_label(planned, runs, "sigmoid"))
        target = write_figures_2_and_3(groups, results, command, header,
                                       title="Fashion-MNIST proxy of Figure 2 (mean over seeds, min-max band)")["target_accuracy"]
    for group in ("lr_sweep", "ablation"):
        if group not in complete or target is None:
            continue
        groups = rows_by_label(planned, runs, group)
        rows = [figure2.group_row(label, rs, target) for label, rs in groups.items()]
        run_records.write_json(os.path.join(results, f"{group}.json"),
                               {"target_accuracy": target, "command": command, "rows": rows})
        reference = rows[0] if group == "ablation" else None  # bn_x5 with all seven changes
        write(os.path.join(results, f"{group}.md"), header + figure2.rows_markdown(rows, target, reference=reference)
              + "\n")
        if group == "lr_sweep":
            series = {title: [(float(r["label"].rsplit("x", 1)[1]), r) for r in rows if r["label"].startswith(net)]
                      for net, title in LR_SWEEP_NETS.items()}
            figure2.plot_lr_sweep(series, target, os.path.join(results, "lr_sweep.png"))
    return complete


def record_path(run: sweep.Run, root: str, results: str) -> str:
    """Where the run's record is kept under ``results`` (runs/<group>/<name>)."""
    return os.path.join(results, "runs", os.path.relpath(run.workdir, root))


def keep_records(runs: list[sweep.Run], root: str, results: str) -> None:
    """Each finished run's record into ``results``, so that it outlives the workdir (e.g. on another machine)."""
    for run in runs:
        if sweep.is_finished(run.workdir):
            copy_run_files(run.workdir, record_path(run, root, results))


def restore_records(runs: list[sweep.Run], root: str, results: str) -> list[sweep.Run]:
    """A finished run whose workdir is gone (a fresh checkout) gets its kept
    record back, so that it is skipped and reported; returns those runs."""
    restored = []
    for run in runs:
        kept = record_path(run, root, results)
        if not sweep.is_finished(run.workdir) and os.path.isfile(os.path.join(kept, "summary.json")):
            if os.path.exists(os.path.join(run.workdir, "checkpoints")):
                continue  # a workdir of its own (e.g. a rerun under way): left alone
            copy_run_files(kept, run.workdir)
            restored.append(run)
    return restored


def last_train_loss(run: compare.RunRecord) -> float:
    return next((r["train_loss"] for r in reversed(run.records) if "train_loss" in r), float("nan"))


def copy_run_files(workdir: str, destination: str) -> None:
    """A run's record without its checkpoints: metrics.jsonl, config.json, summary.json."""
    os.makedirs(destination, exist_ok=True)
    for name in ("metrics.jsonl", "config.json", "summary.json"):
        shutil.copyfile(os.path.join(workdir, name), os.path.join(destination, name))


def write_figures_2_and_3(groups: dict[str, list], results: str, command: str, header: str = "", title: str = "",
                          **extra) -> dict:
    """figure3.json/.md, figure2.png/.pdf and figure2_wall_time.png from ``groups``; returns the table."""
    table = {**figure2.figure3(groups), "command": command, **extra}
    run_records.write_json(os.path.join(results, "figure3.json"), table)
    write(os.path.join(results, "figure3.md"), header + figure2.figure3_markdown(table) + "\n")
    labels = [v for v in figure2.FIGURE2_ROWS if v in groups] or sorted(groups)
    for x, name in (("steps", "figure2.png"), ("wall_time", "figure2_wall_time.png")):
        figure2.plot_accuracy_curves(groups, labels, table["target_accuracy"], os.path.join(results, name), x=x,
                                     title=title)
    return table


def report_from_runs(paths: list[str], results: str, command: str) -> None:
    """Figure 2 and the Figure 3 table from any workdirs, grouped by their config's variant."""
    groups = figure2.group_by_variant([compare.load_run_record(p) for p in paths])
    os.makedirs(results, exist_ok=True)
    print(figure2.figure3_markdown(write_figures_2_and_3(groups, results, command)))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/fashion", help="Parent of the runs' workdirs.")
    parser.add_argument("--results", default="results/fashion", help="Where the tables and figures go.")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"Comma-separated, from {GROUPS}.")
    parser.add_argument("--variants", default=",".join(FIGURE2_VARIANTS),
                        help="Comma-separated: the figure2 group's variants (inception is the reference).")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per row (0, 1, ...); the pilot has one.")
    parser.add_argument("--jobs", type=int, default=max(1, len(sweep.available_cores())),
                        help="Runs at once, each pinned to a core (1: one after the other on all cores).")
    parser.add_argument("--report_only", action="store_true", help="Write the tables of finished groups; run nothing.")
    parser.add_argument("--from_runs", nargs="+", help="Only report Figures 2/3 from these workdirs.")
    parser.add_argument("--progress_every", type=float, default=60.0, help="Seconds between progress lines.")
    args, overrides = parser.parse_known_args(argv)
    for override in overrides:
        if not override.startswith("--config."):
            parser.error(f"unrecognised argument {override!r}: only --config.FIELD=VALUE overrides pass through")
    groups = [g for g in args.groups.split(",") if g]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"--groups: unknown {unknown}; choose from {GROUPS}")
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    args.groups = [g for g in GROUPS if g in groups]
    args.variants = tuple(v for v in args.variants.split(",") if v)
    if not set(args.variants) <= set(FIGURE2_VARIANTS) or figure2.REFERENCE not in args.variants:
        parser.error(f"--variants: choose from {FIGURE2_VARIANTS}, including {figure2.REFERENCE!r} (the reference)")
    return args, overrides


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    command = shlex.join(["python", "scripts/reproduce_figure2.py", *argv])
    if args.from_runs:
        report_from_runs(args.from_runs, args.results, command)
        return 0
    planned = plan(args.groups, args.seeds, args.variants)
    runs = resolve(planned, args.workdir, overrides)
    unique = list(dict.fromkeys(runs.values()))
    restored = restore_records(unique, args.workdir, args.results)
    if restored:
        print(f"{len(restored)} finished runs restored from {args.results}/runs.")
    if not args.report_only:
        # Prepare (or verify) the data once, before several processes read it.
        from bn_repro import fashion_mnist_data

        fashion_mnist_data.prepare_fashion_mnist(load_config(unique[0].config, unique[0].overrides).data.data_dir)
        keep = lambda run: copy_run_files(run.workdir, record_path(run, args.workdir, args.results))  # noqa: E731
        failed = sweep.run_all(unique, evaluation_steps, args.jobs, args.progress_every, on_finished=keep)
        if failed:
            print(f"{len(failed)} runs failed (their logs: <workdir>.log); run the same command again to resume them.",
                  file=sys.stderr)
    keep_records(unique, args.workdir, args.results)
    complete = report(planned, runs, args.workdir, args.results, command)
    missing = [g for g in args.groups if g not in complete]
    print(f"Wrote {args.results}: {', '.join(complete) or 'nothing yet'}"
          + (f"; not finished: {', '.join(missing)}" if missing else ""))
    return 1 if not args.report_only and missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
