"""The learning check on a test budget: the model must learn to use visual context, on any CPU.

Token shards of synthetic "clips" (as `lvm.tokenize` writes them for video) go through the real
pipeline: `sentences.build` makes video sentences, the LVM trains through `LVMDataModule` on the WSD
schedule, and `lvm.evaluate` scores held-out clips. Each clip cuts between two shots, A B A B ..., every
shot drawing its tokens from the clip's own small palette (8 of 256 codes in use) and changing 30% of
them each time it comes back. A frame is therefore predictable from the frame two before it, barely
from the one before it (the other shot, same palette) and not at all without context: perplexity must
fall far from 1 to 4+ context frames and from 0 to 8. A model could also get there by counting which codes
the clip uses, in any order; the control rules that out: with the 8 context frames in reverse order (the
frame two back is then the other shot), perplexity must rise at least 3x. Only a model that reads its
context in order (two frames back) passes both. `make demo` makes the same checks on real video
(demo_out/report/summary.md).

Spread across seeds (600 steps, 1 thread; seed of the model and the data order; data fixed), last-frame
perplexity of the 16 held-out clips with k context frames:

| seed | k=0 | k=1 | k=4 | k=5..7 | k=8 | ppl(4)/ppl(1) | ppl(8)/ppl(0) | k=8, reversed | reversed / in order |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| 0 | 387.8 | 340.8 | 69.1 | 68.0..68.3 | 68.2 | 0.203 | 0.176 | 656.6 | 9.6x |
| 1 | 274.2 | 264.3 | 89.0 | 88.0..89.2 | 89.3 | 0.337 | 0.326 | 655.7 | 7.3x |
| 2 | 724.9 | 793.9 | 190.8 | 190.5 | 190.5 | 0.240 | 0.263 | 1470.0 | 7.7x |
| 3 | 949.6 | 625.3 | 68.4 | 64.2..68.5 | 62.8 | 0.109 | 0.066 | 801.2 | 12.8x |
| 4 | 1427.0 | 1038.0 | 73.3 | 73.3..73.4 | 73.4 | 0.071 | 0.051 | 1110.2 | 15.1x |

Thresholds: ppl(4..8) <= 0.75 ppl(1) and ppl(8) <= 0.5 ppl(0) (issue 12). Across the seeds
ppl(4)/ppl(1) is 0.07..0.34 (mean 0.19): the fall, 1 - 0.19 = 0.81, is 3.0x the spread 0.27 (the worst
seed's fall, 0.66, is 2.5x), and the worst seed is still 2.2x below the 0.75 threshold; ppl(8)/ppl(0)
is at most 0.33 against 0.5. Float differences between CPUs (last bits, amplified by training) change
the run like a change of seed does, so the check holds on any CPU with that margin. The control's rise is
7.3x..15.1x against its threshold of 3x (the worst seed 2.4x above it). Measured with `learn(tmp_path, seed)`
below on an Intel Xeon (AVX-512), 2026-12-02; the k=5..7 and reversed columns on an Intel Xeon (family 6
model 207, AVX-512 + AMX), 2026-12-06, whose k=0/1/4/8 figures equal the first machine's to the printed digit.

The same on an AMD EPYC (family 25 model 1, AVX2 only), 2026-12-07 (`learn(tmp_path, seed)`, one thread, two seeds at
a time): other models, as the other kernels make them, within the same spread.

| seed | k=0 | k=1 | k=4 | k=5..7 | k=8 | ppl(4)/ppl(1) | ppl(8)/ppl(0) | k=8, reversed | reversed / in order |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| 0 | 271.9 | 249.1 | 49.5 | 48.8..49.2 | 48.5 | 0.199 | 0.178 | 708.3 | 14.6x |
| 1 | 459.8 | 443.4 | 48.7 | 49.5..50.4 | 49.9 | 0.110 | 0.109 | 618.4 | 12.4x |
| 2 | 328.5 | 327.7 | 110.9 | 110.6..110.9 | 110.6 | 0.338 | 0.337 | 1028.1 | 9.3x |
| 3 | 394.0 | 325.1 | 70.7 | 69.9..71.5 | 70.4 | 0.217 | 0.179 | 607.8 | 8.6x |
| 4 | 990.8 | 576.9 | 108.0 | 108.0..108.1 | 108.0 | 0.187 | 0.109 | 673.9 | 6.2x |

There ppl(4)/ppl(1) is 0.11..0.34 (mean 0.21; the fall, 0.79, is 3.5x the spread 0.23), ppl(8)/ppl(0) at most 0.34
and the control's rise 6.2x..14.6x: every threshold holds with the margins above.

And on an AMD EPYC (family 25 model 17, AVX-512), 2026-12-07, measured the same way:

| seed | k=0 | k=1 | k=4 | k=5..7 | k=8 | ppl(4)/ppl(1) | ppl(8)/ppl(0) | k=8, reversed | reversed / in order |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| 0 | 417.6 | 364.0 | 52.4 | 51.3..52.7 | 51.5 | 0.144 | 0.123 | 638.1 | 12.4x |
| 1 | 513.8 | 435.6 | 59.4 | 57.8..62.9 | 63.4 | 0.136 | 0.123 | 717.3 | 11.3x |
| 2 | 864.9 | 529.4 | 105.0 | 105.0..105.0 | 105.0 | 0.198 | 0.121 | 1393.4 | 13.3x |
| 3 | 263.3 | 252.9 | 82.9 | 83.3..84.0 | 82.7 | 0.328 | 0.314 | 955.6 | 11.6x |
| 4 | 834.0 | 533.8 | 74.8 | 76.4..78.1 | 78.3 | 0.140 | 0.094 | 671.5 | 8.6x |

There ppl(4)/ppl(1) is 0.14..0.33 (mean 0.19; the fall, 0.81, is 4.2x the spread 0.19), ppl(8)/ppl(0) at most 0.31
and the control's rise 8.6x..13.3x.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
import yaml

from common.vocab import CODEBOOK_SIZE
from lvm.data import LVMDataModule
from lvm.evaluate import Sentence, perplexity_vs_context, read_sentences, unigram_perplexity
from lvm.train import LVMModule
from sentences.build import build
from sentences.spec import load_spec

TOKENS_PER_IMAGE = 4  # short "images": the copying that context enables is learned in few steps
PALETTE, FRAMES, CHANGED = 8, 16, 0.3
CODES = np.arange(0, 8192, 32)  # 256 codes in use, as a real tokenizer uses part of its codebook


def write_clips(path: Path, clips: int, seed: int) -> None:
    """A token shard of `clips` two-shot clips in the tokenize step's video layout."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as tar:
        for c in range(clips):
            palette = rng.choice(CODES, PALETTE, replace=False)
            shots = [rng.choice(palette, TOKENS_PER_IMAGE) for _ in range(2)]
            for i in range(FRAMES):
                frame = shots[i % 2]
                tar.write({"__key__": f"clip{seed}_{c}/{i:06d}", "tokens.npy": frame.astype(np.uint16),
                           "json": json.dumps({"video": f"clip{seed}_{c}", "frame": i}).encode()})
                change = rng.random(TOKENS_PER_IMAGE) < CHANGED
                shots[i % 2] = np.where(change, rng.choice(palette, TOKENS_PER_IMAGE), frame)


