"""Compares finished, unfinished or diverged runs, e.g. the same config on two accelerators.

A run is a workdir of ``python -m bn_repro.main``: ``config.json`` and
``metrics.jsonl`` (required), ``summary.json`` (written when the run ends: a run
without it is reported as unfinished, from its metrics alone). Three tables:

* runs: device, processes, precision, global batch, final and best accuracy,
  steps and wall time to a target accuracy, total wall time, median steps/s and
  images/s;
* curve differences: each run against the first, over the steps both
  evaluated (accuracy and train loss);
* config differences: the config fields in which each run differs from the
  first, ignoring :data:`RUN_ONLY_FIELDS`; and code or library versions, or
  BN's batch (``bn.statistics='per_device'`` on another device count), if they differ.

``scripts/compare_runs.py`` is the command line.
"""

import csv
import dataclasses
import json
import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

from bn_repro import classification_experiment, mnist_experiment, run_records

# The accuracy a run is judged by, per experiment family; the default target
# is the run's ``config.target_accuracy``.
ACCURACY_KEYS = {
    "mnist": mnist_experiment.ACCURACY_KEYS[0],
    "classification": classification_experiment.ACCURACY_KEYS[0],
}
# Config fields (and their sub-fields) that say where or how a run ran, not
# what it computes: a difference in them is not reported.
RUN_ONLY_FIELDS = (
    "config.data.data_dir",  # where the (same, checksummed) data lie
    "config.data.num_workers",  # host decoding processes
    "config.data.verify_checksums",  # whether the data are checked
    "config.data.on_device",  # how the same batches reach the device
    "config.checkpoint_every",  # resuming is exact
    "config.log_every",  # progress lines change no number (tested)
    "config.parallel",  # how the global batch is split over devices
)
# Environment entries of summary.json that can change the numbers.
ENVIRONMENT_FIELDS = ("git_commit", "git_dirty", "jax", "jaxlib", "flax", "optax")
CSV_FIELDS = (
    "run", "path", "status", "device_kind", "device_count", "process_count", "precision", "global_batch_size",
    "accuracy_key", "final_accuracy", "best_accuracy", "target", "steps_to_target", "wall_time_to_target_s",
    "wall_time_s", "steps_per_sec_median", "images_per_sec_median",
)
NONE = "—"


class RunDirError(ValueError):
    """A run directory that cannot be compared (missing or unreadable files)."""


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A run directory's files, read."""

    path: str
    config: dict
    records: list[dict]
    summary: dict | None  # None: unfinished
    started: dict | None = None  # environment.json, written when the run (or its resumption) started

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def accuracy_key(self) -> str:
        return ACCURACY_KEYS[self.config["experiment"]]

    @property
    def environment(self) -> dict:
        return (self.summary or {}).get("environment") or self.started or {}

    def evaluations(self) -> dict[int, dict]:
        """The evaluation records during training, by step (not Algorithm 2's final one)."""
        return {
            r["step"]: r for r in self.records if self.accuracy_key in r and not r.get(run_records.AFTER_TRAINING)
        }


def load_run_record(path: str) -> RunRecord:
    """Reads a run directory; RunDirError naming it if config.json or metrics.jsonl is missing or bad."""
    files = {name: os.path.join(path, name) for name in ("config.json", "metrics.jsonl", "summary.json")}
    if not os.path.isdir(path):
        raise RunDirError(f"{path}: no such run directory")
    for name in ("config.json", "metrics.jsonl"):
        if not os.path.isfile(files[name]):
            raise RunDirError(f"{path}: no {name}; is it the --workdir of a run (python -m bn_repro.main)?")
    try:
        with open(files["config.json"]) as f:
            config = json.load(f)
        records = run_records.read_metrics(files["metrics.jsonl"])
        summary, started = None, None
        if os.path.isfile(files["summary.json"]):
            with open(files["summary.json"]) as f:
                summary = json.load(f)
        if os.path.isfile(os.path.join(path, "environment.json")):
            with open(os.path.join(path, "environment.json")) as f:
                started = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunDirError(f"{path}: unreadable JSON ({error})") from error
    if config.get("experiment") not in ACCURACY_KEYS:
        raise RunDirError(f"{path}/config.json: unknown experiment {config.get('experiment')!r}")
    return RunRecord(path, config, records, summary, started)


