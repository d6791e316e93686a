"""Read a unit's inputs into decoded pictures, or skip records for the inputs that fail.

Runs in DataLoader worker processes. Every failure of a single input (zero-byte file, corrupt or
truncated image, truncated tar, unreadable video) becomes a `Skip` with a reason from `REASONS`,
so the job continues and the report can count it; nothing here raises for bad data.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO, TypeVar

import av
import numpy as np
from PIL import ExifTags, Image, ImageOps
from torch import Tensor
from webdataset.tariterators import base_plus_ext, group_by_keys

from common.files import IMAGE_SUFFIXES, tar_is_complete
from lvm.palette import colour_labels, label_palette
from lvm.tokenize.sources import Item, Unit, safe_key
from tokenizer.preprocess import SIXTEEN_BIT_MODES, to_rgb_float

REASONS = (
    "empty_file",  # a zero-byte image, tar, video or tar member
    "unreadable_file",  # the file cannot be opened or read (permissions, vanished, I/O error)
    "unreadable_folder",  # a folder that cannot be listed (permissions): its files are unknown
    "corrupt_image",  # PIL cannot decode it completely (truncated, garbage, unsupported)
    "not_label_map",  # --label-palette was given but the image has several distinct channels
    "no_image",  # a tar sample with no image member
    "split_sample",  # tar members of a key already read, not adjacent to its first ones (tar --sort=name fixes it)
    "duplicate_key",  # a key already written to this shard (x.jpg and x.png in one folder or tar sample, a repeated tar key)
    "corrupt_tar",  # the tar ends early or is not a tar; the samples before the damage are kept
    "tar_link",  # an image member stored as a hard or symbolic link (tar -h / --hard-dereference stores the file)
    "unreadable_video",  # PyAV cannot open the file or it has no video frames
    "corrupt_video",  # packets that failed to decode (counted in the detail); every other frame is kept
)
_IMAGE_EXTS = tuple(sorted(s[1:] for s in IMAGE_SUFFIXES))  # tar member suffixes, without the dot
_DROPPED_META = frozenset({"exif"})  # bulky source json fields not worth copying into every token sample
MEMBERS_ONLY = frozenset({"split_sample"})
"""Skip reasons that lose members of a sample whose image was read (its json or caption), no image: lvm.tokenize counts
them, lvm.annotate (which reads no json) and lvm.probe (whose unlabelled image counts already) do not."""
_WEBDATASET_META = re.compile(r"__[^/]*__($|/)")  # members webdataset reads as the tar's metadata, not samples
REORDER_FRAMES = 16
"""How far, in frame periods, a frame's time may lie before the latest and still be a late frame of the same
timeline: the most B-frames an encoder reorders (x264 and FFmpeg cap them at 16)."""
_DURATION_TAG = re.compile(r"(?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d(?:\.\d+)?)")
PALETTE = label_palette()
_TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class DecodeOptions:
    """How inputs become pixels."""

    video_stride: int = 1  # keep frames 0, k, 2k, ...
    labels: bool = False  # inputs are single-channel label maps, coloured through the fixed palette
    draft: int | None = None  # decode JPEGs at 1/2, 1/4 or 1/8 scale while both sides stay >= draft px


@dataclass
class Picture:
    """A decoded image as FloatTensor[3, H, W] in [0, 1], not yet resized (label maps already coloured)."""

    key: str
    pixels: Tensor
    meta: dict
    video_file: bool = False  # a frame of a video file (not an image, nor a frame folder's image)


@dataclass
class Skip:
    """An input left out, and why."""

    item: str
    reason: str  # one of REASONS
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}")  # reports and docs list REASONS only


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # PIL names the in-memory stream: <_io.BytesIO object at 0x7f...>


def _detail(error: BaseException) -> str:
    """The error's first line for a report, without memory addresses: reruns write byte-identical reports."""
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return _ADDRESS.sub("", text)[:200]


def to_labels(img: Image.Image) -> np.ndarray | None:
    """A single-channel label image -> label indices uint8 [H, W] (16-bit labels modulo 256).

    Palette ("P") images give their indices, not their colours; an RGB image whose three channels
    are equal counts as single-channel. Returns None for a real colour image.
    """
    if img.mode in ("L", "P", "1"):
        return np.asarray(img, dtype=np.uint8)
    if img.mode in SIXTEEN_BIT_MODES:
        return (np.asarray(img, dtype=np.int64) % 256).astype(np.uint8)
    rgb = np.asarray(img.convert("RGB"))
    if (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 0] == rgb[:, :, 2]).all():
        return np.ascontiguousarray(rgb[:, :, 0])
    return None


