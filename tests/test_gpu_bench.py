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
    (tmp_path / "pytest_gpu.xml").write_text('<testsuite tests="5" failures="0" errors="0" skipped="5"/>')
    report = gpu_report.collect(tmp_path, dry_run=False)
    assert report["stages"]["train"]["result"] is None  # cut before its first row
    assert report["stages"]["pytest_gpu"]["status"] == "no GPU test ran"  # all skipped: a driver torch cannot use
    table = gpu_report.markdown(report)
    assert "| training, compile off | `benchmarks/gpu.sh` (`bench_train.py --gpu`) | timeout |  |  |" in table
    assert "| decode | `benchmarks/gpu.sh` (`bench_generate.py --throughput --compile`) | failed(1) |  |  |" in table
    assert "| tokenizer encode, released shape, bf16 | `benchmarks/gpu.sh` (`bench_tokenizer_encode.py`) | not run |" in table


def test_report_keeps_the_rows_of_a_stage_cut_by_its_limit_and_names_failed_gpu_tests(tmp_path):
    """A timed-out stage lost every row it had measured (the benchmarks wrote JSON at the end), and a failed GPU test
    run showed neither counts nor names (review 63 #3, #4)."""
    (tmp_path / "stages.tsv").write_text("train\ttimeout\t90\npytest_gpu\tfailed(1)\t80\n")
    row = dict(size="300m", batch=16, accumulate=1, seq=4096, compile=False, sharded=False, tokens_per_s=1e5, mfu=0.4)
    (tmp_path / "train.json").write_text(json.dumps({"device": "H100", "peak_flops": 989e12, "rows": [row]}))
    (tmp_path / "pytest_gpu.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_generate" name="test_compiled"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_probe" name="test_bf16"/></testsuite></testsuites>')
    table = gpu_report.markdown(gpu_report.collect(tmp_path, dry_run=False))
    assert "| training, compile off | `benchmarks/gpu.sh` (`bench_train.py --gpu`) | timeout: the rows below were measured before the time limit |" in table
    assert "| train 300m, batch 16 x 1 micro-batches x seq 4096, one replica, compile off |" in table and "MFU 40.0%" in table
    assert "| GPU tests | `benchmarks/gpu.sh` (`pytest -m gpu`) | failed(1): 4 passed, 1 failed (tests.test_generate::test_compiled), 0 skipped |" in table


def test_gpu_sh_names_a_missing_dependency_before_any_stage(tmp_path):
    """A GPU image without the project's dependencies failed every stage at import in turn (review 63 #1)."""
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'omegaconf':\n"
        "            raise ImportError(\"No module named 'omegaconf'\", name=name)\n"
        "sys.meta_path.insert(0, Block())\n")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path / "block")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh"), "--dry-run", str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith(
        f"error: {sys.executable}: cannot import tokenizer (No module named 'omegaconf'); run make install first"), done.stderr
    assert not (tmp_path / "out").exists()


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
