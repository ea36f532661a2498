"""benchmarks/gpu_benchmarks.sh, the one prepared call for a lent GPU machine, at its smoke size on CPU.

A GPU session has minutes of device time; this runs every stage of the script end to end here
(tiny network, tiny synthetic JPEG set), so that what breaks, breaks in CI and not there."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.exists("/usr/bin/timeout"), reason="needs coreutils' timeout")
def test_gpu_benchmarks_script_smoke(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "GPU_BENCH_SMOKE": "1", "PYTHON": sys.executable, "GPU_BENCH_WHEELS": str(tmp_path / "none"),
           "GPU_BENCH_BUDGET_S": "1500", "JAX_PLATFORMS": "cpu"}
    env.pop("OUT", None)
    done = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_benchmarks.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=1600)
    log = (out / "gpu_benchmarks.log").read_text()
    assert done.returncode == 0, log[-4000:]
    for stage in ("bn_inception_float32", "bn_inception_bfloat16", "input_pipeline"):
        assert f"== {stage}: exit 0" in log
    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
        assert {"bn_inception_gpu.md", "bn_inception_gpu.json", "bn_inception_bfloat16_gpu.md",
                "bn_inception_bfloat16_gpu.json", "input_pipeline_gpu_host.md", "input_pipeline_gpu_host.json"} <= names
        rows = json.load(tar.extractfile("./bn_inception_gpu.json"))["rows"]
        pipeline = json.load(tar.extractfile("./input_pipeline_gpu_host.json"))
    assert [r["implementation"] for r in rows] == [
        "ours (JAX/XLA jit)", "ours, jit loop, host-fed batch", "ours, pmap loop, host-fed batch", "torch eager"]
    assert rows[3]["layout"] == "channels_last" and not rows[3]["other_layouts"]
    # The input pipeline is asked to feed the fastest of our rows.
    fastest = round(max(r["images_per_s"] for r in rows[:3]))
    assert f"input pipeline target: {fastest} images/s" in log
    assert pipeline["estimate"]["target_images_per_s"] == fastest and pipeline["estimate"]["workers_needed"] >= 1
    assert not (out / "gpu_results").exists()
