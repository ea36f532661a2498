"""Many runs of ``python -m bn_repro.main``, resumably: finished runs are
skipped, interrupted ones resume from their checkpoints (the entry point does
that by itself in a workdir that holds one), and several go at once, each
pinned to its own CPU core with single-threaded XLA (on a 2-core machine that
trains two small networks about 1.13x faster than one after the other on both
cores; README, "Fashion-MNIST").
"""

import dataclasses
import fcntl
import json
import os
import signal
import statistics
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


def launch(command: Sequence[str], core: int | None, log_path: str | None = None,
           pass_fds: Sequence[int] = ()) -> subprocess.Popen:
    """Starts ``command``; with ``core``, pinned to it with single-threaded XLA.
    Output goes to ``log_path`` (appended) if given; ``pass_fds`` are inherited."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    preexec = None
    if core is not None:
        env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), SINGLE_THREAD_XLA]))
        preexec = lambda: os.sched_setaffinity(0, {core})  # noqa: E731
    output = open(log_path, "a") if log_path else None  # noqa: SIM115 (the child keeps it)
    try:
        return subprocess.Popen(list(command), env=env, preexec_fn=preexec, stdout=output,
                                stderr=subprocess.STDOUT if output else None, pass_fds=tuple(pass_fds))
    finally:
        if output:
            output.close()


def is_finished(workdir: str) -> bool:
    """Whether the run in ``workdir`` has ended (trained to the end, or diverged): its summary.json exists."""
    return os.path.isfile(os.path.join(workdir, "summary.json"))


def _records(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    records = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line being written
                    pass
    return records


def fraction_done(workdir: str, eval_steps: Sequence[int]) -> float:
    """How much of the run in ``workdir`` is done, counting its evaluations
    (``eval_steps``, the last being the run's length) as well as its steps: 1 if
    finished, else (steps + E x evaluations so far) / (all steps + E x all
    evaluations), where E, an evaluation's cost in training steps, comes from
    the run's own records (wall time between two evaluations minus the time
    their steps took)."""
    if is_finished(workdir):
        return 1.0
    records = [r for r in _records(workdir) if "steps_per_sec" in r and "wall_time_s" in r]
    if not records:
        return 0.0
    step = records[-1]["step"]
    costs = [(b["wall_time_s"] - a["wall_time_s"]) * b["steps_per_sec"] - (b["step"] - a["step"])
             for a, b in zip(records, records[1:])]
    cost = max(0.0, statistics.median(costs)) if costs else 0.0
    done = step + cost * sum(s <= step for s in eval_steps)
    return min(1.0, done / (eval_steps[-1] + cost * len(eval_steps)))


class AlreadyRunning(RuntimeError):
    """Another process holds the run's lock."""


def lock(workdir: str) -> int:
    """An exclusive lock on ``<workdir>.lock``, as an open file descriptor: the
    run's process inherits it, so that no second sweep starts the same run
    while it lives. AlreadyRunning if another process holds it."""
    os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
    fd = os.open(workdir + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"{workdir} is being run by another process (it holds {workdir}.lock)") from None
    return fd


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def run_all(
    runs: Sequence[Run], eval_steps: Callable[[Run], Sequence[int]], jobs: int, progress_every: float = 60.0,
    print_fn: Callable[[str], None] = print, on_finished: Callable[[Run], None] | None = None,
) -> list[Run]:
    """Runs every unfinished run of ``runs``, ``jobs`` at a time (pinned one per
    core if ``jobs`` > 1, else one after the other on all cores), printing
    progress and an estimate of the time left every ``progress_every`` seconds
    (``eval_steps(run)``: its evaluation steps, for the estimate). Each run's
    output goes to ``<workdir>.log``; ``on_finished(run)`` is called as each
    ends well. A run that another sweep is running is
    left to it. On SIGTERM or Ctrl-C the runs are stopped (they resume from their
    last checkpoints next time). Returns the runs that failed (non-zero exit) or
    were stopped; running it again resumes them."""
    pending = [run for run in runs if not is_finished(run.workdir)]
    schedule = {run: list(eval_steps(run)) for run in pending}
    cores = available_cores()
    pinned = jobs > 1 and len(cores) >= jobs
    print_fn(f"{len(runs) - len(pending)} of {len(runs)} runs finished; running {len(pending)}, "
             f"{jobs} at a time{' (one per core, single-threaded XLA)' if pinned else ''}.")
    start = time.perf_counter()
    done_at_start = {run: fraction_done(run.workdir, schedule[run]) for run in pending}
    running: dict[Run, tuple[subprocess.Popen, int | None]] = {}
    failed: list[Run] = []
    last_report = start
    queue = list(pending)

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while queue or running:
            free = [c for c in cores if c not in {core for _, core in running.values()}] if pinned else [None]
            while queue and len(running) < jobs and free:
                run = queue.pop(0)
                try:
                    fd = lock(run.workdir)
                except AlreadyRunning as error:
                    print_fn(f"skipped: {error}")
                    failed.append(run)
                    continue
                try:
                    core = free.pop(0)
                    running[run] = (launch(run.command(), core, run.workdir + ".log", pass_fds=(fd,)), core)
                finally:
                    os.close(fd)  # the run's process holds the lock now
            time.sleep(0.5)
            for run, (process, _) in list(running.items()):
                if process.poll() is not None:
                    del running[run]
                    if process.returncode:
                        failed.append(run)
                        print_fn(f"FAILED (exit {process.returncode}): {run.workdir}; see {run.workdir}.log")
                    else:
                        print_fn(f"finished {run.workdir}")
                        if on_finished:
                            on_finished(run)
            now = time.perf_counter()
            if now - last_report >= progress_every or not (queue or running):
                last_report = now
                print_fn(progress_line(runs, pending, schedule, done_at_start, failed, len(running), now - start))
    except KeyboardInterrupt:
        for process, _ in running.values():
            process.terminate()
        for run, (process, _) in running.items():
            process.wait()
            failed.append(run)
        print_fn(f"Stopped; {len(running)} runs interrupted. Run the same command again to resume them.")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failed


def progress_line(runs: Sequence[Run], pending: Sequence[Run], schedule: dict, done_at_start: dict,
                  failed: Sequence[Run], running: int, elapsed: float) -> str:
    """Finished and running runs, and the time left at the rate work got done since the sweep started."""
    fractions = {run: fraction_done(run.workdir, schedule[run]) for run in pending}
    progress = sum(fractions[r] - done_at_start[r] for r in pending if r not in failed)
    left = sum(1.0 - fractions[r] for r in pending if r not in failed)
    eta = f", about {format_duration(left * elapsed / progress)} left" if progress > 0 and left else ""
    finished = sum(is_finished(r.workdir) for r in runs)
    return f"[{format_duration(elapsed)}] {finished}/{len(runs)} runs finished, {running} running{eta}"