def decode_image(data: bytes, name: str, key: str, meta: dict, opts: DecodeOptions) -> Picture | Skip:
    """Decode image bytes completely (truncation is detected here, not later) and orient them as viewers do.

    The json keeps the original size (as displayed), also when `opts.draft` decoded a JPEG smaller.
    """
    if not data:
        return Skip(name, "empty_file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # before draft, which shrinks a JPEG
            if opts.draft and not opts.labels:
                img.draft(None, (opts.draft, opts.draft))  # JPEG DCT scaling; a no-op for other formats
            img.load()
            # Read after load: Pillow's TIFF plugin reports the displayed size, turns the image on load and then
            # drops the tag, so reading it before would swap an already displayed size back.
            if img.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSING:
                width, height = height, width
            img = ImageOps.exif_transpose(img)
            indices = to_labels(img) if opts.labels else None
            if opts.labels and indices is None:
                return Skip(name, "not_label_map", f"mode {img.mode} with distinct channels")
            # The tokenizer's own conversion (16-bit, alpha over white, palette modes): one implementation.
            pixels = to_rgb_float(img if indices is None else colour_labels(indices, PALETTE))
    except Exception as error:  # PIL raises a dozen types for corrupt data (OSError, SyntaxError, ValueError, ...)
        return Skip(name, "corrupt_image", _detail(error))
    return Picture(key, pixels, {**meta, "width": width, "height": height})


def _tar_sample(path: str, sample: dict, opts: DecodeOptions) -> Iterator[Picture | Skip]:
    """A sample's picture, its json and txt merged in; a second image member (`x.jpg` and `x.png`) is a
    `duplicate_key`, as the same pair in a folder is."""
    key = sample["__key__"]
    exts = [e for e in _IMAGE_EXTS if e in sample]
    if not exts:
        dotted = [k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1] in _IMAGE_EXTS]
        why = f" (a member name with a dot: the key ends at the first dot, as in webdataset; name it {key}_" \
              f"{dotted[0].replace('.', '_', dotted[0].count('.') - 1)})" if dotted else ""
        yield Skip(f"{path}:{key}", "no_image", "members: " + _members(sample) + why)
        return
    try:
        source_json = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        source_json = {}
    # Source fields (url, caption, label, ...) stay top-level so builders can group by any of them;
    # ours (source, key, width, height) win a name clash.
    meta = {k: v for k, v in source_json.items() if k not in _DROPPED_META} if isinstance(source_json, dict) else {}
    if "txt" in sample:
        meta.setdefault("caption", sample["txt"].decode("utf-8", "replace"))
    meta.update(source=path, key=key)
    yield decode_image(sample[exts[0]], f"{path}:{key}.{exts[0]}", key, meta, opts)
    for ext in exts[1:]:
        yield Skip(f"{path}:{key}.{ext}", "duplicate_key", f"the sample's {exts[0]} member is used")


def _members(sample: dict) -> str:
    return ",".join(k for k in sample if not k.startswith("__"))


def _split_or_sample(
    path: str, sample: dict, opts: DecodeOptions, seen: set[str], held: dict[str, dict]
) -> Iterator[Picture | Skip]:
    """`_tar_sample`, for samples whose members are not adjacent too: webdataset groups only adjacent members.

    A sample without an image is held back until its key comes again with one (a tar written `tar cf s.tar
    *.json *.jpg`: the jsons first), then merged with it; what is still held when the tar ends is `no_image`
    (`held`, emitted by `read_tar`). Members of a key that come after its image (`*.jpg *.json`) are a
    `split_sample` skip, and a key read twice with an image a `duplicate_key`. `seen`: the keys emitted so far.
    """
    key = sample["__key__"]
    if not any(e in sample for e in _IMAGE_EXTS):
        if key in seen:
            yield Skip(f"{path}:{key}", "split_sample", f"members of sample {key} are not adjacent in the tar "
                       f"({_members(sample)} left out); write it in key order, e.g. tar --sort=name")
        else:
            held[key] = {**held.get(key, {}), **sample}
        return
    seen.add(key)
    yield from _tar_sample(path, {**held.pop(key, {}), **sample}, opts)


