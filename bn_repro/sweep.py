"""Many runs of ``python -m bn_repro.main``, resumably: finished runs are
skipped, interrupted ones resume from their checkpoints (the entry point does
that by itself in a workdir that holds one), and several go at once, each
pinned to its own CPU core with single-threaded XLA (on a 2-core machine that
trains two small networks about 1.2x faster than one after the other on both
cores; README, "Fashion-MNIST").
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false"


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: ``python -m bn_repro.main --config=<config> --workdir=<workdir> <overrides>``."""

    workdir: str
    config: str
    overrides: tuple[str, ...] = ()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bn_repro.main", f"--config={self.config}", f"--workdir={self.workdir}",
                *self.overrides]


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def launch(command: Sequence[str], core: int | None, log_path: str | None = None) -> subprocess.Popen:
    """Starts ``command``; with ``core``, pinned to it with single-threaded XLA.
    Output goes to ``log_path`` (appended) if given."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    preexec = None
    if core is not None:
        env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), SINGLE_THREAD_XLA]))
        preexec = lambda: os.sched_setaffinity(0, {core})  # noqa: E731
    output = open(log_path, "a") if log_path else None  # noqa: SIM115 (the child keeps it)
    try:
        return subprocess.Popen(list(command), env=env, preexec_fn=preexec, stdout=output, stderr=subprocess.STDOUT
                                if output else None)
    finally:
        if output:
            output.close()


def is_finished(workdir: str) -> bool:
    """Whether the run in ``workdir`` has ended (trained to the end, or diverged): its summary.json exists."""
    return os.path.isfile(os.path.join(workdir, "summary.json"))


def fraction_done(workdir: str, num_steps: int) -> float:
    """How far the run in ``workdir`` is: 1 if finished, else its last recorded step / ``num_steps``."""
    if is_finished(workdir):
        return 1.0
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0.0
    step = 0
    with open(path) as f:
        for line in f:
            try:
                step = max(step, json.loads(line).get("step", 0))
            except json.JSONDecodeError:  # a line being written
                pass
    return min(1.0, step / num_steps)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def run_all(
    runs: Sequence[Run], num_steps: Callable[[Run], int], jobs: int, progress_every: float = 60.0,
    print_fn: Callable[[str], None] = print,
) -> list[Run]:
    """Runs every unfinished run of ``runs``, ``jobs`` at a time (pinned one per
    core if ``jobs`` > 1, else one after the other on all cores), printing
    progress and an estimate of the time left every ``progress_every`` seconds.
    Each run's output goes to ``<workdir>.log``. Returns the runs that failed
    (non-zero exit); running it again resumes them."""
    pending = [run for run in runs if not is_finished(run.workdir)]
    total = {run: num_steps(run) for run in runs}
    cores = available_cores()
    pinned = jobs > 1 and len(cores) >= jobs
    print_fn(f"{len(runs) - len(pending)} of {len(runs)} runs finished; running {len(pending)}, "
             f"{jobs} at a time{' (one per core, single-threaded XLA)' if pinned else ''}.")
    start = time.perf_counter()
    done_at_start = {run: fraction_done(run.workdir, total[run]) for run in pending}
    running: dict[Run, tuple[subprocess.Popen, int | None]] = {}
    failed: list[Run] = []
    last_report = start
    queue = list(pending)
    while queue or running:
        free = [c for c in cores if c not in {core for _, core in running.values()}] if pinned else [None]
        while queue and len(running) < jobs and free:
            run, core = queue.pop(0), free.pop(0)
            os.makedirs(os.path.dirname(os.path.abspath(run.workdir)), exist_ok=True)
            running[run] = (launch(run.command(), core, run.workdir + ".log"), core)
        time.sleep(0.5)
        for run, (process, _) in list(running.items()):
            if process.poll() is not None:
                del running[run]
                if process.returncode:
                    failed.append(run)
                    print_fn(f"FAILED (exit {process.returncode}): {run.workdir}; see {run.workdir}.log")
                else:
                    print_fn(f"finished {run.workdir}")
        now = time.perf_counter()
        if now - last_report >= progress_every or not (queue or running):
            last_report = now
            fractions = {run: fraction_done(run.workdir, total[run]) for run in pending}
            progress = sum(fractions[r] - done_at_start[r] for r in pending if r not in failed)
            left = sum(1.0 - fractions[r] for r in pending if r not in failed)
            eta = f", about {format_duration(left * (now - start) / progress)} left" if progress > 0 and left else ""
            finished = sum(is_finished(r.workdir) for r in runs)
            print_fn(f"[{format_duration(now - start)}] {finished}/{len(runs)} runs finished, "
                     f"{len(running)} running{eta}")
    return failed