def run_row(run: RunRecord, target: float | None = None) -> dict[str, Any]:
    """The run's line of the runs table (raw values, None where unknown); keys :data:`CSV_FIELDS`."""
    if target is None:
        target = run.config.get("target_accuracy")
        if not isinstance(target, (int, float)):
            raise RunDirError(f"{run.path}/config.json: no config.target_accuracy (written by an older version?); "
                              "give the target explicitly (--target)")
    key, summary, env = run.accuracy_key, run.summary or {}, run.environment
    curve = [(s, r[key], r.get("wall_time_s")) for s, r in sorted(run.evaluations().items())]
    reached = next(((s, t) for s, a, t in curve if a >= target), (None, None))
    diverged = next((r["step"] for r in run.records if r.get("diverged")), None)
    status = f"diverged at step {diverged}" if diverged is not None else "finished" if run.summary else "unfinished"
    rates = [r["steps_per_sec"] for r in run.records[1:] if "steps_per_sec" in r]  # as train.py: [0] compiles
    steps_per_sec = summary.get("steps_per_sec_median", statistics.median(rates) if rates else None)
    batch = summary.get("global_batch_size", run.config.get("batch_size"))
    images_per_sec = summary.get("images_per_sec_median")
    if images_per_sec is None and steps_per_sec is not None and batch is not None:
        images_per_sec = steps_per_sec * batch
    wall_times = [r["wall_time_s"] for r in run.records if "wall_time_s" in r]
    return {
        "run": run.name,
        "path": run.path,
        "status": status,
        "device_kind": env.get("device_kind"),
        "device_count": env.get("device_count"),
        "process_count": env.get("process_count"),
        "precision": summary.get("precision", run.config.get("model", {}).get("dtype", "float32")),
        "global_batch_size": batch,
        "accuracy_key": key,
        "final_accuracy": curve[-1][1] if curve else None,
        "best_accuracy": max(a for _, a, _ in curve) if curve else None,
        "target": target,
        "steps_to_target": reached[0],
        "wall_time_to_target_s": reached[1],
        "wall_time_s": summary.get("wall_time_s", wall_times[-1] if wall_times else None),
        "steps_per_sec_median": steps_per_sec,
        "images_per_sec_median": images_per_sec,
    }


def _abs_diff(a: float, b: float) -> float:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) if math.isfinite(a - b) else math.inf


def curve_differences(reference: RunRecord, run: RunRecord, tolerance: float = 1e-6) -> dict[str, Any]:
    """Accuracy and train-loss differences of ``run`` from ``reference`` over the steps both evaluated.

    ``first_step_over_tolerance``: the first such step where either differs by
    more than ``tolerance`` (None if none). Max/mean are None without common steps.
    """
    if reference.accuracy_key != run.accuracy_key:
        raise ValueError(f"{run.path} ({run.accuracy_key}) and {reference.path} ({reference.accuracy_key}) "
                         "are different experiments")
    key, ours, theirs = run.accuracy_key, run.evaluations(), reference.evaluations()
    steps = sorted(set(ours) & set(theirs))
    accuracy = [_abs_diff(ours[s][key], theirs[s][key]) for s in steps]
    loss = [_abs_diff(ours[s].get("train_loss", math.nan), theirs[s].get("train_loss", math.nan)) for s in steps]
    return {
        "run": run.name,
        "common_evaluations": len(steps),
        "max_accuracy_diff": max(accuracy, default=None),
        "mean_accuracy_diff": statistics.fmean(accuracy) if steps else None,
        "max_loss_diff": max(loss, default=None),
        "mean_loss_diff": statistics.fmean(loss) if steps else None,
        "first_step_over_tolerance": next(
            (s for s, da, dl in zip(steps, accuracy, loss) if da > tolerance or dl > tolerance), None
        ),
    }


