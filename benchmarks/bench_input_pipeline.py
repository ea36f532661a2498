"""Throughput of the ImageNet input pipeline alone: decode, crop, distort, batch (no model).

1. Writes a synthetic ``imagenet2012`` in a TFDS data dir, in the form
   ``scripts/prepare_imagenet.py`` leaves the real one: TFDS's own
   ``imagenet2012`` builder (its version, features and dataset_info), with only
   its source replaced (`SyntheticImagenet`), prepared as array_record through
   ``mnist_data.build_once`` as ``fashion_mnist`` is; no TensorFlow. The splits
   hold ``--num_images`` training and ``--num_eval_images`` validation JPEGs of
   ``--width`` x ``--height`` (500x375, ImageNet's typical size) at quality
   ``--quality``: random fields with the 1/f amplitude spectrum of photographs
   down to single pixels (so a JPEG is about as large, about 110 KB, and as
   costly to decode as an ImageNet photograph's; the sizes are reported),
   labels uniform in 0..999, made by ``--write_processes`` processes. An
   already prepared ``--data_dir`` of the same sizes is reused.
2. Reads it as training does: ``classification_experiment.open_split`` and
   ``image_data.train_batches`` / ``eval_batches`` with ``--config``'s data
   settings (default ``configs/imagenet.py:bn_x5``: 224x224 Inception crops,
   distortion strength 0.5, global shuffling, 3 channels, batch 32, evaluation
   central crops of 0.875). For each ``--workers`` count (grain worker
   processes; 0 = in-process reader threads) one stream is opened, ``--warmup``
   batches per worker are drawn (worker start-up included), then ``--repeats``
   consecutive timed windows of ``--batches`` batches; images/s is their
   median. Also CPU ms/image: the CPU time of this process and its live
   descendants (the workers) per image, which other load on the machine
   changes much less than images/s.
3. From ``--target_images_per_sec`` (e.g. the measured step rate of the GPU
   times the batch) it estimates the workers needed as
   ceil(target / images/s per worker), from the training row with the most
   workers not above the available cores, and the cores needed as
   target x CPU s/image.

The images are in the page cache (written just before, or read once when
measuring their size): disk reads are not part of the time.

    python benchmarks/bench_input_pipeline.py --target_images_per_sec 1000 \\
        --output results/bench/input_pipeline_cpu.md
"""

import argparse
import contextlib
import datetime
import functools
import io
import math
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from bench_mnist import version, write_outputs  # This script's directory is on sys.path.
from bn_repro import imagenet_data
from bn_repro.mnist_data import build_once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "imagenet.py") + ":bn_x5"
NUM_CLASSES = 1000
SPLITS = ("train", "validation")
PATHS = {"train": "train: Inception crop + flip + distortions", "eval": "eval: central crop"}
CHROMA_ROWS = 32  # Colour varies more coarsely than brightness: its fields stop at 32 rows, then are upsampled.
CHROMA = 0.4  # Colour-difference fields' amplitude relative to the luminance field's.
CONTRAST = 40.0  # Grey levels per standard deviation of the luminance field (about 1% of pixels clip).


