"""The miniature's own code: the extra training views of a clip, pans over photos, and the report's verdicts."""

import random

import numpy as np
import pytest
from PIL import Image

from lvm.demo import report
from lvm.demo.data import pans, views


def test_views_mirror_and_crop_the_same_footage():
    frames = [np.random.default_rng(i).integers(0, 256, (144, 256, 3), dtype=np.uint8) for i in range(3)]
    out = views(frames)
    assert set(out) == {"mirror", "top-left", "bottom-right-mirror"}
    for i, frame in enumerate(frames):
        assert np.array_equal(out["mirror"][i], frame[:, ::-1])
        assert np.array_equal(out["top-left"][i], frame[:108, :108])
        assert np.array_equal(out["bottom-right-mirror"][i], frame[36:, 148:][:, ::-1])
        assert all(len(v) == 3 for v in out.values())


def test_pans_glide_a_window_across_the_photo():
    # A horizontal gradient: a window moving by d photo pixels shifts every column's value by d.
    photo = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (200, 1, 3)))
    clips = pans(photo, count=5, rng=random.Random(0), frames=24, size=32)
    assert len(clips) == 5
    for clip in clips:
        assert len(clip) == 24 and all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in clip)
        centre = np.array([float(f[:, 8:24].mean()) for f in clip])  # away from the resampling edges
        steps = np.diff(centre)
        assert np.all(np.abs(steps) < 20) and abs(centre[-1] - centre[0]) > 0  # moves, slowly, in one line
        assert np.all(np.sign(steps[np.abs(steps) > 0.5]) == np.sign(centre[-1] - centre[0]))


def test_report_states_verdicts_as_they_come_out():
    figures = {
        "timings_s": {"data": 1.0, "lvm": 2.0},
        "tokenizer": {"psnr": 20.0, "ssim": 0.5, "codebook_usage": 0.1},
        "loss": {"first": 9.0, "last": 4.0, "steps": 600},
        "vs_context": {1: 400.0, 2: 390.0, 8: 380.0, 15: 900.0},
        "unigram": 800.0,
        "video": [{"clip": "bikes", "mse_prediction": 0.02, "mse_copy_last": 0.01, "mse_copy_last_tokens": 0.03, "mse_tokenizer": 0.01}],
        "analogies": [{"task": "inpainting", "photo": "chelsea", "mse_prediction": 0.03, "mse_query": 0.05,
                       "mse_query_tokens": 0.02, "mse_tokenizer": 0.01}],
    }
    text = report.markdown(figures)
    assert "| **total** | **3** |" in text
    assert "codebook usage 10.0% (~819 of 8192 codes)" in text
    assert "Falls from 1 to 8 context frames: yes (400.0 -> 380.0)" in text
    assert "Below the unigram perplexity with 15 frames: **no**" in text
    assert "| bikes | 0.0200 | 0.0100 | 0.0300 | 0.0100 | **no** / yes |" in text
    assert "| inpainting | chelsea | 0.0300 | 0.0500 | 0.0200 | 0.0100 | yes / **no** |" in text


def test_demo_takes_no_options(capsys):
    from lvm.demo.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--out", "elsewhere"])  # paths are fixed: a flag that would be ignored is refused instead
    assert exit_info.value.code == 2 and "unrecognized arguments: --out elsewhere" in capsys.readouterr().err