def config_changes(reference: RunRecord, run: RunRecord, ignore: Sequence[str] = RUN_ONLY_FIELDS) -> dict[str, tuple]:
    """``{dotted field: (reference's value, run's value)}`` for the config fields that differ
    (a field only one has: ``None`` for the other), except ``ignore`` and their sub-fields."""
    return {
        field: values
        for field, values in run_records.config_differences(reference.config, run.config).items()
        if not any(field == f or field.startswith(f + ".") for f in ignore)
    }


def bn_batch(run: RunRecord) -> int | None:
    """How many examples each BN layer normalises over in training (``config.bn.statistics``:
    the global batch, each device's share, or virtual batches); None if unknown or no BN."""
    config, devices = run.config, run.environment.get("device_count")
    bn, batch = config.get("bn", {}), config.get("batch_size")
    if not config.get("model", {}).get("use_bn") or batch is None:
        return None
    statistics = bn.get("statistics", "global")
    if statistics == "per_device":
        return batch // devices if devices else None
    return bn.get("virtual_batch_size") if statistics == "virtual" else batch


def environment_differences(reference: RunRecord, run: RunRecord) -> dict[str, tuple]:
    """``{"environment.X": (reference's, run's)}`` for the code and library versions
    (:data:`ENVIRONMENT_FIELDS`) that differ, and ``"BN batch"`` if BN normalises over
    batches of another size (e.g. ``bn.statistics='per_device'`` on another device
    count); unknown (unfinished runs) counts as equal."""
    a, b = reference.environment, run.environment
    diffs = {f"environment.{k}": (a[k], b[k]) for k in ENVIRONMENT_FIELDS if k in a and k in b and a[k] != b[k]}
    bn_a, bn_b = bn_batch(reference), bn_batch(run)
    if None not in (bn_a, bn_b) and bn_a != bn_b:
        diffs["BN batch"] = (bn_a, bn_b)
    return diffs


@dataclasses.dataclass(frozen=True)
class Comparison:
    runs: list[RunRecord]
    rows: list[dict]  # run_row of each run
    curves: list[dict]  # curve_differences of runs[1:] against runs[0]
    configs: list[dict]  # config_changes | environment_differences of runs[1:]
    tolerance: float


def compare(paths: Sequence[str], target: float | None = None, tolerance: float = 1e-6) -> Comparison:
    """Loads the runs and computes the three tables (``target`` None: each run's ``config.target_accuracy``)."""
    if not paths:
        raise ValueError("no run directories to compare")
    runs = [load_run_record(p) for p in paths]
    ref, others = runs[0], runs[1:]
    return Comparison(
        runs=runs,
        rows=[run_row(r, target) for r in runs],
        curves=[curve_differences(ref, r, tolerance) for r in others if r.accuracy_key == ref.accuracy_key],
        configs=[config_changes(ref, r) | environment_differences(ref, r) for r in others],
        tolerance=tolerance,
    )


Table = tuple[list[str], list[list[str]]]


def _number(value: float | None, spec: str, unit: str = "") -> str:
    return NONE if value is None else format(value, spec) + unit


