"""`python -m lvm.prompt` end to end on a random tiny LVM and the tiny tokenizer fixture (64x64, 16 tokens)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from common.files import natural_key
from common.vocab import BOS_ID, EOS_ID
from lvm.evaluate import main as evaluate_main
from lvm.generate import GREEDY, rollout
from lvm.hf import save_hf
from lvm.model import LVM, LVMConfig
from lvm.prompt import _in_order, main, read_image, resolve_prompts
from lvm.tokenize.decode import DecodeOptions, decode_image
from tokenizer.preprocess import to_rgb_float

S = 64


@pytest.fixture(scope="module")
def lvm_ckpt(tmp_path_factory):
    """A random tiny LVM saved as a training checkpoint; its 128-token context fits BOS + 6 frames + 1."""
    torch.manual_seed(0)
    model = LVM(LVMConfig(dim=64, mlp_dim=96, n_layers=2, n_heads=4, max_seq_len=128))
    path = tmp_path_factory.mktemp("lvm") / "tiny.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "lvm_config": model.cfg.to_dict()}, path)
    return path, model.eval()


def write_frames(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for name in names:  # odd sizes: the tokenizer resizes to 64x64
        pixels = torch.randint(0, 256, (3, 48, 80), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / name)
        paths.append(folder / name)
    return paths


def prompt(args, capsys):
    main([str(a) for a in args])
    return capsys.readouterr()


def test_natural_sort():
    names = ["f10.png", "f2.png", "f1.png", "F3.png"]
    assert [p.name for p in sorted(map(Path, names), key=natural_key)] == [
        "f1.png", "f2.png", "F3.png", "f10.png"]
    for listed in (["f1.png", "f01.png", "A.png", "a.png"], ["a.png", "A.png", "f01.png", "f1.png"]):  # ties
        assert sorted(listed, key=natural_key) == ["A.png", "a.png", "f01.png", "f1.png"]  # whatever the listing
    assert sorted(["frame2", "frame"], key=natural_key) == ["frame", "frame2"]


def test_next_frame_is_the_greedy_rollout_of_naturally_sorted_frames(
    tmp_path, lvm_ckpt, tiny_tokenizer_dir, tiny_tokenizer, capsys
):
    ckpt, model = lvm_ckpt
    paths = write_frames(tmp_path / "seq", ["frame_10.png", "frame_2.png", "frame_1.png"])
    out = tmp_path / "out" / "pred.PNG"  # the suffix in any case (review 53 #7)
    prompt(["--frames", *paths, "--model", ckpt, "--tokenizer", tiny_tokenizer_dir, "--out", out, "--greedy"], capsys)
    pred = Image.open(out)
    assert pred.size == (S, S) and pred.mode == "RGB" and pred.format == "PNG"
    # grid: 3 context + 1 prediction tiles of 64 + 2 px padding, 12 px between sections, one row.
    assert Image.open(tmp_path / "out" / "pred_grid.PNG").size == (4 * (S + 2) + 12, S + 2)
    ordered = [Image.open(p).convert("RGB") for p in (paths[2], paths[1], paths[0])]
    tokens = tiny_tokenizer.encode(ordered)[None]
    expected = tiny_tokenizer.decode(rollout(model, tokens, 1, GREEDY)[0])[0]
    assert torch.equal(pil_to_tensor(pred), expected)


def test_rollout_candidates_gif_and_ground_truth(tmp_path, lvm_ckpt, tiny_tokenizer_dir, tiny_tokenizer, capsys):
    ckpt, _ = lvm_ckpt
    frames = write_frames(tmp_path / "seq", [f"{i}.png" for i in range(5)])
    truth = write_frames(tmp_path / "gt", [f"{i}.png" for i in range(3)], seed=1)
    out = tmp_path / "roll.png"
    options = ["--num-frames", 3, "--candidates", 2, "--top-k", 100, "--seed", 3, "--ground-truth", *truth]
    printed = prompt(["--frames", *frames, "--model", ckpt, "--tokenizer", tiny_tokenizer_dir, "--out", out, *options],
                     capsys)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    expected = [f"roll_c{c}_f{f}.png" for c in range(2) for f in range(3)]
    expected += ["roll_c0.gif", "roll_c1.gif", "roll_grid.png"]
    assert names == sorted(expected)
    gif = Image.open(tmp_path / "roll_c0.gif")
    assert gif.n_frames == 5 + 3 and gif.size == (S, S)
    # rows: 2 candidates; sections: 5 context | 3 predictions | 3 ground truth
    assert Image.open(tmp_path / "roll_grid.png").size == (11 * (S + 2) + 2 * 12, 2 * (S + 2))
    assert "6 frame(s) (1 prompt(s) x 2 candidate(s) x 3)" in printed.out
    # per predicted frame against its true frame as the tokenizer's input sees it (64x64), in 8 bits, on [0, 1]
    low, high = tiny_tokenizer.config.value_range
    true = [((tiny_tokenizer.preprocess(Image.open(t)) - low) / (high - low)).clamp(0, 1).mul(255).round()
            .permute(1, 2, 0).double().numpy() / 255 for t in truth]
    mse = np.array([((np.asarray(Image.open(tmp_path / f"roll_c{c}_f{f}.png"), np.float64) / 255 - true[f]) ** 2).mean()
                    for c in range(2) for f in range(3)])
    assert f"vs ground truth: MSE {mse.mean():.4f}, PSNR {-10 * np.log10(mse.mean()):.2f} dB (over 6)" in printed.out
    # the context slid past the 6 frames that fit (5 given + 3 generated) without error; candidates differ
    assert Image.open(tmp_path / "roll_c0_f0.png").tobytes() != Image.open(tmp_path / "roll_c1_f0.png").tobytes()


def _greedy_next_frames(model, tok, prompts: list[list[Path]]) -> torch.Tensor:
    """uint8 [P, 3, S, S]: the greedy next frame of each prompt (frames in the order given), batched as the
    command batches them (float sums, hence near-tie codes, depend on the batch)."""
    tokens = tok.encode([Image.open(f).convert("RGB") for frames in prompts for f in frames])
    tokens = tokens.view(len(prompts), len(prompts[0]), -1)
    return tok.decode(rollout(model, tokens, 1, GREEDY).view(len(prompts), -1))


def test_batched_prompts_from_directories_and_pairs(tmp_path, lvm_ckpt, tiny_tokenizer_dir, tiny_tokenizer, capsys):
    ckpt, model = lvm_ckpt
    a = write_frames(tmp_path / "a", ["1.png", "2.png"])
    b = write_frames(tmp_path / "b", ["1.png", "2.png"], seed=2)
    out = tmp_path / "batch" / "p.png"
    prompt(["--frames", tmp_path / "a", tmp_path / "b", "--model", ckpt, "--tokenizer", tiny_tokenizer_dir,
            "--out", out, "--greedy"], capsys)
    assert sorted(p.name for p in out.parent.iterdir()) == ["p_grid.png", "p_p0.png", "p_p1.png"]
    expected = _greedy_next_frames(model, tiny_tokenizer, [a, b])
    for p, name in enumerate(("p_p0.png", "p_p1.png")):  # each prompt's own continuation
        assert torch.equal(pil_to_tensor(Image.open(out.parent / name)), expected[p]), name
    # Pairs keep the order given (example, its annotation, ..., query), never sorted by name.
    pairs = write_frames(tmp_path / "pairs", ["z.png", "z_ann.png", "b.png", "b_ann.png", "m.png"])
    printed = prompt(["--pairs", *pairs, "--model", ckpt, "--tokenizer", tiny_tokenizer_dir,
                      "--out", tmp_path / "m_ann.png", "--greedy"], capsys)
    assert torch.equal(pil_to_tensor(Image.open(tmp_path / "m_ann.png")), _greedy_next_frames(model, tiny_tokenizer, [pairs])[0])
    assert "1 frame(s)" in printed.out


def test_hugging_face_directory_follows_the_release_recipe(tmp_path, tiny_tokenizer_dir, tiny_tokenizer, capsys):
    # An HF Llama dir whose bos_token_id is a code id (1), like the released LVM-7B: prompted without BOS.
    torch.manual_seed(0)
    released = LVM(LVMConfig(dim=64, mlp_dim=96, n_layers=2, n_heads=4, max_seq_len=128, bos_id=None)).eval()
    save_hf(released, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "bos_token_id": 1, "pad_token_id": 8192}))
    frames = write_frames(tmp_path / "seq", ["0.png", "1.png"])
    prompt(["--frames", *frames, "--model", tmp_path / "hf", "--tokenizer", tiny_tokenizer_dir,
            "--out", tmp_path / "p.png", "--greedy"], capsys)
    tokens = tiny_tokenizer.encode([Image.open(f).convert("RGB") for f in frames]).view(1, -1)
    with torch.no_grad():  # greedy by full recomputation, no BOS in front
        for _ in range(16):
            tokens = torch.cat([tokens, released(tokens)[:, -1, :8192].argmax(-1, keepdim=True)], 1)
    assert torch.equal(pil_to_tensor(Image.open(tmp_path / "p.png")), tiny_tokenizer.decode(tokens[:, -16:])[0])


def run_error(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    return err.strip()


def test_bad_input_gives_one_line_errors(tmp_path, lvm_ckpt, tiny_tokenizer_dir, capsys, monkeypatch):
    ckpt, _ = lvm_ckpt
    frames = write_frames(tmp_path / "seq", [f"{i}.png" for i in range(8)])
    common = ["--model", ckpt, "--tokenizer", tiny_tokenizer_dir, "--out", tmp_path / "o.png"]
    missing = tmp_path / "nope.png"
    assert run_error(["--frames", missing, *common], capsys) == f"error: {missing}: no such file or directory"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert run_error(["--frames", tmp_path / "bad.png", *common], capsys).startswith(
        f"error: {tmp_path / 'bad.png'}: not a readable image")
    Image.new("RGB", (64, 64)).save(tmp_path / "huge.png")
    with monkeypatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 is over twice the limit: a decompression bomb
        assert run_error(["--frames", tmp_path / "huge.png", *common], capsys).startswith(
            f"error: {tmp_path / 'huge.png'}: not a readable image (Image size (4096 pixels) exceeds limit")
    assert run_error(["--frames", *frames, *common], capsys) == (
        "error: --frames: 8 frames given, but at most 7 fit as context "
        "(model context 128 tokens, 16 tokens per image, one frame left to generate)")
    with pytest.raises(SystemExit) as exit_info:  # a count below its minimum: argparse's usage error
        main([str(a) for a in ["--frames", frames[0], "--num-frames", 0, *common]])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("error: argument --num-frames: 0 is below the minimum of 1")
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    assert run_error(["--frames", tmp_path / "clip.mp4", *common], capsys) == (
        f"error: {tmp_path / 'clip.mp4'}: a video: prompts are image files; give its frames (e.g. `ffmpeg -i clip.mp4 "
        "-vf fps=4 frames/%04d.png`, then --frames frames/)")
    for count in (4, 1):  # no example pair at all is no analogy either
        assert run_error(["--pairs", *frames[:count], *common], capsys) == (
            f"error: --pairs: needs example pairs then one query image (an odd count, at least 3), got {count}")
    assert run_error(["--pairs", *frames[:3], "--num-frames", "3", *common], capsys) == (
        "error: --num-frames: an analogy has one answer, got 3 (for frames use --frames)")
    # --out may not replace an input: a rerun with the same folder would read the last prediction as a frame.
    before = frames[1].read_bytes()
    assert run_error(["--frames", *frames[:2], *common[:4], "--out", frames[1]], capsys) == (
        f"error: --out: would overwrite the input image {frames[1]}; write elsewhere")
    assert run_error(["--frames", *frames[:2], *common[:4], "--ground-truth", frames[2], "--out", frames[2]],
                     capsys) == f"error: --out: would overwrite the input image {frames[2]}; write elsewhere"
    grid_input = write_frames(tmp_path / "g", ["p_grid.png"])[0]  # the grid of --out g/p.png
    assert run_error(["--frames", grid_input, *common[:4], "--out", tmp_path / "g" / "p.png"], capsys) == (
        f"error: --out: would overwrite the input image {grid_input}; write elsewhere")
    # ... also when the input is spelled another way, or is the name of a later candidate or of the GIF
    dotted = tmp_path / "seq" / ".." / "seq" / "1.png"
    assert run_error(["--frames", frames[0], dotted, *common[:4], "--out", frames[1]], capsys) == (
        f"error: --out: would overwrite the input image {dotted}; write elsewhere")
    candidate, gif = write_frames(tmp_path / "g", ["p_c1.png", "p.gif"])
    for given, option in ((candidate, "--candidates"), (gif, "--num-frames")):
        assert run_error(["--frames", given, *common[:4], option, 2, "--out", tmp_path / "g" / "p.png"], capsys) == (
            f"error: --out: would overwrite the input image {given}; write elsewhere"), option
    assert frames[1].read_bytes() == before
    # a new name inside a folder given as the prompt: the next run of that folder would take it as a frame
    folder = tmp_path / "seq"
    assert run_error(["--frames", folder, *common[:4], "--out", folder / "new.png"], capsys) == (
        f"error: --out: would write into the prompt folder {folder}, whose images are all read as frames; "
        "write elsewhere")
    assert not (folder / "new.png").exists()
    truth = write_frames(tmp_path / "truth", ["t.png"])[0].parent  # the same for a --ground-truth folder
    assert run_error(["--frames", *frames[:2], *common[:4], "--ground-truth", truth, "--out", truth / "new.png"],
                     capsys) == (f"error: --out: would write into the prompt folder {truth}, whose images are all read "
                                 "as frames; write elsewhere")
    assert run_error(["--frames", frames[0], "--model", tmp_path / "x.ckpt", *common[2:]], capsys) == (
        f"error: {tmp_path / 'x.ckpt'}: no such file or directory")
    assert run_error(["--frames", frames[0], "--model", ckpt, "--tokenizer", tmp_path, "--out", tmp_path / "o.png"],
                     capsys).startswith(f"error: {tmp_path}: ")


def test_tokenizer_codebook_must_fit_the_model(tmp_path, tiny_tokenizer_dir, capsys):
    small = LVM(LVMConfig(dim=32, mlp_dim=64, n_layers=1, n_heads=2, vocab_size=1124, max_seq_len=64, bos_id=None))
    torch.save({"state_dict": {f"model.{k}": v for k, v in small.state_dict().items()},
                "lvm_config": small.cfg.to_dict()}, tmp_path / "small.ckpt")
    frame = write_frames(tmp_path / "seq", ["0.png"])[0]
    err = run_error(["--frames", frame, "--model", tmp_path / "small.ckpt", "--tokenizer", tiny_tokenizer_dir,
                     "--out", tmp_path / "o.png"], capsys)
    assert err == (f"error: {tiny_tokenizer_dir}: codebook of 8192 codes does not fit the model's 1024 code ids "
                   "(vocabulary 1124 = codes + 100 reserved)")
    with wds.TarWriter(str(tmp_path / "sentences-000000.tar")) as tar:  # one sentence of two 16-token images
        tar.write({"__key__": "s", "tokens.npy": np.array([BOS_ID, *range(32), EOS_ID], np.uint16), "json": {"kind": "video"}})
    with pytest.raises(SystemExit) as exit_info:  # lvm.evaluate refuses it too: it warned and scored (review 51)
        evaluate_main(["--model", str(tmp_path / "small.ckpt"), "--tokenizer", str(tiny_tokenizer_dir), "--sentences",
                       str(tmp_path), "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == err
    short = LVM(LVMConfig(dim=32, mlp_dim=64, n_layers=1, n_heads=2, vocab_size=8292, max_seq_len=16))
    torch.save({"state_dict": {f"model.{k}": v for k, v in short.state_dict().items()},
                "lvm_config": short.cfg.to_dict()}, tmp_path / "short.ckpt")
    err = run_error(["--frames", frame, "--model", tmp_path / "short.ckpt", "--tokenizer", tiny_tokenizer_dir,
                     "--out", tmp_path / "o.png"], capsys)
    assert err == ("error: --tokenizer: the model's context of 16 tokens cannot hold one context frame and the frame "
                   "to generate (16 tokens per image): is this the model's tokenizer?")
    # A smaller codebook than the model's code ids is fine: it uses the first ids (the miniature's 1000 codes).
    big = LVM(LVMConfig(dim=32, mlp_dim=64, n_layers=1, n_heads=2, vocab_size=9100, max_seq_len=64))
    torch.save({"state_dict": {f"model.{k}": v for k, v in big.state_dict().items()},
                "lvm_config": big.cfg.to_dict()}, tmp_path / "big.ckpt")
    main([str(a) for a in ["--frames", frame, "--model", tmp_path / "big.ckpt", "--tokenizer", tiny_tokenizer_dir,
                           "--out", tmp_path / "big.png", "--greedy"]])
    assert (tmp_path / "big.png").is_file()


def test_prompt_images_are_read_as_tokenize_reads_them(tmp_path):
    """16-bit maps keep their 16 bits, transparency becomes white, EXIF orientation is applied: the pixels equal those
    the tokenize pipeline decodes from the same file (`decode_image`), to the last bit."""
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))  # a depth map as lvm.annotate writes it
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    rgba[:1, :2, 3] = 77  # and a little half-transparent
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    Image.new("RGB", (40, 20), (10, 120, 30)).save(tmp_path / "turned.jpg", exif=exif)
    for name in ("depth.png", "alpha.png", "turned.jpg"):
        path = tmp_path / name
        decoded = decode_image(path.read_bytes(), name, name, {}, DecodeOptions())
        assert torch.equal(to_rgb_float(read_image(path)), decoded.pixels), name
    gray = to_rgb_float(read_image(tmp_path / "depth.png"))[0, 0].numpy()
    np.testing.assert_allclose(gray, ramp[0] / 65535, atol=1e-7)  # not rounded to 8 bits
    pixels = to_rgb_float(read_image(tmp_path / "alpha.png"))
    assert torch.equal(pixels[:, 1:2], torch.tensor([200 / 255, 0, 0])[:, None, None].expand(3, 1, 4))
    assert torch.equal(pixels[:, 2:], torch.ones(3, 2, 4))
    assert read_image(tmp_path / "turned.jpg").size == (20, 40)


def test_prompts_refused_or_warned_about_before_they_mislead(tmp_path, lvm_ckpt, tiny_tokenizer_dir, capsys):
    """Review 50: a damaged EXIF block, an animated GIF, a folder as --pairs (read in name order), greedy candidates
    that are copies, out-of-range sampling options and seeds were tracebacks, silent or late; outputs beside the
    images of a glob are read back by the next run of it."""
    ckpt, _ = lvm_ckpt
    common = ["--model", ckpt, "--tokenizer", tiny_tokenizer_dir, "--out", tmp_path / "out" / "o.png"]
    frames = write_frames(tmp_path / "seq", ["1.png", "2.png", "3.png"])
    broken, exif = tmp_path / "exif.jpg", Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x0110] = 6, "Camera", "Model X"  # turned; the camera's make and model
    Image.new("RGB", (16, 8), (10, 20, 30)).save(broken, exif=exif)
    data = bytearray(broken.read_bytes())
    data[data.find(b"Exif") + 17] = 0  # a damaged field: applying the orientation raises struct.error
    broken.write_bytes(bytes(data))
    assert run_error(["--frames", broken, *common], capsys) == (
        f"error: {broken}: not a readable image (required argument is not an integer)")
    gif = tmp_path / "anim.gif"
    Image.new("L", (8, 8), 0).save(gif, save_all=True, append_images=[Image.new("L", (8, 8), 255)])
    assert run_error(["--frames", gif, *common], capsys).startswith(f"error: {gif}: holds 2 frames: give its frames")
    assert run_error(["--pairs", tmp_path / "seq", *common], capsys).startswith(
        "error: --pairs: give the image files in their order (a folder would be read in name order")
    assert run_error(["--frames", *frames, "--greedy", "--candidates", "2", *common], capsys).startswith(
        "error: --candidates: 2 greedy candidates would be 2 copies of one")
    for option, value, problem in (("--top-p", "0", "0 is not in (0, 1]"), ("--temperature", "nan", "nan is not a finite"),
                                   ("--seed", str(2**64), f"{2**64} is not in [0, 2**32)")):
        with pytest.raises(SystemExit):
            main([str(a) for a in ["--frames", *frames, option, value, *common]])
        assert problem in capsys.readouterr().err.splitlines()[-1]
    printed = prompt(["--frames", *frames, "--greedy", *common[:4], "--out", tmp_path / "seq" / "pred.png"], capsys)
    assert "warning: the outputs lie beside the prompt images" in printed.err


def test_frames_of_two_folders_are_read_folder_by_folder():
    """Sorting by file name alone wove `s1/*.png s2/*.png` together (review 50 #6)."""
    given = [Path("s2/f1.png"), Path("s1/f2.png"), Path("s1/f10.png"), Path("s1/f1.png"), Path("s2/f2.png")]
    assert sorted(given, key=_in_order) == [Path("s1/f1.png"), Path("s1/f2.png"), Path("s1/f10.png"),
                                            Path("s2/f1.png"), Path("s2/f2.png")]


def test_hidden_files_of_a_prompt_folder_are_no_frames(tmp_path, lvm_ckpt, tiny_tokenizer_dir, capsys):
    """A `.thumb.png` became a context frame and macOS's `._f1.png` stopped the prompt; lvm.tokenize skips hidden
    files (review 51)."""
    ckpt, _ = lvm_ckpt
    write_frames(tmp_path / "seq", ["1.png", "2.png", ".thumb.png"])
    (tmp_path / "seq" / "._1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert [p.name for p in resolve_prompts([str(tmp_path / "seq")], "--frames", sort=True)[0]] == ["1.png", "2.png"]
    prompt(["--frames", tmp_path / "seq", "--model", ckpt, "--tokenizer", tiny_tokenizer_dir, "--greedy",
            "--out", tmp_path / "out" / "p.png"], capsys)