def video_sentences(tokens: Path, out: Path, seed: int, epochs: int) -> Path:
    spec = {"seed": seed, "window": 16 * TOKENS_PER_IMAGE,
            "sources": [{"name": "clips", "kind": "video", "shards": str(tokens), "strides": [1], "epochs": epochs}]}
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(spec))
    build(load_spec(out.parent / f"{out.name}.yaml"), out)
    return out


def learn(tmp_path: Path, seed: int) -> tuple[list[float], dict[int, float], float, float]:
    """Train on the clips with `seed`; return the training losses, the held-out curve, the unigram, and the
    held-out perplexity with 8 context frames in reverse order (the control)."""
    write_clips(tmp_path / "tokens" / "train" / "000000.tar", clips=5000, seed=0)
    write_clips(tmp_path / "tokens" / "heldout" / "000000.tar", clips=16, seed=1)
    train = video_sentences(tmp_path / "tokens" / "train", tmp_path / "train", seed=0, epochs=1)
    heldout = video_sentences(tmp_path / "tokens" / "heldout", tmp_path / "heldout", seed=1, epochs=1)

    L.seed_everything(seed)
    module = LVMModule(overrides=dict(dim=64, mlp_dim=128, n_layers=2, n_heads=2, max_seq_len=160),
                       lr=3e-3, min_lr=3e-4, warmup_steps=20, schedule="wsd")
    data = LVMDataModule(str(train), seq_len=132, batch_size=8, num_workers=0, seed=seed)
    trainer = L.Trainer(accelerator="cpu", max_steps=600, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    losses = []
    module.on_train_batch_end = lambda outputs, *_: losses.append(float(outputs["loss"]))
    trainer.fit(module, data)

    sentences, _ = read_sentences(sorted(heldout.glob("*.tar")), TOKENS_PER_IMAGE, None)
    model = module.model.eval()
    curve = {k: v["mean_perplexity"] for k, v in perplexity_vs_context(model, sentences, max_frames=8).items()}
    reversed_context = [Sentence(s.key, s.kind, torch.cat([s.images[-9:-1].flip(0), s.images[-1:]])) for s in sentences]
    reversed_8 = perplexity_vs_context(model, reversed_context, max_frames=8)[8]["mean_perplexity"]
    return losses, curve, unigram_perplexity(sentences, CODEBOOK_SIZE)["mean_perplexity"], reversed_8


def test_model_learns_to_use_context(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest"])
    losses, curve, unigram, reversed_8 = learn(tmp_path, seed=0)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, f"training loss did not fall enough: {first:.2f} -> {last:.2f}"
    assert max(curve[k] for k in range(4, 9)) <= 0.75 * curve[1], f"perplexity does not fall from 1 to 4+ frames: {curve}"
    assert curve[8] <= 0.5 * curve[0], f"8 context frames do not halve the no-context perplexity: {curve}"
    assert curve[8] < 0.5 * unigram, f"perplexity with 8 frames {curve[8]:.1f} not far below unigram {unigram:.1f}"
    assert reversed_8 >= 3 * curve[8], f"context read without its order: reversed {reversed_8:.1f} vs {curve[8]:.1f}"