def runs_table(comparison: Comparison) -> Table:
    rows = comparison.rows
    key = rows[0]["accuracy_key"] if len({r["accuracy_key"] for r in rows}) == 1 else "accuracy"
    target = f"{rows[0]['target']:g}" if len({r["target"] for r in rows}) == 1 else "target"
    headers = ["run", "status", "device", "processes", "precision", "global batch", f"final {key}",
               f"best {key}", f"steps to {target}", f"wall time to {target}", "wall time", "steps/s", "images/s"]
    lines = []
    for r in rows:
        not_reached = "not yet" if r["status"] == "unfinished" else "never"
        device = NONE if r["device_kind"] is None else f"{r['device_kind']} x {r['device_count']}"
        lines.append([
            r["run"], r["status"], device, _number(r["process_count"], "d"), r["precision"] or NONE,
            _number(r["global_batch_size"], ","), _number(r["final_accuracy"], ".4f"),
            _number(r["best_accuracy"], ".4f"),
            not_reached if r["steps_to_target"] is None else f"{r['steps_to_target']:,}",
            _number(r["wall_time_to_target_s"], ".1f", " s"),
            _number(r["wall_time_s"], ".1f", " s"), _number(r["steps_per_sec_median"], ",.0f"),
            _number(r["images_per_sec_median"], ",.0f"),
        ])
    return headers, lines


def curves_table(comparison: Comparison) -> Table:
    headers = ["run", "common evaluations", "max |Δ accuracy|", "mean |Δ accuracy|", "max |Δ train loss|",
               "mean |Δ train loss|", f"first step |Δ| > {comparison.tolerance:g}"]
    return headers, [
        [c["run"], str(c["common_evaluations"])]
        + [_number(c[k], ".3g") for k in ("max_accuracy_diff", "mean_accuracy_diff", "max_loss_diff", "mean_loss_diff")]
        + ["none" if c["first_step_over_tolerance"] is None else f"{c['first_step_over_tolerance']:,}"]
        for c in comparison.curves
    ]


def configs_table(comparison: Comparison) -> Table:
    ref = comparison.runs[0].name
    lines = []
    for run, diffs in zip(comparison.runs[1:], comparison.configs):
        lines += [[run.name, field, json.dumps(a), json.dumps(b)] for field, (a, b) in diffs.items()]
    return ["run", "field", ref, "run's value"], lines


def _text_table(table: Table) -> str:
    headers, rows = table
    widths = [max(len(x) for x in column) for column in zip(headers, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [headers, *rows])


def markdown_table(table: Table) -> str:
    headers, rows = table
    escape = lambda x: x.replace("|", "\\|")  # noqa: E731
    return "\n".join("| " + " | ".join(map(escape, line)) + " |" for line in [headers, ["---"] * len(headers), *rows])


def render(comparison: Comparison, markdown: bool = False) -> str:
    """The three sections as aligned text, or as Markdown."""
    table = markdown_table if markdown else _text_table
    heading = (lambda t: f"## {t}") if markdown else (lambda t: f"{t}\n{'=' * len(t)}")
    ref = comparison.runs[0].name
    sections = [heading("Runs"), table(runs_table(comparison))]
    ignored = ", ".join(f"`{f}`" if markdown else f for f in RUN_ONLY_FIELDS)
    sections.append(heading(f"Curve differences (against {ref})"))
    if len(comparison.runs) == 1:
        sections.append("Only one run.")
    else:
        sections.append(
            f"Over the steps both runs evaluated: absolute differences of {comparison.runs[0].accuracy_key} and "
            f"of the train loss, and the first step where either exceeds {comparison.tolerance:g}."
        )
        if len(comparison.curves) < len(comparison.runs) - 1:
            sections.append("Runs of another experiment than the first are left out.")
        sections.append(table(curves_table(comparison)))
    sections.append(heading(f"Config differences (against {ref})"))
    if len(comparison.runs) == 1:
        sections.append("Only one run.")
    else:
        same = [r.name for r, d in zip(comparison.runs[1:], comparison.configs) if not d]
        note = f"Fields that only say where or how a run ran are ignored: {ignored}."
        if len(same) == len(comparison.configs):
            sections.append(f"The configs are identical (as are the code and library versions where recorded). {note}")
        else:
            if same:
                note += f" Identical to {ref}: {', '.join(same)}."
            sections += [note, table(configs_table(comparison))]
    return "\n\n".join(sections) + "\n"


def write_csv(path: str, comparison: Comparison) -> None:
    """The runs table, one row per run, raw values (empty where unknown)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in comparison.rows)