def read_tar(path: str, opts: DecodeOptions) -> Iterator[Picture | Skip]:
    """The samples of an img2dataset-layout tar, in tar order; a damaged tar keeps what precedes the damage."""
    try:
        stream = open(path, "rb")
    except OSError as error:
        yield Skip(path, "unreadable_file", _detail(error))
        return
    if os.fstat(stream.fileno()).st_size == 0:
        stream.close()
        yield Skip(path, "empty_file")
        return
    errors: list[BaseException] = []
    repeated: list[BaseException] = []
    links: list[tarfile.TarInfo] = []

    def skip_repeated(error: BaseException) -> bool:  # a member name seen twice in a row: drop it, read on
        repeated.append(error)
        return True

    seen: set[str] = set()  # keys emitted with an image
    held: dict[str, dict] = {}  # samples without an image so far, by key
    with stream:
        members = _tar_members(stream, path, errors, links)
        for sample in group_by_keys(members, keys=base_plus_ext, handler=skip_repeated):
            yield from _split_or_sample(path, sample, opts, seen, held)
    linked = {}  # key -> its image member that is a link
    for link in links:
        key, ext = base_plus_ext(link.name)
        if ext and ext.rsplit(".", 1)[-1] in _IMAGE_EXTS and key not in seen:  # `b.v2.jpg`: ext `v2.jpg`
            linked[key] = link
    for key, link in linked.items():
        kind = "hard" if link.islnk() else "symbolic"
        yield Skip(f"{path}:{link.name}", "tar_link", f"a {kind} link to {link.linkname}: links are not read "
                   "(tar -h / --hard-dereference stores the file)")
    for key, sample in held.items():
        if key not in linked:
            yield from _tar_sample(path, sample, opts)  # no image ever came: `no_image`
    for error in repeated:
        yield Skip(path, "duplicate_key", _detail(error))
    if errors:
        yield Skip(path, "corrupt_tar", _detail(errors[0]))
    elif not tar_is_complete(path):
        yield Skip(path, "corrupt_tar", "cut short between members (no end-of-archive blocks)")


def _tar_members(
    stream: BinaryIO, path: str, errors: list[BaseException], links: list[tarfile.TarInfo]
) -> Iterator[dict]:
    """The complete file members of a tar, as webdataset's tar_file_iterator gives them (its `__name__` metadata
    members left out); read here because that iterator passes link members over without a trace, and an image
    stored as a link (tars of folders deduplicated by `hardlink` or `rdfind`) then vanished from the report.
    Links are recorded in `links`; a stream cannot go back to read their target. Damage ends the stream quietly
    (recorded in `errors`), so that group_by_keys still emits the sample before the damage, which is complete.
    """
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.islnk() or member.issym():
                    links.append(member)
                elif member.isreg() and not _WEBDATASET_META.match(member.name):
                    yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": path}
                tar.members = []  # a stream's TarFile keeps every header read otherwise
    except (tarfile.TarError, OSError, EOFError) as error:
        errors.append(error)


def read_image_file(item: Item, opts: DecodeOptions, dataset: str) -> Picture | Skip:
    """One image of a folder; its json names its relative path and folder so builders can group and pair.

    A numbered frame of a frame folder also gets `video` (`<dataset>/<folder>`, so that equally named folders
    of two roots stay two sequences) and `frame`, the fields the video sentence builders group and order by.
    """
    path, rel = item.path, item.rel
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        return Skip(path, "unreadable_file", _detail(error))
    parent = str(PurePosixPath(rel).parent)
    meta = {"source": path, "key": safe_key(rel), "path": rel, "folder": "" if parent == "." else parent}
    if item.frame is not None:
        meta.update(video=str(PurePosixPath(dataset, meta["folder"])), frame=item.frame)
    return decode_image(data, path, meta["key"], meta, opts)


