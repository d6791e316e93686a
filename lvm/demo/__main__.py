"""`python -m lvm.demo`: the whole pipeline in miniature, on real photos and video, on a CPU.

Runs the same commands a user runs at scale, one after another, each printed before it
runs and logged to demo_out/logs/<step>.log, then writes the report (demo_out/report/).
Every step is an ordinary command: copy one from the log to swap in your own data.
Each run starts by removing demo_out/ (in the working directory).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import yaml

from common.errors import UserError, exit_on
from common.options import HelpFormatter, parse_seed
from lvm.demo import report
from lvm.demo.data import analogy_files

OUT = Path("demo_out")
CONFIGS = resources.files("lvm.demo") / "configs"  # package data, so installed copies find them too
TOKENIZER = OUT / "vqgan" / "checkpoints" / "last.ckpt"
LVM = OUT / "lvm" / "checkpoints" / "last.ckpt"
WINDOW = 1024  # 16 images of 64 tokens: the longest sentence the miniature builds


def sentence_specs(seed: int) -> dict[str, dict]:
    """The training mixture (video, colorization, inpainting, edges) and the held-out video and analogy sentences."""
    tokens = OUT / "tokens"
    train = {
        "seed": seed,
        "window": WINDOW,
        "sentences_per_shard": 200,
        "sources": [
            {"name": "video", "kind": "video", "shards": str(tokens / "video_train"), "strides": [1, 2, 3], "epochs": 20},
            {"name": "video-views", "kind": "video", "shards": str(tokens / "video_views"), "strides": [1, 2, 3], "epochs": 20},
            {"name": "photo-pans", "kind": "video", "shards": str(tokens / "video_pans"), "strides": [1], "epochs": 6},
            {"name": "stills", "kind": "video", "shards": str(tokens / "video_stills"), "strides": [1], "epochs": 4},
            # example pairs from crops of one photo (its folder): the answer can be read from the examples. (Pairs
            # of video frames, grouped by clip, read like video that jumps: they made next-frame prediction worse.)
            {"name": "photo-color", "kind": "colorization", "shards": str(tokens / "photos_train"), "group_by": "folder", "epochs": 6},
            {"name": "photo-inpaint", "kind": "inpainting", "shards": str(tokens / "photos_train"), "group_by": "folder", "epochs": 6},
            {"name": "photo-edges", "kind": "pairs", "shards": str(tokens / "photos_train"),
             "annotations": {"edges": str(tokens / "photos_edges")}, "pairs": 8, "group_by": "folder", "epochs": 6},
        ],
    }
    heldout = {
        "seed": seed + 1,
        "window": WINDOW,
        "sources": [
            # every 16-frame window of the held-out tails once (random starts drew some twice)
            {"name": "video-heldout", "kind": "video", "shards": str(tokens / "video_heldout"), "strides": [1], "starts": "every"},
            {"name": "color-heldout", "kind": "colorization", "shards": str(tokens / "crops_heldout"), "group_by": "folder", "epochs": 4},
            {"name": "inpaint-heldout", "kind": "inpainting", "shards": str(tokens / "crops_heldout"), "group_by": "folder", "epochs": 4},
            {"name": "edges-heldout", "kind": "pairs", "shards": str(tokens / "crops_heldout"),
             "annotations": {"edges": str(tokens / "crops_heldout_edges")}, "pairs": 8, "group_by": "folder", "epochs": 4},
        ],
    }
    return {"train": train, "heldout": heldout}


def commands(seed: int) -> list[tuple[str, list[str]]]:
    """(step name, argv) in order; `python` and `lightning` are this environment's."""
    py, lightning = [sys.executable], [str(Path(sys.executable).parent / "lightning")]
    data, tokens, prompts, rep = OUT / "data", OUT / "tokens", OUT / "data" / "prompts", OUT / "report"
    # --workers 0: on 2 cores, decoding these small frames inline and giving both cores to the encoder
    # tokenizes ~1.6x faster than a decoding worker beside a 1-thread encoder.
    tokenize = py + ["-m", "lvm.tokenize", "--tokenizer", str(TOKENIZER), "--workers", "0"]
    annotate = py + ["-m", "lvm.annotate", "--tasks", "edges", "--workers", "0"]
    steps = [
        ("data", py + ["-m", "lvm.demo.data", "--out", str(data), "--seed", str(seed)]),
        ("tokenizer", lightning + ["fit", "-c", str(CONFIGS / "vqgan.yaml"), "--seed_everything", str(seed)]),
        ("tokenizer-eval", py + ["-m", "tokenizer.evaluate", "--tokenizer", str(TOKENIZER), "--images", str(data / "prompts" / "video"), "--json", str(rep / "tokenizer.json")]),
        ("tokenize-video-train", tokenize + ["--shards", str(data / "video" / "train"), "--out", str(tokens / "video_train")]),
        ("tokenize-video-views", tokenize + ["--shards", str(data / "video" / "train_views"), "--out", str(tokens / "video_views")]),
        ("tokenize-photo-pans", tokenize + ["--shards", str(data / "video" / "train_pans"), "--out", str(tokens / "video_pans")]),
        ("tokenize-stills", tokenize + ["--shards", str(data / "video" / "train_stills"), "--out", str(tokens / "video_stills")]),
        ("tokenize-video-heldout", tokenize + ["--shards", str(data / "video" / "heldout"), "--out", str(tokens / "video_heldout")]),
        ("tokenize-photos", tokenize + ["--shards", str(data / "images" / "train" / "photos"), "--out", str(tokens / "photos_train"), "--derive", "gray,masked"]),
        ("tokenize-crops-heldout", tokenize + ["--shards", str(data / "images" / "heldout" / "crops"), "--out", str(tokens / "crops_heldout"), "--derive", "gray,masked"]),
        # Canny edge maps keyed like their photos (no weights needed), for edges `pairs` sentences
        ("annotate-edges", annotate + ["--images", str(data / "images" / "train" / "photos"), "--out", str(data / "annot")]),
        ("tokenize-edges", tokenize + ["--shards", str(data / "annot" / "edges"), "--out", str(tokens / "photos_edges")]),
        ("annotate-edges-heldout", annotate + ["--images", str(data / "images" / "heldout" / "crops"), "--out", str(data / "annot_heldout")]),
        ("tokenize-edges-heldout", tokenize + ["--shards", str(data / "annot_heldout" / "edges"), "--out", str(tokens / "crops_heldout_edges")]),
        ("sentences-train", py + ["-m", "sentences.build", "--spec", str(OUT / "specs" / "train.yaml"), "--out", str(OUT / "sentences" / "train")]),
        ("sentences-heldout", py + ["-m", "sentences.build", "--spec", str(OUT / "specs" / "heldout.yaml"), "--out", str(OUT / "sentences" / "heldout")]),
        ("lvm", lightning + ["fit", "-c", str(CONFIGS / "lvm.yaml"), "--seed_everything", str(seed), "--data.seed", str(seed)]),
        ("evaluate", py + ["-m", "lvm.evaluate", "--model", str(LVM), "--sentences", str(OUT / "sentences" / "heldout"), "--tokenizer", str(TOKENIZER), "--out", str(rep / "evaluate")]),
        ("prompt-video", py + ["-m", "lvm.prompt", "--model", str(LVM), "--tokenizer", str(TOKENIZER), "--greedy",
                               "--frames", str(prompts / "video" / "bikes" / "context"),
                               "--ground-truth", str(prompts / "video" / "bikes" / "truth"), "--num-frames", "4", "--out", str(rep / "video_bikes.png")]),
        ("prompt-inpainting", py + ["-m", "lvm.prompt", "--model", str(LVM), "--tokenizer", str(TOKENIZER), "--greedy",
                                    "--pairs", *map(str, analogy_files(prompts / "inpainting" / "chelsea")),
                                    "--ground-truth", str(prompts / "inpainting" / "chelsea" / "truth.png"), "--out", str(rep / "inpainting_chelsea.png")]),
    ]
    return steps