def _resize(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float field resized bicubically to height x width."""
    return np.asarray(PIL.Image.fromarray(field.astype(np.float32), mode="F").resize((width, height),
                                                                                       PIL.Image.BICUBIC))


def random_field(rng: np.random.Generator, height: int, width: int, finest_rows: int) -> np.ndarray:
    """float height x width: synthesised coarse to fine from a 2-row grid of white noise,
    each octave upsampled twice (bicubic) and given fresh white noise of the same
    variance, so that every octave up to ``finest_rows`` carries the same energy:
    the 1/f amplitude spectrum of photographs."""
    h, w = 2, max(2, round(2 * width / height))
    field = rng.standard_normal((h, w))
    while h < finest_rows:
        h, w = min(2 * h, height), min(2 * w, width)
        field = _resize(field, h, w) + rng.standard_normal((h, w))
    return field if (h, w) == (height, width) else _resize(field, height, width)


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 height x width x 3: a 1/f luminance field down to single pixels plus two
    coarser, weaker colour-difference fields, mapped to RGB (JPEG's YCbCr inverse)."""
    luma = random_field(rng, height, width, height)
    cb, cr = (CHROMA * random_field(rng, height, width, CHROMA_ROWS) for _ in range(2))
    scale = CONTRAST / luma.std()
    rgb = np.stack([luma + 1.402 * cr, luma - 0.344 * cb - 0.714 * cr, luma + 1.772 * cb], axis=-1)
    return np.clip(np.rint(128.0 + scale * rgb), 0, 255).astype(np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    """``image`` encoded as a baseline JPEG at ``quality`` (PIL's default 4:2:0 subsampling)."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def synthetic_example(seed: int, split: str, index: int, height: int, width: int, quality: int) -> dict:
    """Example ``index`` of ``split``, a function of its arguments: an `imagenet2012` feature dict
    (JPEG bytes, a label uniform in 0..999, a file name)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    return {"image": jpeg_bytes(natural_image(rng, height, width), quality), "label": int(rng.integers(NUM_CLASSES)),
            "file_name": f"synthetic_{split}_{index:08d}.JPEG"}


class SyntheticImagenet(tfds.builder_cls(imagenet_data.NAME), skip_registration=True):
    """TFDS's ``imagenet2012`` builder (same name, version, features, dataset_info)
    writing synthetic JPEGs instead of reading the ILSVRC2012 tars; what it
    prepares is read by ``tfds.data_source('imagenet2012', ...)`` as the real one.
    The images are made by ``processes`` spawned processes (1: in this one)."""

    name = imagenet_data.NAME

    def __init__(self, *, sizes: dict[str, int] | None = None, width: int = 500, height: int = 375,
                 quality: int = 90, seed: int = 0, processes: int = 1, **kwargs):
        self._sizes, self._processes = sizes, processes
        self._make = functools.partial(synthetic_example, seed, height=height, width=width, quality=quality)
        super().__init__(**kwargs)
        self._original_state.update(sizes=sizes, width=width, height=height, quality=quality, seed=seed,
                                    processes=processes)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in self._sizes.items()}

    def _generate_examples(self, split: str, num_examples: int):
        make = functools.partial(self._make, split)
        with contextlib.ExitStack() as stack:
            pool = self._processes > 1 and stack.enter_context(mp.get_context("spawn").Pool(self._processes))
            for example in (pool.imap(make, range(num_examples)) if pool else map(make, range(num_examples))):
                yield example["file_name"], example


def write_dataset(data_dir: str, sizes: dict[str, int], width: int, height: int, quality: int,
                  processes: int = 1) -> float | None:
    """Prepares the synthetic ``imagenet2012`` in ``data_dir`` unless it is there (images made
    by ``processes`` processes); the seconds it took, or None if it was already prepared
    (with other sizes: SystemExit)."""
    start = time.perf_counter()
    source = lambda: {"sizes": sizes, "width": width, "height": height, "quality": quality,  # noqa: E731
                      "processes": processes}
    if build_once(SyntheticImagenet, data_dir, source):
        return time.perf_counter() - start
    splits = SyntheticImagenet(data_dir=data_dir).info.splits
    found = {split: splits[split].num_examples if split in splits else 0 for split in sizes}
    if found != sizes:
        raise SystemExit(f"{data_dir} already holds an imagenet2012 with {found} examples, not {sizes}: "
                         "delete it or use another --data_dir.")
    return None


def jpeg_stats(data_dir: str, split: str) -> dict:
    """Sizes (KB) and dimensions of the stored JPEGs of ``split``, read raw (not decoded)."""
    source = SyntheticImagenet(data_dir=data_dir).as_data_source(decoders={"image": tfds.decode.SkipDecoding()})
    encoded = [example["image"] for example in source[split].__getitems__(range(len(source[split])))]
    kb = np.array([len(e) for e in encoded]) / 1000
    with PIL.Image.open(io.BytesIO(encoded[0])) as first:
        width, height = first.size
    return {"num_images": len(encoded), "width": width, "height": height,
            "mean_kb": float(kb.mean()), "min_kb": float(kb.min()), "max_kb": float(kb.max())}


def descendants(pid: int) -> list[int]:
    """The live descendant processes of ``pid`` (Linux /proc; [] elsewhere)."""
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    except OSError:
        return []
    return children + [d for c in children for d in descendants(c)]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its live descendants."""
    total, ticks = time.process_time(), os.sysconf("SC_CLK_TCK")
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError, ValueError):
            pass  # exited meanwhile
    return total


def time_stream(batches: Iterator[dict], batch_size: int, warmup: int, num_batches: int, repeats: int) -> dict:
    """Draws ``warmup`` batches, then times ``repeats`` consecutive windows of ``num_batches``; closes the stream."""
    try:
        start = time.perf_counter()
        for _ in range(warmup):
            next(batches)
        warmup_s, rates, cpu_ms = time.perf_counter() - start, [], []
        for _ in range(repeats):
            start, cpu = time.perf_counter(), cpu_seconds()
            for _ in range(num_batches):
                batch = next(batches)
            images = num_batches * batch_size
            rates.append(images / (time.perf_counter() - start))
            cpu_ms.append(1000 * (cpu_seconds() - cpu) / images)
        shape = list(np.shape(batch["image"]))
        del batch  # with workers: a shared-memory array, freed when dropped
    finally:
        batches.close()
    return {"warmup_s": warmup_s, "images_per_s_each": rates, "images_per_s": statistics.median(rates),
            "cpu_ms_per_image_each": cpu_ms, "cpu_ms_per_image": statistics.median(cpu_ms), "batch_shape": shape}


def streams(config, data_dir: str, num_steps: int) -> dict[str, Callable[[int], Iterator[dict]]]:
    """{path: num_workers -> a batch stream}, as a training run opens them (``classification_experiment``)."""
    from bn_repro import classification_experiment, image_data

    d = config.data
    train = classification_experiment.open_split(d.dataset, "train", data_dir)
    evaluation = classification_experiment.open_split(d.dataset, d.eval_split, data_dir)
    return {
        "train": lambda workers: image_data.train_batches(
            train, seed=config.seed, global_batch_size=config.batch_size, image_size=d.image_size,
            distortion_strength=d.distortion_strength, shuffle=d.shuffle, shuffle_window=d.shuffle_window,
            start_step=0, num_steps=num_steps, num_workers=workers, channels=d.channels),
        "eval": lambda workers: image_data.eval_batches(
            evaluation, global_batch_size=config.batch_size, image_size=d.image_size,
            crop_fraction=d.crop_fraction, num_workers=workers, channels=d.channels),
    }


def reader_threads(workers: int) -> int:
    """grain reader threads per process at ``workers`` (``image_data``'s read options)."""
    from bn_repro import image_data

    return image_data._read_options(workers).num_threads


def workers_needed(target: float, row: dict) -> int:
    """ceil(target / the row's images/s per worker): workers of that rate for ``target`` images/s."""
    return math.ceil(target / row["images_per_s_per_worker"])


def estimate(rows: list[dict], target: float | None, cores: int) -> dict | None:
    """Workers and cores needed for ``target`` training images/s, from the training row
    with the most workers not above ``cores`` (else the fewest workers above 0)."""
    measured = [r for r in rows if r["path"] == "train" and r["workers"] > 0]
    if target is None or not measured:
        return None
    within = [r for r in measured if r["workers"] <= cores]
    row = max(within, key=lambda r: r["workers"]) if within else min(measured, key=lambda r: r["workers"])
    return {"target_images_per_s": target, "from_workers": row["workers"],
            "images_per_s_per_worker": row["images_per_s_per_worker"], "workers_needed": workers_needed(target, row),
            "cpu_ms_per_image": row["cpu_ms_per_image"],
            "cores_needed": math.ceil(target * row["cpu_ms_per_image"] / 1000)}


def warmup_batches(warmup: int, workers: int) -> int:
    """Untimed batches of a stream with ``workers`` workers: ``warmup`` per worker (0 workers:
    ``warmup``). Workers deliver whole batches round-robin, so every worker has started and
    delivered ``warmup`` batches before the timing starts."""
    return warmup * max(1, workers)


def stream_batches(args: argparse.Namespace) -> int:
    """Batches the longest timed stream draws."""
    return warmup_batches(args.warmup, max(args.workers)) + args.repeats * args.batches


def bench(config, data_dir: str, args: argparse.Namespace) -> list[dict]:
    """One row per (path, worker count)."""
    opened = streams(config, data_dir, stream_batches(args))
    rows = []
    for path in args.paths:
        for workers in args.workers:
            result = time_stream(opened[path](workers), config.batch_size, warmup_batches(args.warmup, workers),
                                 args.batches, args.repeats)
            rows.append({"path": path, "workers": workers, "reader_threads": reader_threads(workers),
                         **result, "images_per_s_per_worker": result["images_per_s"] / workers if workers else None,
                         "loadavg": list(os.getloadavg())})
            print(f"{path} workers={workers}: {result['images_per_s']:.1f} images/s", flush=True)
    return rows


def markdown(rows: list[dict], dataset: dict, estimated: dict | None, config, command: str, wall_s: float,
             args: argparse.Namespace) -> str:
    """The report: machine, versions, load, command, data and method, the table, the estimate."""
    from bn_repro.run_records import cpu_model

    d, load = config.data, lambda values: " / ".join(f"{v:.1f}" for v in values)  # noqa: E731
    written = (f"written in {dataset['write_s']:.0f} s" if dataset["write_s"] is not None else "already there, reused")
    train, val = dataset["train"], dataset["validation"]
    lines = [
        f"# ImageNet input pipeline alone: decode, crop, distort, batch ({d.image_size}x{d.image_size}, "
        f"batch {config.batch_size})", "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores ({args.cores} available), {platform.platform()}",
        f"- versions: python {platform.python_version()}, grain {version('grain')}, tensorflow-datasets "
        f"{version('tensorflow-datasets')}, array-record {version('array-record')}, pillow {version('pillow')}, "
        f"numpy {version('numpy')}, opencv {version('opencv-python')}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; total run time {wall_s:.0f} s; "
        f"load average (1/5/15 min) at the start {load(args.load_start)}, at the end {load(os.getloadavg())} "
        "(other processes share the machine)",
        f"- command: `{command}`",
        f"- data: synthetic `imagenet2012` (TFDS's builder, array_record; {written}): {train['num_images']} "
        f"training and {val['num_images']} validation JPEGs of {train['width']}x{train['height']} at quality "
        f"{args.quality}, {train['mean_kb']:.0f} KB each on average ({train['min_kb']:.0f}-{train['max_kb']:.0f}); "
        "in the page cache (no disk reads timed)",
        f"- pipeline: `classification_experiment.open_split` + `image_data.train_batches` / `eval_batches` with "
        f"`{os.path.relpath(args.config.partition(':')[0], REPO)}:{args.config.partition(':')[2]}`'s data "
        f"settings (distortion strength {d.distortion_strength}, shuffle {d.shuffle}, {d.channels} channels, "
        f"eval crop fraction {d.crop_fraction}); workers = grain worker processes (0: in-process); "
        f"{args.warmup} warm-up batches per worker ({args.warmup} with 0 workers; worker start-up included) "
        f"excluded, then the median (min-max) of {args.repeats} consecutive windows of {args.batches} batches; "
        "CPU ms/image = CPU time of this process and its workers per image (changed less by other load than "
        "images/s)", "",
    ]
    spread = lambda r: "{:.1f} ({:.1f}-{:.1f})".format(  # noqa: E731
        r["images_per_s"], min(r["images_per_s_each"]), max(r["images_per_s_each"]))
    columns = [
        ("path", lambda r: PATHS[r["path"]]), ("workers", lambda r: str(r["workers"])),
        ("reader threads/process", lambda r: str(r["reader_threads"])), ("images/s (min-max)", spread),
        ("images/s per worker", lambda r: f"{r['images_per_s_per_worker']:.1f}" if r["workers"] else "-"),
        ("CPU ms/image", lambda r: f"{r['cpu_ms_per_image']:.1f}"), ("warm-up s", lambda r: f"{r['warmup_s']:.1f}"),
    ]
    lines += ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    if estimated:
        e = estimated
        lines += ["", f"Estimate for {e['target_images_per_s']:g} training images/s, from the "
                  f"{e['from_workers']}-worker row ({e['images_per_s_per_worker']:.1f} images/s per worker, "
                  "assuming linear scaling): "
                  f"**{e['workers_needed']} workers** = ceil({e['target_images_per_s']:g} / "
                  f"{e['images_per_s_per_worker']:.1f}); from its {e['cpu_ms_per_image']:.1f} CPU ms/image, "
                  f"about {e['cores_needed']} core(s) busy with input alone."]
    elif args.target_images_per_sec is not None:
        lines += ["", "No estimate of the workers needed: no training row with workers > 0."]
    return "\n".join(lines).rstrip() + "\n"


def int_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; each >= 0."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts >= 0, got {text!r}")
    return values


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="Config whose data settings the pipeline uses.")
    parser.add_argument("--image_size", type=int, help="Override the config's crop size (224); for smoke tests.")
    parser.add_argument("--batch_size", type=int, help="Override the config's batch (32).")
    parser.add_argument("--data_dir", help="TFDS data dir for the synthetic imagenet2012 (reused if already "
                        "prepared with the same sizes); default: a temporary one, deleted at the end.")
    parser.add_argument("--num_images", type=int, default=2000, help="Training JPEGs written.")
    parser.add_argument("--num_eval_images", type=int, help="Validation JPEGs written; default: as many as the "
                        "longest timed evaluation stream reads, (warmup x max workers + repeats x batches) x batch.")
    parser.add_argument("--width", type=int, default=500, help="Width of the JPEGs (ImageNet's typical 500).")
    parser.add_argument("--height", type=int, default=375, help="Height of the JPEGs (ImageNet's typical 375).")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality.")
    parser.add_argument("--write_processes", type=int, default=len(os.sched_getaffinity(0)),
                        help="Processes making the JPEGs when writing (default: the available cores).")
    parser.add_argument("--workers", type=int_list, default=[0, 1, 2, 4, 8, 16],
                        help="Comma-separated grain worker counts (0 = in-process).")
    parser.add_argument("--paths", default="train,eval", help="Comma-separated: train, eval, or both.")
    parser.add_argument("--warmup", type=int, default=5,
                        help="Untimed batches first per stream, per worker (>= 1; 0 workers: once).")
    parser.add_argument("--batches", type=int, default=20, help="Batches per timed window.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed windows per stream; the median is reported.")
    parser.add_argument("--target_images_per_sec", type=float,
                        help="Training images/s the accelerator consumes (step rate x batch): workers needed.")
    parser.add_argument("--output", help="Also write the Markdown here, and the JSON beside it (.json).")
    args = parser.parse_args(argv)
    args.paths = [p.strip() for p in args.paths.split(",")]
    if bad := [p for p in args.paths if p not in PATHS]:
        parser.error(f"--paths: unknown {bad}; choose from {list(PATHS)}")
    args.warmup = max(1, args.warmup)
    args.cores = len(os.sched_getaffinity(0))
    from bn_repro.main import load_config

    overrides = [f"--config.data.image_size={args.image_size}"] if args.image_size else []
    overrides += [f"--config.batch_size={args.batch_size}"] if args.batch_size else []
    config = load_config(args.config, overrides)
    if config.data.dataset != imagenet_data.NAME:
        parser.error(f"{args.config} reads {config.data.dataset}, not {imagenet_data.NAME}")
    timed_images = stream_batches(args) * config.batch_size
    sizes = {"train": args.num_images, "validation": args.num_eval_images or timed_images}
    if "eval" in args.paths and sizes["validation"] < timed_images:
        parser.error(f"--num_eval_images {sizes['validation']}: the evaluation stream reads {timed_images}")
    start, args.load_start = time.perf_counter(), os.getloadavg()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_input_pipeline_")
    try:
        write_s = write_dataset(data_dir, sizes, args.width, args.height, args.quality, args.write_processes)
        dataset = {"data_dir": data_dir, "write_s": write_s, **{s: jpeg_stats(data_dir, s) for s in SPLITS}}
        rows = bench(config, data_dir, args)
    finally:
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    estimated = estimate(rows, args.target_images_per_sec, args.cores)
    command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__)), *argv])
    text = markdown(rows, dataset, estimated, config, command, time.perf_counter() - start, args)
    print(text)
    if args.output:
        from bn_repro.run_records import cpu_model

        record = {"command": command, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "cores_available": args.cores,
                  "versions": {p: version(p) for p in ("grain", "tensorflow-datasets", "array-record", "pillow",
                                                       "numpy", "opencv-python")},
                  "python": platform.python_version(), "load_start": args.load_start, "load_end": os.getloadavg(),
                  "config": args.config, "batch_size": config.batch_size, "image_size": config.data.image_size,
                  "dataset": dataset, "estimate": estimated, "rows": rows}
        write_outputs(args.output, text, record)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
