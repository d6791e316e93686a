"""The CPU benchmarks that benchmarks/gpu.sh does not run, run small, so that they cannot rot unseen."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_stream_writes_its_synthetic_shards_and_reports_a_rate():
    command = [sys.executable, str(ROOT / "benchmarks/bench_stream.py"), "--tokens", "40000", "--seq-len", "512",
               "--batch-size", "2", "--workers", "0", "--resume-at", "0.25"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"packed stream: ([\d,]+) tokens/s .*?; (\d+) batches of 2 x 512, 0 workers", done.stdout)
    assert found, done.stdout
    assert int(found.group(1).replace(",", "")) > 0 and int(found.group(2)) >= 2
    resumed = re.search(r"resume after (\d+) of one reader's batches: first batch in ([\d.]+) s from lengths.npy, "
                        r"([\d.]+) s by re-reading \(from lengths.npy: ([\d.]+)x the time\)", done.stdout)
    assert resumed and int(resumed.group(1)) == int(found.group(2)) // 4, done.stdout
    lengths, reread, ratio = map(float, resumed.groups()[1:])
    assert ratio == pytest.approx(lengths / reread, rel=0.3, abs=0.05)  # (the times are printed rounded to 0.01 s)


def test_bench_stream_names_the_resume_path_of_shards_in_subfolders(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_stream import write_synthetic

    (tmp_path / "build").mkdir()
    write_synthetic(tmp_path / "build", 40_000)  # given as its parent folder, as training takes it
    command = [sys.executable, str(ROOT / "benchmarks/bench_stream.py"), "--shards", str(tmp_path), "--seq-len", "512",
               "--batch-size", "2", "--workers", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0 and re.search(r"first batch in [\d.]+ s from lengths.npy\n", done.stdout), done.stdout


def test_bench_train_refuses_sizes_without_a_batch_each():
    """zip() measured only the sizes that had a batch, and the missing rows went unnoticed."""
    for sizes, batches in ((["tiny", "300m"], ["2"]), (["tiny"], ["2", "4"])):  # a batch too few, a batch too many
        command = [sys.executable, str(ROOT / "benchmarks/bench_train.py"), "--gpu", "--device", "cpu", "--sizes",
                   *sizes, "--batches", *batches]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.splitlines()[-1].endswith(
            f"error: --batches: {len(batches)} value(s) for {len(sizes)} --sizes; give one per size")


def test_bench_plan_reports_time_and_memory_per_file_against_the_bare_listing():
    command = [sys.executable, str(ROOT / "benchmarks/bench_plan.py"), "--files", "3000"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"bare listing: [\d.]+ s, \d+ B per file held \(3,000 files\)", done.stdout), done.stdout
    assert re.search(r"plan: [\d.]+ s \([\d.]+x the bare listing\), \d+ B per file held \([\d.]+x the listing's "
                     r"paths\), peak \d+ B per file", done.stdout), done.stdout


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_the_cpu_comparisons_behind_benchmarks_md_run_small(tmp_path):
    """bench_train's and bench_generate's comparisons with transformers, the import memory and the probe's photos:
    no test ran them, so they could rot unseen (review 47 #9, #10)."""
    done = _bench("benchmarks/bench_train.py", "--threads", "1", "--steps", "1", "--repeats", "1", "--seq", "32", "--batch", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"transformers LlamaForCausalLM +[\d,]+ tokens/s +\(1\.00x transformers\)", done.stdout)
    done = _bench("benchmarks/bench_generate.py", "--repeats", "1", "--tokens-per-image", "16")
    assert done.returncode == 0 and "tokens identical" in done.stdout, done.stderr[-2000:]
    done = _bench("benchmarks/bench_load.py", "--size", "tiny", "--shard", "1MB")
    assert done.returncode == 0 and re.search(r"loaded as float32: weights [\d.]+ GB, peak resident growth", done.stdout)
    done = _bench("benchmarks/probe_textures.py", "--out", str(tmp_path), "--train", "2", "--val", "1")
    assert done.returncode == 0 and len(list(tmp_path.glob("*/*/*.png"))) == 3 * 3


def test_a_flag_of_the_other_mode_is_refused_not_ignored():
    """`--json` outside GPU or throughput mode wrote nothing, silently (review 47 #11)."""
    done = _bench("benchmarks/bench_generate.py", "--json", "x.json", "--repeats", "1")
    assert done.returncode == 2 and done.stderr.splitlines()[-1].endswith("error: --json: not used in compare mode")
    done = _bench("benchmarks/bench_train.py", "--gpu", "--batch", "2")
    assert done.returncode == 2 and done.stderr.splitlines()[-1].endswith("error: --batch: not used in GPU mode")


def test_bench_sync_compares_one_pass_with_an_fsync_per_file(tmp_path):
    done = _bench("benchmarks/bench_sync.py", "--files", "20", "--out", str(tmp_path))
    assert done.returncode == 0 and re.search(r"20 files of 20 KB: fsync per file [\d.]+ ms/file; one pass before the "
                                              r"marker [\d.]+ ms/file \([\d.]+x faster\)", done.stdout), done.stderr
    assert not any(tmp_path.iterdir())
