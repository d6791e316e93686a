"""`python -m lvm.probe`: per-layer attentive and linear probes on an LVM's frozen features.

    python -m lvm.probe --model M --tokenizer T --train DIR --val DIR --out OUT [--layers 0.25,0.5,0.75,1.0]

`--train`/`--val`: ImageFolder layouts (a subfolder per class) or webdataset shards with a label field.
Writes OUT/report.json, OUT/report.md and OUT/accuracy_vs_depth.png; tokens and features are cached in
OUT/cache/ and reused by reruns. See docs/inference.md. Exit codes: 0 done, 2 bad input or options.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import tokenizer
import weights
from common.errors import exit_on, warn
from common.files import output_folder, spec_holding
from common.options import (
    HelpFormatter,
    add_device_arg,
    add_dtype_arg,
    add_model_arg,
    add_tokenizer_arg,
    at_least,
    default_workers,
    parse_seed,
    torch_dtype,
)
from lvm.checkpoint import check_codebook, check_tokenizer, load_lvm
from lvm.probe import ProbeError, data, features, heads, report
from lvm.probe.cache import Cache, module_fingerprint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lvm.probe", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_model_arg(p, weights.DEFAULT_MODEL)
    add_tokenizer_arg(p, weights.DEFAULT_TOKENIZER)
    p.add_argument("--train", nargs="+", required=True, metavar="SRC",
                   help="class folders' parent (ImageFolder), or tar shards / folders / brace patterns of them")
    p.add_argument("--val", nargs="+", required=True, metavar="SRC", help="as --train; its classes must be train's")
    p.add_argument("--out", type=Path, required=True, help="folder for the report, plot and cache/ (created)")
    p.add_argument("--layers", default="0.25,0.5,0.75,1.0",
                   help="depths to probe: fractions of the layer count (with a decimal point) or block counts "
                        "(integers; 0 = token embeddings)")
    p.add_argument("--label-field", default="label", help="json field of a tar sample that holds its class")
    p.add_argument("--batch-size", type=at_least(1), default=64, help="images per tokenizer and LVM forward call")
    p.add_argument("--workers", type=at_least(0), default=default_workers(), help="image decoding processes")
    p.add_argument("--epochs", type=at_least(1), default=heads.Training.epochs, help="most epochs per probe (early stopping)")
    p.add_argument("--lr", type=float, default=heads.Training.lr, help="AdamW learning rate of the probes")
    p.add_argument("--seed", type=parse_seed, default=0, help="seed of the holdout split, probe initialisation and order")
    add_device_arg(p)
    add_dtype_arg(p)
    return p.parse_args(argv)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    """Tokenize, extract features, train and score the probes, write the report; returns it."""
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ProbeError("--lr", f"must be positive, got {args.lr}")
    if spec := spec_holding(args.out, [*args.train, *args.val]):
        raise ProbeError(args.out, f"--out is inside the input folder {spec}; a rerun would read its plot as an image "
                                   "of a new class: choose an --out outside the inputs")
    output_folder(args.out, "--out", ProbeError)
    settings = heads.Training(epochs=args.epochs, lr=args.lr, seed=args.seed)
    device = torch.device(args.device)
    tok = tokenizer.load(args.tokenizer, device=device)
    model = load_lvm(args.model, device=device, dtype=torch_dtype(args.dtype, args.device))
    check_codebook(model, tok.codebook_size, args.tokenizer)
    check_tokenizer(model, args.model, tok.identity(args.tokenizer))
    if tok.tokens_per_image + model.cfg.prefix_len > model.cfg.max_seq_len:
        raise ProbeError(args.model, f"context of {model.cfg.max_seq_len} tokens cannot hold one image "
                                     f"({tok.tokens_per_image} tokens)")
    depths = features.resolve_depths(args.layers, model.cfg.n_layers)
    cache = Cache(args.out / "cache")
    tok_fingerprint = module_fingerprint(tok, tok.config.to_dict())
    splits = {name: data.read_split(name, getattr(args, name), tok, tok_fingerprint, cache, args.label_field,
                                    args.batch_size, args.workers) for name in ("train", "val")}
    classes, y_train, y_val = data.class_indices(splits["train"], splits["val"], "--val")
    seen_in_training = {codes.tobytes() for codes in splits["train"].tokens}
    if shared := sum(codes.tobytes() in seen_in_training for codes in splits["val"].tokens):
        warn(f"{shared} of the {len(y_val)} --val images have the tokens of a --train image (the same "
             "images in both splits?): their scores measure memory, not features")
    _log(f"probe: {len(y_train)} train / {len(y_val)} val images in {len(classes)} classes; depths {depths} "
         f"of {model.cfg.n_layers} on {device}")
    model_fingerprint = module_fingerprint(model, model.cfg.to_dict())
    feats = {name: features.cached_features(model, model_fingerprint, name, split.tokens, depths, cache, args.batch_size)
             for name, split in splits.items()}
    results = []
    for depth in depths:
        row = {"depth": depth}
        for kind in report.PROBES:
            start = time.perf_counter()
            result = heads.run_probe(kind, feats["train"][depth], y_train, feats["val"][depth], y_val,
                                     len(classes), model.cfg.n_heads, settings, device)
            row[kind] = dataclasses.asdict(result)
            _log(f"depth {depth}/{model.cfg.n_layers} {kind}: val top-1 {result.top1:.3f} (holdout "
                 f"{result.holdout_top1:.3f} at epoch {result.best_epoch} of {result.epochs}; "
                 f"{time.perf_counter() - start:.1f}s)")
        results.append(row)
    val_counts = Counter(splits["val"].labels)
    out = {
        "model": str(args.model),
        "tokenizer": str(args.tokenizer),
        "n_layers": model.cfg.n_layers,
        "dim": model.cfg.dim,
        "tokens_per_image": tok.tokens_per_image,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "val_shared_with_train": shared,  # val images with a train image's tokens: scores of memory, not features
        "classes": classes,
        "chance": 1 / len(classes),
        "majority": max(val_counts.values()) / len(y_val),
        "counts": {name: dict(Counter(split.labels)) for name, split in splits.items()},
        "skipped": {name: dict(split.skipped) for name, split in splits.items()},
        "training": dataclasses.asdict(settings),
        "results": results,
    }
    report.write(out, args.out)
    return out


@exit_on
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    best = {kind: max(result["results"], key=lambda row: row[kind]["top1"]) for kind in report.PROBES}
    images, skipped = (sum(sum(c.values()) for c in result[key].values()) for key in ("counts", "skipped"))
    print(report.markdown(result))
    print(f"probe: {images} images ({skipped} skipped), "
          f"{len(result['classes'])} classes, chance {result['chance']:.3f}; best attentive "
          f"{best['attentive']['attentive']['top1']:.3f} at depth {best['attentive']['depth']}, best linear "
          f"{best['linear']['linear']['top1']:.3f} at depth {best['linear']['depth']}; wrote {args.out}")


if __name__ == "__main__":
    main()
