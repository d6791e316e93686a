"""`python -m lvm.prompt`: show the model a few images and let it continue.

    python -m lvm.prompt --frames seq/*.png          # the released LVM-7B and tokenizer -> prediction.png
    python -m lvm.prompt --frames seq/*.png --model M --tokenizer T --out pred.png
    python -m lvm.prompt --frames seq/ --num-frames 8 ... --out rollout.png      # video rollout + GIF
    python -m lvm.prompt --pairs a.png a_ann.png b.png b_ann.png c.png ...       # analogy: c -> c'
    python -m lvm.prompt --frames clips/*/ --candidates 4 ...                     # batched prompts

`--frames` takes image files (one prompt, naturally sorted: 2.png before 10.png)
or directories (one prompt each). `--pairs` keeps the order given. See docs/inference.md.
`predict_frames` is the importable core.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

import tokenizer
import weights
from common.errors import UserError, exit_on, warn
from common.files import IMAGE_SUFFIXES, atomic_write, natural_key, output_file
from common.options import (
    HelpFormatter,
    add_device_arg,
    add_dtype_arg,
    add_model_arg,
    add_tokenizer_arg,
    at_least,
    parse_seed,
    torch_dtype,
)
from lvm import metrics
from lvm.checkpoint import check_codebook, check_tokenizer, load_lvm
from lvm.generate import GREEDY, Sampling, context_frames, rollout, too_small_for_one_frame
from lvm.model import LVM
from lvm.tokenize.sources import VIDEO_SUFFIXES
from tokenizer.preprocess import UNREADABLE_IMAGE, to_rgb_float

CHUNK = 16  # images per tokenizer call


class PromptError(UserError):
    """Bad prompt input: `PromptError(file or option, problem)`."""


def _in_order(path: Path) -> tuple:
    """Frames in natural order, folder by folder: `s1/*.png s2/*.png` is the first clip, then the second."""
    return natural_key(str(path.parent)), natural_key(path)


def resolve_prompts(paths: list[str], option: str, sort: bool) -> list[list[Path]]:
    """Files -> one prompt (naturally sorted, folder by folder, if `sort`); directories -> one prompt per directory
    (not where the order is the user's: `sort` False, an analogy's pairs)."""
    items = [Path(p) for p in paths]
    for p in items:
        if not p.exists():
            raise PromptError(p, "no such file or directory")
    if not sort and any(p.is_dir() for p in items):
        raise PromptError(option, "give the image files in their order (a folder would be read in name order, which "
                                  "may put an annotation before its image)")
    if all(p.is_dir() for p in items):
        prompts = []
        for d in items:
            # hidden files are no frames (a `.thumb.png`, macOS's `._f1.png`), as lvm.tokenize skips them
            frames = sorted((f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")),
                            key=natural_key)
            if not frames:
                raise PromptError(d, f"no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            prompts.append(frames)
        return prompts
    if any(p.is_dir() for p in items):
        raise PromptError(option, "give either image files (one prompt) or directories (one prompt each), not both")
    return [sorted(items, key=_in_order) if sort else items]


def read_image(path: Path) -> Image.Image:
    """An image file decoded and turned as its EXIF orientation says, in its own mode: the tokenizer converts it as
    `lvm.tokenize` does (`to_rgb_float`: 16-bit scaled, not rounded to 8 bits; alpha composited over white), so a
    prompt frame gets the codes its file got in training. Checked here, so a bad file fails before the model loads."""
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:  # an animated GIF, WebP or TIFF: one still would be read
                raise PromptError(path, f"holds {image.n_frames} frames: give its frames as image files (e.g. "
                                        "`ffmpeg -i clip.gif frames/%04d.png`, then --frames frames/)")
            turned = ImageOps.exif_transpose(image)  # a decoded copy, also when nothing turns
        to_rgb_float(turned)
    except UNREADABLE_IMAGE as e:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            raise PromptError(path, "a video: prompts are image files; give its frames (e.g. "
                              "`ffmpeg -i clip.mp4 -vf fps=4 frames/%04d.png`, then --frames frames/)") from e
        raise PromptError(path, f"not a readable image ({e})") from e
    return turned


def check_fits(model: LVM, tok: tokenizer.VQTokenizer, num_frames: int, option: str) -> None:
    """Refuse prompts longer than the context, saying how many frames would fit."""
    fit = context_frames(model, tok.tokens_per_image)
    if fit < 1:
        raise PromptError("--tokenizer", too_small_for_one_frame(model, tok.tokens_per_image))
    if num_frames > fit:
        raise PromptError(
            option,
            f"{num_frames} frames given, but at most {fit} fit as context (model context "
            f"{model.cfg.max_seq_len} tokens, {tok.tokens_per_image} tokens per image, one frame left to generate)",
        )


def predict_frames(
    model: LVM,
    tok: tokenizer.VQTokenizer,
    prompts: list[list[Image.Image]],
    num_frames: int = 1,
    candidates: int = 1,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    compile: bool = False,
) -> torch.Tensor:
    """Continue each prompt (equal frame counts) by `num_frames` frames, `candidates` samples each.
    Returns uint8 images [P, candidates, num_frames, 3, S, S]."""
    P, F, T = len(prompts), len(prompts[0]), tok.tokens_per_image
    if len({len(prompt) for prompt in prompts}) > 1:  # one batch of equal rows: prompts are never padded
        raise ValueError(f"prompts of {sorted({len(prompt) for prompt in prompts})} frames: give equal frame counts")
    flat = [image for prompt in prompts for image in prompt]
    # The VQGAN's activations at full resolution are large: encode and decode a chunk at a time.
    frames = torch.cat([tok.encode(flat[i : i + CHUNK]) for i in range(0, len(flat), CHUNK)])
    frames = frames.to(model.head.weight.device).view(P, 1, F, T).expand(P, candidates, F, T).reshape(-1, F, T)
    generator = torch.Generator(frames.device).manual_seed(seed)
    new = rollout(model, frames, num_frames, sampling, tok.codebook_size, generator, compile).reshape(-1, T)
    images = torch.cat([tok.decode(new[i : i + CHUNK]).cpu() for i in range(0, len(new), CHUNK)])
    return images.view(P, candidates, num_frames, *images.shape[1:])


def grid(rows: list[list[list[Image.Image]]], size: int, pad: int = 2, gap: int = 12) -> Image.Image:
    """Rows of sections (context | prediction | ground truth), tiles `size` square, sections `gap` apart."""
    widths = [len(section) * (size + pad) for section in rows[0]]
    sheet = Image.new("RGB", (sum(widths) + gap * (len(widths) - 1), len(rows) * (size + pad)), "white")
    for r, row in enumerate(rows):
        x = 0
        for section, width in zip(row, widths):
            for i, tile in enumerate(section):
                sheet.paste(tile.resize((size, size), Image.BICUBIC), (x + i * (size + pad), r * (size + pad)))
            x += width + gap
    return sheet


def output_path(out: Path, index: tuple[int, int, int], counts: tuple[int, int, int], suffix: str | None = None) -> Path:
    """`out` itself for a single image, else `<stem>_p<prompt>_c<candidate>_f<frame>` with only the parts that vary;
    images keep the suffix of `out` (`.png` in any case)."""
    suffix = suffix or out.suffix
    parts = [f"{tag}{i}" for tag, i, n in zip("pcf", index, counts) if n > 1 and i >= 0]
    return out.with_name("_".join([out.stem, *parts]) + suffix) if parts else out.with_suffix(suffix)


def _number(low: float, high: float, what: str, open_low: bool = False) -> Callable[[str], float]:
    """An argparse type for a real number in [low, high] ((low, high] with `open_low`): a usage error, not a
    message after every image has been decoded."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not (low < value <= high if open_low else low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = "number"
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lvm.prompt", description="Continue visual prompts.", formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--frames", nargs="+", help="one prompt's frames (natural order), or directories (a prompt each)")
    src.add_argument("--pairs", nargs="+", help="analogy prompt in order: a a' [b b' ...] query")
    add_model_arg(p, weights.DEFAULT_MODEL)
    add_tokenizer_arg(p, weights.DEFAULT_TOKENIZER)
    p.add_argument("--out", default=Path("prediction.png"), type=Path,
                   help="output PNG (default: prediction.png here); more images get _p/_c/_f suffixes")
    p.add_argument("--num-frames", type=at_least(1), default=1, help="frames to generate; the context slides over the last 15, or what fits the model")
    p.add_argument("--candidates", type=at_least(1), default=1, help="samples per prompt")
    p.add_argument("--ground-truth", nargs="+", help="true next frames (files, or directories matching --frames)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-k/top-p)")
    p.add_argument("--temperature", type=_number(0.0, math.inf, "a finite number >= 0"), default=1.0,
                   help="softmax temperature of sampling; 0 is greedy")
    p.add_argument("--top-k", type=at_least(0), default=50, help="sample among the k likeliest codes; 0 disables")
    p.add_argument("--top-p", type=_number(0.0, 1.0, "in (0, 1]", open_low=True), default=1.0,
                   help="sample among the likeliest codes holding this much probability (nucleus); 1 disables")
    p.add_argument("--seed", type=parse_seed, default=0, help="of the sampling generator: the same seed, prompts and candidates give the same frames")
    add_device_arg(p)
    add_dtype_arg(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """Check every input, then continue the prompts and write the predictions, their grid and GIFs."""
    if args.out.is_dir():
        raise PromptError(args.out, "--out is a folder; give a file name")
    if args.out.suffix.lower() != ".png":  # before output_file makes its folder
        raise PromptError("--out", f"give a .png file name (the grid and GIF are named after it), got {args.out}")
    output_file(args.out, "--out")  # its folder made and writable, before any work
    option = "--frames" if args.frames else "--pairs"
    prompts = resolve_prompts(args.frames or args.pairs, option, sort=bool(args.frames))
    if args.pairs and (len(prompts[0]) % 2 == 0 or len(prompts[0]) < 3):
        raise PromptError("--pairs", f"needs example pairs then one query image (an odd count, at least 3), got "
                          f"{len(prompts[0])}")
    if args.pairs and args.num_frames != 1:
        raise PromptError("--num-frames", f"an analogy has one answer, got {args.num_frames} (for frames use --frames)")
    if len({len(p) for p in prompts}) > 1:
        raise PromptError(option, f"batched prompts need equal frame counts, got {[len(p) for p in prompts]}")
    truth = resolve_prompts(args.ground_truth, "--ground-truth", sort=True) if args.ground_truth else None
    if truth and (len(truth) != len(prompts) or any(len(t) != args.num_frames for t in truth)):
        raise PromptError("--ground-truth", f"need {args.num_frames} frame(s) for each of the {len(prompts)} prompt(s)")
    folders = [Path(f) for f in (args.frames or args.pairs) + (args.ground_truth or []) if Path(f).is_dir()]
    check_outputs_spare_inputs(args.out, (len(prompts), args.candidates, args.num_frames), prompts + (truth or []),
                               folders)
    images = [[read_image(f) for f in prompt] for prompt in prompts]
    truth_images = [[read_image(f) for f in frames] for frames in truth] if truth else None
    sampling = GREEDY if args.greedy else Sampling(args.temperature, args.top_k or None, args.top_p)
    if args.candidates > 1 and sampling.temperature == 0:
        raise PromptError("--candidates", f"{args.candidates} greedy candidates would be {args.candidates} copies of "
                                          "one; sample (no --greedy, --temperature above 0) or give one")

    tok = tokenizer.load(args.tokenizer, device=args.device)
    model = load_lvm(args.model, device=args.device, dtype=torch_dtype(args.dtype, args.device))
    check_codebook(model, tok.codebook_size, args.tokenizer)
    check_tokenizer(model, args.model, tok.identity(args.tokenizer))
    check_fits(model, tok, len(images[0]), option)

    start = time.perf_counter()
    preds = predict_frames(model, tok, images, args.num_frames, args.candidates, sampling, args.seed, args.compile)
    seconds = time.perf_counter() - start
    # Context and truth are shown, and scored, as the tokenizer sees them (cropped, if it crops), beside predictions.
    context_seen = [[to_pil_image(image) for image in tok.seen(prompt)] for prompt in images]
    truth_seen = [[to_pil_image(image) for image in tok.seen(frames)] for frames in truth_images] if truth_images else None
    written = write_outputs(args.out, context_seen, preds, truth_seen, tok.image_size)
    P, C, N = preds.shape[:3]
    print(
        f"{P * C * N} frame(s) ({P} prompt(s) x {C} candidate(s) x {N}) in {seconds:.1f}s end to end (encode, "
        f"generate, decode): {seconds / N:.2f}s per frame step, {P * C * N * tok.tokens_per_image / seconds:.0f} tokens/s"
    )
    print("wrote " + ", ".join(map(str, written)))
    if any(f.parent.resolve() == args.out.resolve().parent for files in prompts for f in files):
        warn(f"the outputs lie beside the prompt images: a rerun over their folder (`{args.out.parent}/*.png`) "
             "would read them as frames")
    if truth_seen:
        mse = ground_truth_mse(preds, truth_seen)
        psnr = metrics.psnr(mse.mean())  # of the mean MSE: finite even if one frame is exact (as in lvm.evaluate)
        print(f"vs ground truth: MSE {mse.mean():.4f}, PSNR {psnr:.2f} dB (over {mse.numel()})")


def ground_truth_mse(preds: torch.Tensor, truth: list[list[Image.Image]]) -> torch.Tensor:
    """Per-image MSE of predictions [P, C, N, 3, S, S] against each prompt's true frames as the tokenizer sees them
    (`VQTokenizer.seen`, S x S)."""
    target = torch.stack([torch.stack([pil_to_tensor(t) for t in f]) for f in truth])
    return metrics.pixel_mse(preds.flatten(0, 2), target[:, None].expand_as(preds).flatten(0, 2))


def grid_path(out: Path) -> Path:
    """Where the grid of prompts and predictions goes: `<out stem>_grid` beside `out`."""
    return out.with_name(f"{out.stem}_grid{out.suffix}")


def check_outputs_spare_inputs(
    out: Path, counts: tuple[int, int, int], inputs: list[list[Path]], folders: list[Path]
) -> None:
    """Refuse an --out whose files would replace an input image (the prompt would be lost), or land in a folder
    given as a prompt: a rerun with the same folder would read the last run's prediction and grid as frames. (Beside
    image files given one by one, `--frames seq/*.png`, `run` warns once the outputs are written.)"""
    for folder in folders:
        if folder.resolve() == out.resolve().parent:
            raise PromptError("--out", f"would write into the prompt folder {folder}, whose images are all read as "
                                       "frames; write elsewhere")
    P, C, N = counts
    planned = [output_path(out, (p, c, f), counts) for p in range(P) for c in range(C) for f in range(N)]
    planned += [output_path(out, (p, c, -1), counts, ".gif") for p in range(P) for c in range(C) if N > 1]
    planned.append(grid_path(out))
    given = {Path(f).resolve(): f for files in inputs for f in files}
    for path in planned:
        if path.resolve() in given:
            raise PromptError("--out", f"would overwrite the input image {given[path.resolve()]}; write elsewhere")


def write_outputs(
    out: Path,
    context: list[list[Image.Image]],
    preds: torch.Tensor,
    truth: list[list[Image.Image]] | None,
    size: int,
) -> list[Path]:
    """Predicted PNGs, one grid PNG (a row per prompt and candidate), and a GIF per rollout; returns their paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    P, C, N = preds.shape[:3]
    rows, written = [], []
    for p in range(P):
        for c in range(C):
            frames = [to_pil_image(preds[p, c, f]) for f in range(N)]
            for f, image in enumerate(frames):
                written.append(output_path(out, (p, c, f), (P, C, N)))
                _save(image, written[-1])
            if N > 1:
                shown = [image.resize((size, size), Image.BICUBIC) for image in context[p]] + frames
                written.append(output_path(out, (p, c, -1), (P, C, N), ".gif"))
                _save(shown[0], written[-1], save_all=True, append_images=shown[1:], duration=250, loop=0)
            rows.append([context[p], frames, *([truth[p]] if truth else [])])
    written.append(grid_path(out))
    _save(grid(rows, size), written[-1])
    return written


def _save(image: Image.Image, path: Path, **options) -> None:
    """Written whole or not at all (`atomic_write`): a killed run or a full disk leaves no cut image under the name."""
    with atomic_write(path) as file:
        image.save(file, format=path.suffix.lstrip(".").upper(), **options)


@exit_on
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