def read_video(path: str, rel: str, stride: int, dataset: str) -> Iterator[Picture | Skip]:
    """Every `stride`-th frame of a video (frame 0, stride, 2*stride, ...) as RGB, decoded with PyAV.

    Keys come from the relative path (`clip/000008`); the json's `video`, which the sentence builders group
    frames by, is `<dataset>/<relative path>`, so that `ds1/clip.mp4` and `ds2/clip.mp4` stay two videos.
    """
    key = safe_key(rel)
    video = f"{dataset}/{key}"
    try:
        if os.path.getsize(path) == 0:
            yield Skip(path, "empty_file")
            return
        container = av.open(path, metadata_errors="replace")  # a non-UTF-8 title must not stop the job
    except (av.FFmpegError, OSError) as error:
        yield Skip(path, "unreadable_video", _detail(error))
        return
    if not container.streams.video:
        container.close()
        yield Skip(path, "unreadable_video", "no video stream")
        return
    stream = container.streams.video[0]
    # Decoded packet by packet, so that one damaged packet costs its frame, not the rest of the video. Frames are
    # numbered by their presentation time, round((time - start) * fps) from the first frame's: after a damaged
    # packet a B-frame decoder flushes its delayed frames late and out of order, and counting them would renumber
    # them (the sentence builders order frames by number). A number given twice (a concealed frame) keeps its
    # first frame; in a faster stretch of variable-rate video, where two frames round to one number, the later
    # gets the next. Without a time, frames are counted; either way each damaged packet counts as one frame, so the
    # frames after it keep their numbers. (The stream's start time is no anchor: AVI starts B-frame video a frame late.)
    # A time more than REORDER_FRAMES periods before the latest is a discontinuity (MPEG-TS segments joined with
    # `cat`, DVD cells, a 33-bit timestamp wrap), not a late frame: its frames are numbered on after the highest.
    fps = float(stream.average_rate) if stream.average_rate else None
    start = None  # the time of frame 0
    damaged, last, end = [], None, None  # (frame number, error) of each packet that failed; latest frame time, its end
    restarted = False  # the times started again: the recorded duration no longer says where the frames end
    numbers: set[int] = set()  # of the frames kept so far
    highest = -1  # of them
    upcoming = 0  # the number of the next frame without a time: one past the highest so far or damaged packet
    with container:
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except (av.FFmpegError, OSError) as error:
                    damaged.append((upcoming, _detail(error)))
                    upcoming += 1
                    continue
                for frame in frames:
                    if start is None and frame.time is not None and fps:
                        start = frame.time - upcoming / fps
                    if frame.time is not None and start is not None:
                        if last is not None and frame.time < last - REORDER_FRAMES / fps:
                            start, last, restarted = frame.time - (highest + 1) / fps, None, True
                        number = round((frame.time - start) * fps)
                        if last is not None and frame.time > last and number <= highest:
                            number = highest + 1  # later than every frame so far, so numbered after them
                    else:
                        number = upcoming
                    if number in numbers or number < 0:  # a frame decoded twice (concealment), or before frame 0
                        continue
                    numbers.add(number)
                    highest = max(highest, number)
                    upcoming = max(upcoming, number + 1)
                    if number % stride == 0:
                        yield _video_frame(frame, path, key, video, number, fps)
                    if frame.time is not None:  # it stops showing after its own duration (a held last frame), or a period
                        shown = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else 1 / (fps or 1)
                        last = frame.time if last is None else max(last, frame.time)
                        end = frame.time + shown if end is None else max(end, frame.time + shown)
        except (av.FFmpegError, OSError) as error:  # the container itself is damaged: nothing after it can be read
            damaged.append((upcoming, _detail(error)))
        short = "" if restarted else _cut_short(container, stream, end, fps)
    if not numbers:
        yield Skip(path, "unreadable_video", "no video frames" + (f" (first error: {damaged[0][1]})" if damaged else ""))
    elif damaged:
        (first, problem), count = damaged[0], len(damaged)
        detail = f"{count} undecodable packet(s), first: {problem}" + (f"; {short}" if short else "")
        yield Skip(f"{path}#frame={first}", "corrupt_video", detail)
    elif short:
        yield Skip(f"{path}#frame={upcoming}", "corrupt_video", short)


def _duration(container: av.container.InputContainer, stream: av.VideoStream) -> tuple[float, float] | None:
    """(start, duration) in seconds of the video: the stream's own when the file records it (mp4, avi), else
    its `DURATION` tag (Matroska and WebM muxers write one per track), else the container's, but only when the video
    is its one stream: an audio track may outlast the video, and its length is no promise of frames."""
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0
    if stream.duration is not None and stream.time_base:
        return start, float(stream.duration * stream.time_base)
    tag = _DURATION_TAG.fullmatch(stream.metadata.get("DURATION", ""))  # what Matroska muxers write per track
    if tag:
        return start, int(tag["h"]) * 3600 + int(tag["m"]) * 60 + float(tag["s"])
    if container.duration is not None and len(container.streams) == 1:
        start = container.start_time / av.time_base if container.start_time is not None else 0.0
        return start, container.duration / av.time_base
    return None


