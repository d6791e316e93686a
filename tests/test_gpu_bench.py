"""benchmarks/gpu.sh, the one command that measures every GPU figure, run with `--dry-run` (CPU, tiny
shapes) so that it cannot rot between the sessions that have a GPU; and its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_report  # noqa: E402  (benchmarks/ is not a package)

STAGES = {"pytest_gpu", "train", "train_compiled", "decode", "encode", "tokenize"}


@pytest.mark.slow
def test_gpu_sh_dry_run_runs_every_stage_and_writes_the_report(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    theirs = {"settings.json": "{}", "build.log": "mine", "results.xml": "<x/>"}  # OUT's other files (review 53 #5)
    for name, text in theirs.items():
        (tmp_path / name).write_text(text)
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh"), "--dry-run", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    logs = {p.name: p.read_text()[-1500:] for p in tmp_path.glob("*.log")}
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:], logs)
    assert {name: (tmp_path / name).read_text() for name in theirs} == theirs
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["dry_run"] and set(report["stages"]) == STAGES
    assert all(stage["status"] == "ok" for stage in report["stages"].values())
    train = report["stages"]["train"]["result"]["rows"]
    assert [(r["size"], r["sharded"], r["compile"]) for r in train] == [("tiny", True, False)]
    assert train[0]["tokens_per_s"] > 0
    assert [r["batch"] for r in report["stages"]["decode"]["result"]["rows"]] == [1, 2]
    table = (tmp_path / "gpu.md").read_text()
    assert "| train tiny, batch 2 x 2 micro-batches x seq 64, FSDP2 + activation checkpointing, compile off |" in table
    assert "| train tiny, batch 2 x 2 micro-batches x seq 64, FSDP2 + activation checkpointing, compile on |" in table  # as the GPU run
    assert "| decode tiny, batch 1, " in table and "| tokenize pipeline, 16 JPEGs of 64 px" in table
    assert "| GPU tests |" in table


def test_report_names_stages_that_did_not_finish(tmp_path):
    (tmp_path / "stages.tsv").write_text("train\ttimeout\t90\ndecode\tfailed(1)\t3\npytest_gpu\tok\t8\n")
    (tmp_path / "train.json").write_text('{"rows": [], "peak_flops": 1}')  # an earlier run's: not this one's figure
    (tmp_path / "pytest_gpu.xml").write_text('<testsuite tests="5" failures="0" errors="0" skipped="5"/>')
    report = gpu_report.collect(tmp_path, dry_run=False)
    assert report["stages"]["train"]["result"] is None
    assert report["stages"]["pytest_gpu"]["status"] == "no GPU test ran"  # all skipped: a driver torch cannot use
    table = gpu_report.markdown(report)
    assert "| training, compile off | `benchmarks/gpu.sh` (`bench_train.py --gpu`) | timeout |  |  |" in table
    assert "| decode | `benchmarks/gpu.sh` (`bench_generate.py --throughput --compile`) | failed(1) |  |  |" in table
    assert "| tokenizer encode, released shape, bf16 | `benchmarks/gpu.sh` (`bench_tokenizer_encode.py`) | not run |" in table


def test_gpu_sh_refuses_a_machine_without_cuda_and_bad_arguments_in_one_line(tmp_path):
    """Without CUDA every stage was a traceback and the GPU tests "ok" with all skipped (review 47 #4, #12)."""
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    for args, message in (([str(tmp_path)], "error: no CUDA device (torch.cuda.is_available() is False); on a CPU, "
                                            "--dry-run runs the stages small\n"),
                          (["--help"], "usage: benchmarks/gpu.sh [--dry-run] [OUT]\n")):
        done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh"), *args], env=env, capture_output=True, text=True,
                              timeout=120)
        assert (done.returncode, done.stderr) == (2, message)
    assert not any(tmp_path.iterdir())
