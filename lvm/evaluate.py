"""`python -m lvm.evaluate`: how good is an LVM, with baselines that give the numbers meaning.

    python -m lvm.evaluate --model M --sentences val/ --tokenizer T --out eval/
    python -m lvm.evaluate --sentences val/ --out eval/      # the released LVM-7B and its tokenizer

Reads sentence shards (docs/FORMATS.md) and reports, as the release does:
- perplexity of each sentence's last image given the images before it (as many as
  fit the context), over that image's tokens with a log-softmax over the whole
  vocabulary: the mean of per-example perplexities and exp(mean NLL), overall and
  by sentence kind;
- for video sentences, the last frame's perplexity against 0..15 context frames
  (0: the frame after BOS alone, what the model knows without context), and its NLL
  per token with 1, 2 and 8 frames split into tokens that keep the previous frame's
  code and tokens that change (which of them the context helps);
- for pairs sentences (pairs, colorization, inpainting: [x1, y1, ..., xn, yn]), the
  answer's perplexity against 0..7 example pairs before the query, the paper's
  measure of in-context analogy (table + PNG plot per kind);
- baselines: the unigram perplexity of each kind's targets under code frequencies counted on
  that kind's sentences (a context-free model fitted on the evaluation set: optimistic) and, with a tokenizer,
  the pixel MSE of copying the last context frame, beside the model's own greedy
  next-frame MSE/PSNR (both against the tokenizer's decoding of the true tokens).
The functions are importable (`read_sentences`, `target_nlls`, `target_token_nlls`, `perplexity_by_kind`,
`perplexity_vs_context`, `context_gain_by_token`, `perplexity_vs_pairs`, `unigram_perplexity`, `unigram_by_kind`,
`pixel_metrics`).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import tokenizer
import weights
from common.errors import UserError, exit_on, warn
from common.files import expand_shards, json_text, output_folder, write_atomic
from common.options import (
    HelpFormatter,
    add_device_arg,
    add_dtype_arg,
    add_model_arg,
    add_tokenizer_arg,
    at_least,
    torch_dtype,
)
from common.vocab import BOS_ID, CODEBOOK_SIZE, EOS_ID
from lvm import metrics
from lvm.checkpoint import check_codebook, check_tokenizer, describe, load_lvm, tokenizer_mismatch, trained_layout
from lvm.generate import GREEDY, MAX_CONTEXT_FRAMES, context_frames, rollout, too_small_for_one_frame
from lvm.model import LVM
from sentences import formats

PAIR_KINDS = ("pairs", "colorization", "inpainting")  # sentences [x1, y1, ..., xn, yn] (sentences/kinds.py)
MAX_EXAMPLE_PAIRS = 7  # the release's 8-pair sentences: 7 examples, then the query and its answer


class EvaluationError(UserError):
    """Unusable evaluation input: `EvaluationError(path, problem)`."""


@dataclass
class Sentence:
    """One evaluation sentence: its key, its json's kind, and its images' codes."""

    key: str
    kind: str
    images: torch.Tensor  # [n_images, tokens_per_image] code ids, int16 where the codebook allows (a quarter of int64)


def read_sentences(
    shards: list[str | Path], tokens_per_image: int, limit: int | None = None, codebook_size: int = CODEBOOK_SIZE
) -> tuple[list[Sentence], Counter]:
    """Sentences with at least two images from sentence shards (read with `sentences.formats`), and a count
    of skipped items by reason; a sentence holding a code the tokenizer's `codebook_size` codes cannot give
    (tokenized with another tokenizer) is skipped."""
    skipped: Counter = Counter()
    sentences = []
    for shard in shards:
        for key, tokens, info in formats.read_sentences(str(shard), skipped):
            sentence = _parse(key, tokens, info, tokens_per_image, codebook_size, skipped)
            if sentence is not None:
                sentences.append(sentence)
                if len(sentences) == limit:
                    return sentences, skipped
    return sentences, skipped


def _parse(key: str, tokens: np.ndarray, info: bytes | None, T: int, codebook_size: int, skipped: Counter) -> Sentence | None:
    """A sentence of whole images, [BOS, k x T codes, EOS] with k >= 2, and its kind (from its json)."""
    if info is None:
        skipped["missing tokens.npy or json"] += 1
        return None
    try:
        kind = str(json.loads(info).get("kind", "unknown"))
    except (ValueError, AttributeError) as e:
        skipped[f"undecodable member ({type(e).__name__})"] += 1
        return None
    if len(tokens) < 2 or tokens[0] != BOS_ID or tokens[-1] != EOS_ID or (len(tokens) - 2) % T:
        skipped[f"not [BOS, k x {T} tokens, EOS]"] += 1
        return None
    images = tokens[1:-1].reshape(-1, T)
    if len(images) < 2 or images.max() >= codebook_size:
        skipped["fewer than 2 images" if len(images) < 2 else f"codes past the tokenizer's {codebook_size}"] += 1
        return None
    return Sentence(key, kind, torch.from_numpy(images.astype(np.int16 if codebook_size <= 2**15 else np.int32)))


def _batches(items: list[torch.Tensor], batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices, stacked batch) over items grouped by shape, so every batch is one dense tensor."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[tuple(item.shape)].append(i)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            yield chunk, torch.stack([items[i] for i in chunk]).long()


Scores = dict[tuple[int, int], torch.Tensor]
"""Per-token NLLs [T] (float32) already computed, by (id of the Sentence, context images): figures that score the same
sentence at the same context (the headline and the curves' longest context, the curve and the token split) share
them instead of scoring it again."""


@torch.inference_mode()
def target_token_nlls(
    model: LVM, sentences: list[Sentence], num_context: int | None = None, batch_size: int = 8, progress: bool = False,
    scores: Scores | None = None,
) -> torch.Tensor:
    """NLL [N, T] (nats) of each token of the last image given the `num_context` images before it
    (default: all that fit the model's context); BOS is prepended when the model uses one. With `scores`, what it
    holds is reused and what is computed is added."""
    T = sentences[0].images.shape[1]
    fit = context_frames(model, T)
    if fit < 1:
        raise ValueError(too_small_for_one_frame(model, T))
    k = fit if num_context is None else num_context
    if k == 0 and not model.cfg.prefix_len:
        raise ValueError("num_context 0 scores the frame after BOS alone, and this model has no BOS")
    scores = {} if scores is None else scores
    keys = [(id(s), min(k, fit, len(s.images) - 1)) for s in sentences]
    todo = [i for i, key in enumerate(keys) if key not in scores]
    frames = [sentences[i].images[-1 - keys[i][1] :] for i in todo]
    device = model.head.weight.device
    bar = tqdm(total=len(todo), desc="perplexity", unit="sentence", disable=not progress)
    for indices, batch in _batches(frames, batch_size):
        tokens = model.with_bos(batch.flatten(1).to(device))
        logits = model(tokens[:, :-1])[:, -T:].float()  # the target's last token is never an input
        # [B*T, V] rows, not the [B, V, T] view: cross-entropy over a strided class dimension is a few e-6 off
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, -T:].flatten(), reduction="none")
        for i, row in zip(indices, nll.view(len(indices), T).cpu()):
            scores[keys[todo[i]]] = row  # float32 as computed: the cache of a large set holds half the bytes
        bar.update(len(indices))
    bar.close()
    return torch.stack([scores[key] for key in keys]).double()  # summed in float64


def target_nlls(
    model: LVM, sentences: list[Sentence], num_context: int | None = None, batch_size: int = 8, progress: bool = False,
    scores: Scores | None = None,
) -> torch.Tensor:
    """Per-sentence mean NLL [N] (nats) of the last image: `target_token_nlls` averaged over its tokens."""
    return target_token_nlls(model, sentences, num_context, batch_size, progress, scores).mean(1)


def perplexity_by_kind(
    model: LVM, sentences: list[Sentence], batch_size: int = 8, progress: bool = False, scores: Scores | None = None
) -> dict:
    """{"all": summary, kind: summary, ...} of the last image's perplexity given all context that fits."""
    nlls = target_nlls(model, sentences, batch_size=batch_size, progress=progress, scores=scores)
    kinds = [s.kind for s in sentences]
    report = {"all": metrics.perplexities(nlls)}
    for kind in sorted(set(kinds)):
        report[kind] = metrics.perplexities(nlls[[k == kind for k in kinds]])
    return report


def _perplexity_curve(
    model: LVM, sentences: list[Sentence], contexts: dict[int, int], batch_size: int, desc: str | None,
    scores: Scores | None,
) -> dict[int, dict]:
    """{x: perplexity summary of each sentence's last image given the `contexts[x]` images before it}."""
    return {x: metrics.perplexities(target_nlls(model, sentences, k, batch_size, scores=scores))
            for x, k in tqdm(contexts.items(), desc=desc, disable=desc is None)}


def perplexity_vs_context(
    model: LVM,
    sentences: list[Sentence],
    max_frames: int = MAX_CONTEXT_FRAMES,
    batch_size: int = 8,
    progress: bool = False,
    scores: Scores | None = None,
) -> dict[int, dict]:
    """Last-frame perplexity given 0..K context frames, K = min(max_frames, what fits, shortest sentence - 1),
    so every k is measured on the same sentences and the same target frames. k = 0 (the frame after BOS
    alone) is the no-context baseline; it is left out for models without BOS (the released LVM), which
    cannot score an image's first token without a token before it."""
    if not sentences:
        return {}
    K = min(max_frames, context_frames(model, sentences[0].images.shape[1]), min(len(s.images) for s in sentences) - 1)
    ks = range(1 - model.cfg.prefix_len, K + 1)  # k = 0 (BOS alone) needs a BOS
    return _perplexity_curve(model, sentences, {k: k for k in ks}, batch_size, "context frames" if progress else None,
                             scores)


def context_gain_by_token(
    model: LVM, sentences: list[Sentence], contexts: tuple[int, ...] = (1, 2, 8), batch_size: int = 8,
    scores: Scores | None = None,
) -> dict:
    """Where the gain from more context frames comes from: the last frame's mean NLL per token (nats) given
    k frames, split into tokens that keep the previous frame's code at their place and tokens that change.
    Copying needs one frame; telling a flickering place from a stable one needs a place's history; the
    changing tokens need the motion seen. (docs/demo.md: on still-camera footage context helps the first
    two and barely the third.) k is capped at what fits and at the shortest sentence."""
    K = min(context_frames(model, sentences[0].images.shape[1]), min(len(s.images) for s in sentences) - 1)
    stays = torch.stack([s.images[-1] == s.images[-2] for s in sentences])

    def mean(nll: torch.Tensor) -> float | None:
        return nll.mean().item() if nll.numel() else None

    split = {}
    for k in sorted({min(k, K) for k in contexts}):
        nll = target_token_nlls(model, sentences, k, batch_size, scores=scores)
        split[k] = {"stay": mean(nll[stays]), "change": mean(nll[~stays]), "all": nll.mean().item()}
    return {"stay_fraction": stays.double().mean().item(), "nll": split}


def perplexity_vs_pairs(
    model: LVM, sentences: list[Sentence], batch_size: int = 8, progress: bool = False, scores: Scores | None = None
) -> dict[int, dict]:
    """Perplexity of the answer (each pairs sentence's last image) given the query and the n example pairs
    before it, n = 0..K (`pairs_depth`), on the sentences of more than K pairs: the paper's in-context analogy
    measure. Sentences must be [x1, y1, ..., xn, yn]; n = 0 scores the answer given the query alone."""
    if not sentences:
        return {}
    K = pairs_depth(model, sentences)
    deep = [s for s in sentences if len(s.images) // 2 > K]
    return _perplexity_curve(model, deep, {n: 2 * n + 1 for n in range(K + 1)}, batch_size,
                             "example pairs" if progress else None, scores)


def pairs_depth(model: LVM, sentences: list[Sentence]) -> int:
    """K of the analogy curve: at most 7 example pairs (the release's 8-pair sentences), what the context fits, and
    fewer than at least half the sentences hold. A builder ends each pass and each `group_by` group with a shorter
    sentence; taken from the shortest, one 1-pair leftover cut the whole curve to n = 0."""
    held = sorted(len(s.images) // 2 for s in sentences)
    return min(MAX_EXAMPLE_PAIRS, (context_frames(model, sentences[0].images.shape[1]) - 1) // 2, held[len(held) // 2] - 1)


def unigram_perplexity(sentences: list[Sentence], codebook_size: int) -> dict:
    """Perplexity of each last image under code frequencies counted over all images of these sentences (add-one
    smoothed over the tokenizer's `codebook_size` codes, the ones that can occur): the score of a model that
    ignores context, fitted on the evaluation sentences themselves (optimistic)."""
    counts = torch.ones(codebook_size, dtype=torch.float64)
    for s in sentences:
        counts += torch.bincount(s.images.flatten(), minlength=codebook_size).double()
    logp = (counts / counts.sum()).log()
    return metrics.perplexities(torch.stack([-logp[s.images[-1].long()].mean() for s in sentences]))


def unigram_by_kind(sentences: list[Sentence], codebook_size: int) -> dict:
    """{"all": summary, kind: summary, ...}: `unigram_perplexity` fitted on each kind's sentences alone, the baseline
    of that kind's figures (video codes and analogy answers follow different frequencies)."""
    kinds = sorted({s.kind for s in sentences})
    return {"all": unigram_perplexity(sentences, codebook_size),
            **{kind: unigram_perplexity([s for s in sentences if s.kind == kind], codebook_size) for kind in kinds}}


@torch.inference_mode()
def pixel_metrics(
    model: LVM, tok: tokenizer.VQTokenizer, sentences: list[Sentence], batch_size: int = 8
) -> dict[str, float]:
    """Greedy next-frame MSE/PSNR of the model and of copying the last context frame, both against the
    tokenizer's decoding of the true last frame (the best any token model can reach), on [0, 1] pixels.
    PSNR is that of the mean MSE: a mean of per-frame PSNRs is +inf as soon as one prediction is exact,
    which the copy often is on video that holds a frame."""
    fit = context_frames(model, tok.tokens_per_image)
    device = model.head.weight.device
    contexts = [s.images[-1 - min(fit, len(s.images) - 1) : -1] for s in sentences]
    model_mse, copy_mse = (torch.empty(len(sentences), dtype=torch.float64) for _ in range(2))
    for indices, frames in _batches(contexts, batch_size):
        predicted = rollout(model, frames.to(device), 1, GREEDY, tok.codebook_size)[:, 0]
        truth = tok.decode(torch.stack([sentences[i].images[-1] for i in indices]).long())
        model_mse[indices] = metrics.pixel_mse(tok.decode(predicted), truth).cpu()
        copy_mse[indices] = metrics.pixel_mse(tok.decode(frames[:, -1]), truth).cpu()
    return {
        "count": len(sentences),
        "model_mse": model_mse.mean().item(),
        "model_psnr": metrics.psnr(model_mse.mean()).item(),
        "copy_last_mse": copy_mse.mean().item(),
        "copy_last_psnr": metrics.psnr(copy_mse.mean()).item(),
    }


def plot_curve(curve: dict[int, dict], unigram: float, path: Path, xlabel: str, title: str) -> None:
    """Perplexity (mean per-example and exp(mean NLL)) against the amount of context, with the unigram line."""
    from lvm.plots import new_figure, save_figure  # matplotlib only where a plot is made

    ks = list(curve)
    fig, ax = new_figure((6, 4))
    ax.plot(ks, [curve[k]["mean_perplexity"] for k in ks], "o-", label="mean per-example perplexity")
    ax.plot(ks, [curve[k]["perplexity_of_mean_nll"] for k in ks], "s--", label="exp(mean NLL)")
    ax.axhline(unigram, color="gray", linestyle=":", label="unigram baseline")
    ax.set(xlabel=xlabel, ylabel="perplexity (log scale)", title=title, xticks=ks, yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def markdown(report: dict) -> str:
    """report.md (also printed): the tables of report.json."""
    def row(name: str, s: dict, *extra: str) -> str:
        return f"| {name} | {s['count']} | {s['mean_perplexity']:.2f} | {s['perplexity_of_mean_nll']:.2f} |" + \
            "".join(f" {x} |" for x in extra)

    head = "| {} | sentences | mean per-example perplexity | exp(mean NLL) |\n| --- | ---: | ---: | ---: |"
    unigram = report["unigram"]
    lines = [f"# Evaluation of {report['model']}", "",
             f"{report['sentences']} sentences, {report['tokens_per_image']} tokens per image; "
             f"skipped: {report['skipped'] or 'none'}", "",
             "## Perplexity of the last image given the images before it", "",
             "| kind | sentences | mean per-example perplexity | exp(mean NLL) | unigram baseline (mean per-example) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [row(k, s, f"{unigram[k]['mean_perplexity']:.2f}") for k, s in report["perplexity"].items()]
    lines += ["", "Unigram baseline: each kind's last images under code frequencies counted on all images of that kind's "
              "sentences (add-one smoothed over the tokenizer's codes): a model that ignores context, fitted on the "
              "evaluation set itself, so optimistic."]
    if report["vs_context"]:
        lines += ["", "## Video: last-frame perplexity against context frames", "", head.format("context frames")]
        lines += [row(str(k), s) for k, s in report["vs_context"].items()]
    elif "sequence" in report["perplexity"]:
        lines += ["", "No context curve: it reads `kind: video` sentences, and these frames are `sequence` ones; build "
                  "held-out frame folders as a `video` source for it."]
    if report.get("context_gain"):
        gain = report["context_gain"]
        stay = gain["stay_fraction"]

        def nats(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        lines += ["", "## Video: which tokens the context helps (mean NLL per token of the last frame, nats)", "",
                  f"| context frames | tokens that keep the previous frame's code ({stay:.0%}) "
                  f"| tokens that change ({1 - stay:.0%}) | all |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {k} | {nats(s['stay'])} | {nats(s['change'])} | {nats(s['all'])} |" for k, s in gain["nll"].items()]
    for kind, curve in report.get("vs_pairs", {}).items():
        lines += ["", f"## {kind}: answer perplexity against example pairs before the query", "",
                  head.format("example pairs")]
        lines += [row(str(n), s) for n, s in curve.items()]
        if left := report.get("vs_pairs_left_out", {}).get(kind):
            lines += ["", "Left out of this table: " + ", ".join(f"{n} {kind} sentences {why}" for why, n in left.items())
                      + "."]
    for kind, left in report.get("vs_pairs_left_out", {}).items():
        if kind not in report.get("vs_pairs", {}):  # nothing left to draw a curve from
            lines += ["", f"No {kind} curve: " + ", ".join(f"{n} sentences {why}" for why, n in left.items()) + "."]
    if report.get("pixels"):
        p = report["pixels"]
        lines += ["", f"## Last-image pixels (greedy, the first {p['count']} sentences of any kind, vs decoded true "
                  "tokens)", "", "| predictor | MSE | PSNR (dB) |", "| --- | ---: | ---: |",
                  f"| model | {p['model_mse']:.4f} | {p['model_psnr']:.2f} |",
                  f"| copy the image before (video: the last frame; pairs: the query) | {p['copy_last_mse']:.4f} | "
                  f"{p['copy_last_psnr']:.2f} |"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lvm.evaluate", description="Perplexity and pixel metrics of an LVM.", formatter_class=HelpFormatter)
    add_model_arg(p, weights.DEFAULT_MODEL)
    p.add_argument("--sentences", required=True, nargs="+",
                   help="sentence shards: folders, globs or brace patterns ('sent/sentences-{000000..000009}.tar')")
    p.add_argument("--out", required=True, type=Path, help="directory for report.json, report.md and the plot")
    add_tokenizer_arg(p, None, f"the released {weights.DEFAULT_TOKENIZER} for the released LVM-7B, else none; "
                               "a tokenizer enables pixel metrics and sets tokens per image")
    p.add_argument("--tokens-per-image", type=at_least(1),
                   help="used when no tokenizer is loaded and the model records none (default: 256)")
    p.add_argument("--max-sentences", type=at_least(1), help="evaluate the first N readable sentences")
    p.add_argument("--pixel-sentences", type=at_least(0), default=16, help="sentences to generate for pixel metrics")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="sentences per forward pass")
    add_device_arg(p)
    add_dtype_arg(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Load, check and score; write report.json, report.md and the plots into --out; return the report."""
    output_folder(args.out, "--out", EvaluationError)
    shards = expand_shards(args.sentences)
    # As training does, before any model loads: a build that has not finished or lost shards is refused, and its
    # tokenizer is the one that matters for perplexity (another's tokens score in the hundred thousands, unexplained).
    formats.check_folders_whole(args.sentences, shards)
    made_by = formats.sentences_tokenizer(shards)
    spec = args.tokenizer
    tok = tokenizer.load(spec, device=args.device) if spec else None  # before the model: a typo costs no model load
    model = load_lvm(args.model, device=args.device, dtype=torch_dtype(args.dtype, args.device))
    trained = model.tokenizer_info or {}
    if tok is None and trained.get("name") == weights.DEFAULT_TOKENIZER:  # the release's, which it names
        spec = weights.DEFAULT_TOKENIZER
        tok = tokenizer.load(spec, device=args.device)
    if tok:
        check_codebook(model, tok.codebook_size, spec)  # a codebook larger than the model's code ids, as prompt and probe refuse
        check_tokenizer(model, args.model, tok.identity(spec))
    if made_by and tokenizer_mismatch(model.tokenizer_info, made_by):
        warn(f"{args.sentences[0]}: sentences made by tokenizer {describe(made_by)}, not the one {args.model} was "
             f"trained on, {describe(model.tokenizer_info)}: their perplexities measure tokens it never learnt")
    elif made_by and tok and tokenizer_mismatch(made_by, tok.identity(spec)):  # decoding them for the pixel figures
        warn(f"{args.sentences[0]}: sentences made by tokenizer {describe(made_by)}, not by {describe(tok.identity(spec))}: "
             "the pixel figures decode them with the wrong tokenizer")
    recorded = trained.get("tokens_per_image")
    if args.tokens_per_image and recorded and args.tokens_per_image != recorded:
        raise EvaluationError("--tokens-per-image", f"{args.tokens_per_image}, but the model was trained on "
                              f"{recorded} tokens per image ({trained.get('name')}); leave it out")
    if tok and args.tokens_per_image and args.tokens_per_image != tok.tokens_per_image:
        raise EvaluationError("--tokens-per-image", f"{args.tokens_per_image}, but the tokenizer {spec} gives "
                              f"{tok.tokens_per_image} tokens per image; leave it out")
    T = tok.tokens_per_image if tok else args.tokens_per_image or trained_layout(model)[0]
    if context_frames(model, T) < 1:
        raise EvaluationError(spec or "--tokens-per-image", too_small_for_one_frame(model, T))
    codebook_size = tok.codebook_size if tok else trained_layout(model)[1]
    sentences, skipped = read_sentences(shards, T, args.max_sentences, codebook_size)
    if not sentences:
        hint = (f"; sentences are BOS, images of {T} tokens, EOS, as python -m sentences.build makes them from the "
                "model's tokenizer (token shards of lvm.tokenize are not sentences)"
                if f"not [BOS, k x {T} tokens, EOS]" in skipped else "")
        raise EvaluationError(args.sentences[0], f"no usable sentences (skipped: {dict(skipped) or 'none'}){hint}")
    video = [s for s in sentences if s.kind == "video"]
    pairs, left_out = {}, {}
    for kind in PAIR_KINDS:
        found = [s for s in sentences if s.kind == kind]
        even = [s for s in found if len(s.images) % 2 == 0]
        reasons = Counter({"of odd length (not [x1, y1, ..., xn, yn])": len(found) - len(even)})
        if even:
            pairs[kind], depth = even, pairs_depth(model, even)
            reasons[f"of fewer than {depth + 1} pairs (most have more)"] = sum(len(s.images) // 2 <= depth for s in even)
        if +reasons:
            left_out[kind] = dict(+reasons)
    scores: Scores = {}  # each sentence scored once per context length, whichever figures read it
    report = {
        "model": str(args.model),
        "sentences": len(sentences),
        "tokens_per_image": T,
        "skipped": dict(skipped),
        "perplexity": perplexity_by_kind(model, sentences, args.batch_size, progress=True, scores=scores),
        "unigram": unigram_by_kind(sentences, codebook_size),
        "vs_context": perplexity_vs_context(model, video, batch_size=args.batch_size, progress=True, scores=scores),
        "context_gain": context_gain_by_token(model, video, batch_size=args.batch_size, scores=scores) if video else None,
        "vs_pairs": {kind: perplexity_vs_pairs(model, found, batch_size=args.batch_size, progress=True, scores=scores)
                     for kind, found in pairs.items() if found},
        "vs_pairs_left_out": left_out,  # by kind and reason: pairs sentences the analogy curves do not score
    }
    if tok and args.pixel_sentences:
        report["pixels"] = pixel_metrics(model, tok, sentences[: args.pixel_sentences], args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "report.json", json_text(report))
    write_atomic(args.out / "report.md", markdown(report))
    unigram, name = report["unigram"], Path(args.model).name
    if report["vs_context"]:
        plot_curve(report["vs_context"], unigram["video"]["mean_perplexity"], args.out / "perplexity_vs_context.png",
                   "context frames", f"{name}: video, last frame")
    for kind, curve in report["vs_pairs"].items():
        plot_curve(curve, unigram[kind]["mean_perplexity"], args.out / f"perplexity_vs_pairs_{kind}.png",
                   "example pairs before the query", f"{name}: {kind}, answer image")
    return report


@exit_on
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print(markdown(report))
    all_ = report["perplexity"]["all"]
    print(f"evaluated {all_['count']} sentences: perplexity {all_['mean_perplexity']:.2f} "
          f"(unigram {report['unigram']['all']['mean_perplexity']:.2f}); wrote {args.out}")


if __name__ == "__main__":
    main()
