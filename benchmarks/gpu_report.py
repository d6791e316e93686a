"""Collects what benchmarks/gpu.sh measured into OUT/gpu.json and a markdown table OUT/gpu.md.

    python benchmarks/gpu_report.py OUT [--dry-run]

Reads OUT/stages.tsv (stage, status, seconds) and each stage's JSON (written by the benchmark scripts'
`--json`) and pytest's junit XML. Every figure keeps its reference from the same run (FLOP limit, encoder
only, device peak, bandwidth floor), as BENCHMARKS.md requires.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from common.options import HelpFormatter

GOALS = {"mfu_1b": 0.5, "seconds_per_frame_batch1": 0.2}  # issue 15's goals


def _read(path: Path) -> dict | None:
    """A stage's JSON; None when it wrote none, or a file cut short (a stage killed while writing)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def _pytest(path: Path) -> dict | None:
    """Counts of pytest's junit XML and the ids of the tests that failed (the XML is whole when tests fail)."""
    if not path.is_file():
        return None
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def collect(out: Path, dry_run: bool) -> dict:
    """Each stage's status and result: a result where the stage finished (`ok`), the rows it wrote before its time
    limit cut it (`timeout`: the benchmarks write their JSON after every row), and the GPU tests' counts and failures
    however they ended. GPU tests that all skipped on a GPU run (a driver torch cannot use) are no `ok`."""
    if not (out / "stages.tsv").is_file():
        raise SystemExit(f"error: {out / 'stages.tsv'}: not found (run benchmarks/gpu.sh first)")
    stages = {}
    for line in (out / "stages.tsv").read_text().splitlines():
        name, status, seconds = line.split("\t")
        result = _pytest(out / f"{name}.xml") if name == "pytest_gpu" else _read(out / f"{name}.json")
        if name == "pytest_gpu" and status == "ok" and not dry_run and not (result and result["passed"]):
            status = "no GPU test ran"
        kept = status == "ok" or (status == "timeout" and result is not None) or name == "pytest_gpu"
        stages[name] = {"status": status, "seconds": int(seconds), "result": result if kept else None}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    return {
        "machine": device,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "dry_run": dry_run,
        "goals": GOALS,
        "stages": stages,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    """(figure, command, value, reference, ratio) for each figure measured."""
    stages, table = report["stages"], []

    def missing(name: str, figure: str, command: str) -> bool:
        stage = stages.get(name)
        if stage and stage["result"] is not None and stage["status"] in ("ok", "timeout"):
            if stage["status"] == "timeout":
                table.append((figure, command, "timeout: the rows below were measured before the time limit", "", ""))
            return False
        table.append((figure, command, stage["status"] if stage else "not run", "", ""))
        return True

    cmd = "`benchmarks/gpu.sh` (`bench_tokenizer_encode.py`)"
    if not missing("encode", "tokenizer encode, released shape, bf16", cmd):
        result = stages["encode"]["result"]
        for row in result["rows"]:
            limit = row["limit_images_per_s"]
            table.append((f"tokenizer encode, batch {row['batch']} ({result['gflop_per_image']:.1f} GFLOP/image)", cmd,
                          f"{row['images_per_s']:,.0f} images/s", f"{limit:,.0f} images/s (FLOP limit)" if limit else "n/a",
                          _pct(row["images_per_s"] / limit) if limit else "n/a"))
    cmd = "`benchmarks/gpu.sh` (`bench_tokenize.py --gpu`)"
    if not missing("tokenize", "tokenize pipeline vs encoder only", cmd):
        r = stages["tokenize"]["result"]
        figure = f"tokenize pipeline, {r['images']} JPEGs of {r['jpeg_side']} px, batch {r['batch_size']}, {r['workers']} workers"
        table.append((figure, cmd, f"{r['pipeline_images_per_s']:,.0f} images/s",
                      f"{r['encoder_only_images_per_s']:,.0f} images/s (encoder only)",
                      _pct(r["pipeline_images_per_s"] / r["encoder_only_images_per_s"])))
    for name in ("train", "train_compiled"):
        cmd = f"`benchmarks/gpu.sh` (`bench_train.py --gpu{' --compile' if name == 'train_compiled' else ''}`)"
        if missing(name, f"training, compile {'on' if name == 'train_compiled' else 'off'}", cmd):
            continue
        result = stages[name]["result"]
        peak = result["peak_flops"]
        for r in result["rows"]:
            how = "FSDP2 + activation checkpointing" if r["sharded"] else "one replica"
            steps = f"batch {r['batch']} x {r.get('accumulate', 1)} micro-batches x seq {r['seq']}"
            table.append((f"train {r['size']}, {steps}, {how}, compile {'on' if r['compile'] else 'off'}",
                          cmd, f"{r['tokens_per_s']:,.0f} tokens/s", f"{peak / 1e12:.0f} TFLOP/s peak" if peak else "n/a",
                          f"MFU {_pct(r['mfu'])}"))
    cmd = "`benchmarks/gpu.sh` (`bench_generate.py --throughput --compile`)"
    if not missing("decode", "decode", cmd):
        result = stages["decode"]["result"]
        for r in result["rows"]:
            table.append((f"decode {result['size']}, batch {r['batch']}, {result['context_frames']} context frames", cmd,
                          f"{r['seconds_per_frame']:.3f} s per frame, {r['images_per_s']:.1f} images/s",
                          f"{r['floor_seconds']:.3f} s per frame (bandwidth floor)",
                          _pct(r["floor_seconds"] / r["seconds_per_frame"])))
    cmd = "`benchmarks/gpu.sh` (`pytest -m gpu`)"
    r = stages.get("pytest_gpu", {}).get("result")
    if r is None:  # no XML: pytest did not start, or was killed before it wrote one
        missing("pytest_gpu", "GPU tests", cmd)
    else:
        failed = f" ({', '.join(r['failed_tests'])})" if r["failed_tests"] else ""
        table.append(("GPU tests", cmd, f"{stages['pytest_gpu']['status']}: {r['passed']} passed, "
                      f"{r['failures'] + r['errors']} failed{failed}, {r['skipped']} skipped", "", ""))
    return table


def markdown(report: dict) -> str:
    head = f"{report['machine']}, {report['date']}, torch {report['torch']}" + (" (dry run: CPU, tiny shapes)" if report["dry_run"] else "")
    lines = [head, "", "| figure | command | value | reference (same run) | ratio |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(report)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("out", type=Path, help="the folder benchmarks/gpu.sh wrote")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    report = collect(args.out, args.dry_run)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "gpu.md").write_text(table)
    print(table, end="")
    print(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")


if __name__ == "__main__":
    main()