def run_step(name: str, argv: list[str], logs: Path) -> float:
    """Run one command, its output to logs/<name>.log; on failure show the log's tail and stop."""
    print(f"[{name}] {' '.join(argv)}", flush=True)
    start = time.time()
    log = logs / f"{name}.log"
    with log.open("w") as f:
        code = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT)
    elapsed = time.time() - start
    if code:
        tail = log.read_text().splitlines()[-20:]
        print("\n".join(tail), file=sys.stderr)
        sys.exit(f"error: step {name} failed (exit {code}); full log: {log}")
    last = next((line for line in reversed(log.read_text().splitlines()) if line.strip()), "")
    print(f"[{name}] done in {elapsed:.0f} s: {last[:160]}", flush=True)
    return elapsed


@exit_on
def main(argv: list[str] | None = None) -> None:
    # Every path is fixed (demo_out/ in the working directory) so the printed commands can be copied as they
    # are; the seed is the one choice: every random draw of every step follows from it.
    parser = argparse.ArgumentParser(prog="python -m lvm.demo", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--seed", type=parse_seed, default=0, help="seed of the data, the sentences and both trainings")
    args = parser.parse_args(argv)
    if OUT.exists() and not OUT.is_dir():
        raise UserError(OUT, "is a file; the demo writes its outputs into a folder of that name (move the file)")
    if OUT.exists():
        shutil.rmtree(OUT)  # the miniature always starts from scratch
    logs, specs = OUT / "logs", OUT / "specs"
    for folder in (logs, specs, OUT / "report"):
        folder.mkdir(parents=True)
    for name, spec in sentence_specs(args.seed).items():
        (specs / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    start = time.time()
    timings = {name: run_step(name, argv, logs) for name, argv in commands(args.seed)}
    summary = report.write(OUT, timings, args.seed)
    print(f"demo finished in {(time.time() - start) / 60:.1f} min: report at {summary}")


if __name__ == "__main__":
    main()