def _cut_short(container: av.container.InputContainer, stream: av.VideoStream, end: float | None, fps: float | None) -> str:
    """"ends at 2.2 s of 4.0 s" when the decoded frames (`end`: when the latest one stops showing) stop more than
    about 2 frame periods before the recorded duration, else "". A file cut short (an interrupted download or
    copy) ends like a normal end of stream in Matroska and WebM, and costs mp4 or avi one undecodable packet for
    all its lost frames: without this check the loss would go unreported or be understated."""
    known = _duration(container, stream)
    if not fps or known is None:
        return ""
    start, duration = known
    end = start if end is None else end  # nothing decoded
    return f"ends at {end - start:.1f} s of {duration:.1f} s" if duration - (end - start) > 2.5 / fps else ""


def _as_displayed(frame: av.VideoFrame, rgb: np.ndarray) -> np.ndarray:
    """``rgb`` [H, W, 3] as players show the frame: its display matrix turns and mirrors it.

    PyAV's ``frame.rotation`` alone reads a mirrored matrix as a turn (a horizontal mirror is -180, a vertical one
    0), so the matrix itself is read: a display point is ``[x y] @ [[a, b], [c, d]]`` (FFmpeg's libavutil/display.h).
    A matrix of an angle other than a multiple of 90 degrees (no phone writes one) is turned by the nearest."""
    matrix = frame.side_data.get("DISPLAYMATRIX")
    if matrix is None:
        return rgb
    a, b, _, c, d, *_ = struct.unpack("=9i", bytes(matrix))
    if b == c == 0 and a and d:
        return np.ascontiguousarray(rgb[:: -1 if d < 0 else 1, :: -1 if a < 0 else 1])
    if a == d == 0 and b and c:  # the stored rows become the shown columns
        return np.ascontiguousarray(rgb.transpose(1, 0, 2)[:: -1 if b < 0 else 1, :: -1 if c < 0 else 1])
    return np.ascontiguousarray(np.rot90(rgb, k=round(frame.rotation / 90)))


def _video_frame(frame: av.VideoFrame, path: str, key: str, video: str, index: int, fps: float | None) -> Picture:
    """One decoded frame, upright and unmirrored as players show it."""
    pixels = to_rgb_float(_as_displayed(frame, frame.to_ndarray(format="rgb24")))
    meta = {
        "source": path,
        "key": key,
        "video": video,
        "frame": index,
        "fps": fps,
        "time": None if frame.time is None else round(float(frame.time), 6),
        "width": pixels.shape[2],
        "height": pixels.shape[1],
    }
    return Picture(f"{key}/{index:06d}", pixels, meta, video_file=True)


def read_unit(unit: Unit, opts: DecodeOptions) -> Iterator[Picture | Skip]:
    """Everything in a unit, in a fixed order (tar order, or sorted relative paths)."""
    for item in unit.items:
        if item.error:
            yield Skip(item.path, "unreadable_folder", item.error)
        elif unit.kind == "tar":
            yield from read_tar(item.path, opts)
        elif unit.kind == "images":
            yield read_image_file(item, opts, unit.dataset)
        elif opts.labels:
            yield Skip(item.path, "not_label_map", "videos cannot be label maps")
        else:
            yield from read_video(item.path, item.rel, opts.video_stride, unit.dataset)


Row = TypeVar("Row")  # what a pipeline makes of one decoded picture


def read_batches(
    unit: Unit, opts: DecodeOptions, size: int, prepare: Callable[[Picture], Row]
) -> Iterator[tuple[list[Row], list[Skip], bool]]:
    """A unit's pictures as `(rows, skips, last)` batches of `size` rows, the pipelines' one reading loop.

    Each picture is `prepare`d as soon as it is decoded, so a batch holds prepared rows, never a batch of
    full-size pictures. `skips` are the inputs left out since the previous batch, a key seen before in the
    unit among them (`duplicate_key`: one output per key). The final batch, perhaps empty, has `last` True
    so the caller commits the unit after it.
    """
    seen: dict[str, str] = {}  # key -> the input it was read from, which the skip names
    rows: list[Row] = []
    skips: list[Skip] = []
    for entry in read_unit(unit, opts):
        if isinstance(entry, Skip):
            skips.append(entry)
        elif entry.key in seen:
            skips.append(Skip(f"{entry.meta['source']}:{entry.key}", "duplicate_key", f"{seen[entry.key]} has the key"))
        else:
            seen[entry.key] = entry.meta["source"]
            rows.append(prepare(entry))
            if len(rows) == size:
                yield rows, skips, False
                rows, skips = [], []
    yield rows, skips, True
