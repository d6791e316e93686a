"""Public tokenizer API: shapes, dtypes, determinism, image modes, save/load, load errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageOps

import tokenizer
from conftest import tiny_vqgan_config
from lvm.tokenize.decode import DecodeOptions, decode_image
from tokenizer.preprocess import resize_square

F16_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vqgan_f16_8192.yaml"


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_facts_and_shapes(tiny_tokenizer: tokenizer.VQTokenizer) -> None:
    tok = tiny_tokenizer
    assert (tok.image_size, tok.tokens_per_image, tok.codebook_size) == (64, 16, 8192)
    images = [Image.fromarray(_photo(90, 50)), torch.from_numpy(_photo(33, 47)).permute(2, 0, 1)]
    tokens = tok.encode(images)
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 16)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 8192
    decoded = tok.decode(tokens)
    assert decoded.dtype == torch.uint8 and decoded.shape == (2, 3, 64, 64)


def test_encode_equals_preprocess_then_encode_pixels(tiny_tokenizer: tokenizer.VQTokenizer) -> None:
    batch = torch.from_numpy(np.stack([_photo(64, 64, s) for s in range(3)])).permute(0, 3, 1, 2)
    pixels = torch.stack([tiny_tokenizer.preprocess(image) for image in batch])
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 3, 64, 64)
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0  # the tiny model takes [0, 1]
    assert torch.equal(tiny_tokenizer.encode(batch), tiny_tokenizer.encode_pixels(pixels))


def test_deterministic_across_loads(tiny_tokenizer_dir: Path) -> None:
    image = Image.fromarray(_photo(120, 80))
    first = tokenizer.load(tiny_tokenizer_dir).encode([image])
    second = tokenizer.load(tiny_tokenizer_dir).encode([image, image])
    assert torch.equal(first[0], second[0]) and torch.equal(second[0], second[1])


def test_image_modes_convert_cleanly(tiny_tokenizer: tokenizer.VQTokenizer) -> None:
    gray = np.linspace(0, 255, 48 * 40, dtype=np.float64).reshape(40, 48).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    reference = tiny_tokenizer.preprocess(Image.fromarray(rgb))
    png16 = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 257).save(png16, format="PNG")  # a real 16-bit grayscale PNG
    variants = {
        "L": Image.fromarray(gray),
        "P": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256),
        "RGBA opaque": Image.fromarray(np.dstack([rgb, np.full_like(gray, 255)])),
        "16-bit PNG": Image.open(png16),
        "uint16 array": gray.astype(np.uint16) * 257,
        "HxW uint8 array": gray,
        "uint8 tensor 1ch": torch.from_numpy(gray)[None],
    }
    lossy = {"P": 1 / 255, "16-bit PNG": 1e-6, "uint16 array": 1e-6}  # an adaptive palette; x * 257 / 65535 in float32
    for name, image in variants.items():
        x = tiny_tokenizer.preprocess(image)
        assert x.shape == (3, 64, 64), name
        torch.testing.assert_close(x, reference, rtol=0, atol=lossy.get(name, 0), msg=name)


def test_images_without_a_known_range_are_refused_not_white(tiny_tokenizer: tokenizer.VQTokenizer, tmp_path) -> None:
    """A float TIFF of 0..255 or a 32-bit one past 16 bits became a flat white picture in training, tokenize and
    prompt (clipped to [0, 1]); in range, they read as before (review 54 #6)."""
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    unit = tiny_tokenizer.preprocess(Image.fromarray(ramp, mode="F"))
    torch.testing.assert_close(unit[0], torch.from_numpy(ramp), rtol=0, atol=1e-6)
    deep = Image.fromarray((ramp * 65535).round().astype(np.int32), mode="I")
    torch.testing.assert_close(tiny_tokenizer.preprocess(deep)[0], torch.from_numpy(ramp), rtol=0, atol=1e-5)
    for image, problem in ((Image.fromarray(ramp * 255, mode="F"), r"float image with values in \[0, 255\], not \[0, 1\]"),
                           (Image.fromarray((ramp * 2**31 - 1).astype(np.int32), mode="I"), "32-bit integer image")):
        with pytest.raises(ValueError, match=problem):
            tiny_tokenizer.preprocess(image)
    # and lvm.tokenize skips such a file, saying why
    Image.fromarray(ramp * 255, mode="F").save(tmp_path / "depth.tif")
    (skip,) = decode_image((tmp_path / "depth.tif").read_bytes(), "depth.tif", "depth", {}, DecodeOptions()),
    assert skip.reason == "corrupt_image" and "not [0, 1]" in skip.detail


def test_sixteen_bit_images_keep_their_low_bytes(tiny_tokenizer: tokenizer.VQTokenizer) -> None:
    deep = np.random.default_rng(0).integers(0, 65536, (64, 64), dtype=np.uint16)  # the model's size: no resize
    expected = torch.from_numpy(deep.astype(np.float32) / 65535).expand(3, -1, -1)
    truncated = torch.from_numpy((deep >> 8).astype(np.float32) / 255).expand(3, -1, -1)
    assert (expected - truncated).abs().max() > 1 / 300  # what an 8-bit regression would lose
    png16 = io.BytesIO()
    Image.fromarray(deep).save(png16, format="PNG")
    variants = {"16-bit PNG": Image.open(png16), "uint16 array": deep, "uint16 HxWx3 array": np.dstack([deep] * 3)}
    for name, image in variants.items():
        assert torch.equal(tiny_tokenizer.preprocess(image), expected), name


def test_transparent_pixels_become_white(tiny_tokenizer: tokenizer.VQTokenizer) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # black, fully transparent
    assert torch.allclose(tiny_tokenizer.preprocess(Image.fromarray(rgba)), torch.ones(3, 64, 64))
    # a 16-bit gray PNG whose tRNS chunk makes one gray value transparent: its left half (black) turns white
    deep = np.zeros((64, 64), dtype=np.uint16)
    deep[:, 32:] = 30000
    png16 = io.BytesIO()
    Image.fromarray(deep).save(png16, format="PNG", transparency=0)
    x = tiny_tokenizer.preprocess(Image.open(png16))
    assert torch.equal(x[:, :, :32], torch.ones(3, 64, 32)) and torch.allclose(x[:, :, 32:], torch.full((3, 64, 32), 30000 / 65535))


@pytest.mark.parametrize("resize", ["stretch", "center_crop"])
def test_seen_is_the_image_the_tokenizer_encodes(resize: str) -> None:
    """A 96x64 image, red and blue 16-pixel bands at the sides: a centre crop to 64 keeps only the green middle."""
    config = tokenizer.VQGANConfig(**{**vars(tiny_vqgan_config()), "resize": resize})
    tok = tokenizer.VQTokenizer(config)
    pixels = np.zeros((64, 96, 3), np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 16:80] = (0, 255, 0)
    pixels[:, 80:] = (0, 0, 255)
    seen = tok.seen([Image.fromarray(pixels)])
    assert seen.dtype == torch.uint8 and seen.shape == (1, 3, 64, 64)
    if resize == "center_crop":
        assert (seen[0, 1] == 255).all() and (seen[0, [0, 2]] == 0).all()
    else:  # squeezed: the bands stay, 16 * 64 / 96 ~ 11 pixels wide
        assert (seen[0, 0, :, :8] > 200).all() and (seen[0, 2, :, -8:] > 200).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"resolution": 0}, "resolution must be at least 1, got 0"),
        ({"patch_size": 0}, "patch_size must be at least 1, got 0"),
        ({"codebook_size": 0}, "codebook_size must be at least 1, got 0"),
        ({"channel_mult": []}, "a non-empty channel_mult of positive integers"),
        ({"num_res_blocks": 0}, "needs num_res_blocks >= 1"),
        ({"value_range": (1.0, 1.0)}, r"value_range \(low, high\) with low < high"),
        ({"value_range": [0.0]}, r"value_range must be two numbers \(low, high\), got \[0.0\]"),  # was an IndexError
        ({"value_range": [0, 1, 2]}, r"value_range must be two numbers \(low, high\), got \[0, 1, 2\]"),  # was taken
        ({"dropout": 2.0}, "0 <= dropout < 1"),
        ({"in_channels": 1}, r"in_channels must be 3 \(preprocessing and the training data give RGB\), got 1"),
    ],
)
def test_impossible_configs_are_refused_by_name(change: dict, message: str) -> None:
    with pytest.raises(tokenizer.VQGANConfigError, match=message):
        tokenizer.VQGANConfig(**{**vars(tiny_vqgan_config()), **change})


def test_encode_turns_a_photo_as_its_exif_says_as_tokenize_does(tiny_tokenizer: tokenizer.VQTokenizer, tmp_path) -> None:
    """tok.encode / tok.seen of a phone photo gave other tokens than lvm.tokenize, which turns it (review 41 #10)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif)
    with Image.open(tmp_path / "turned.jpg") as image:
        as_opened, as_shown = tiny_tokenizer.encode([image]), tiny_tokenizer.encode([ImageOps.exif_transpose(image)])
        assert torch.equal(tiny_tokenizer.seen([image]), tiny_tokenizer.seen([ImageOps.exif_transpose(image)]))
    assert torch.equal(as_opened, as_shown)


def test_decode_takes_this_tokenizers_images_only_and_resize_modes_are_known(tiny_tokenizer: tokenizer.VQTokenizer) -> None:
    """Any square count decoded an image of another size, and float ids were truncated (review 41 #14, #18)."""
    T = tiny_tokenizer.tokens_per_image
    for bad in (torch.zeros(2, 4, dtype=torch.long), torch.zeros(T, dtype=torch.long), torch.zeros(1, T)):
        with pytest.raises(ValueError, match=rf"expected integer tokens \[B, {T}\] \(this tokenizer's tokens per image\)"):
            tiny_tokenizer.decode(bad)
    with pytest.raises(ValueError, match="unknown resize mode 'centre_crop'"):
        resize_square(torch.zeros(3, 8, 16), 8, "centre_crop")


def test_decode_clamps_out_of_range_ids(tiny_tokenizer: tokenizer.VQTokenizer) -> None:
    tokens = torch.tensor([[8191] * 16, [9000] * 16, [-5] * 16, [0] * 16])
    decoded = tiny_tokenizer.decode(tokens)
    assert torch.equal(decoded[0], decoded[1]) and torch.equal(decoded[2], decoded[3])


def test_unsupported_image_input_is_a_clear_error(tiny_tokenizer: tokenizer.VQTokenizer) -> None:
    with pytest.raises(TypeError, match="unsupported image array dtype float64"):
        tiny_tokenizer.preprocess(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="expected 1 to 4 channels"):
        tiny_tokenizer.preprocess(torch.zeros(5, 8, 8, dtype=torch.uint8))


def test_save_load_round_trip_is_exact(tiny_tokenizer: tokenizer.VQTokenizer, tmp_path: Path) -> None:
    tiny_tokenizer.save(tmp_path / "copy")
    copy = tokenizer.load(tmp_path / "copy")
    assert copy.config == tiny_tokenizer.config
    for (name, a), (_, b) in zip(tiny_tokenizer.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_killed_save_leaves_the_earlier_save_whole(
    tiny_tokenizer: tokenizer.VQTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_tokenizer.save(tmp_path / "tok")
    before = {f.name: f.read_bytes() for f in (tmp_path / "tok").iterdir()}

    def killed(state: dict, path: str, metadata: dict) -> None:
        Path(path).write_bytes(b"cut short")
        raise KeyboardInterrupt

    monkeypatch.setattr("tokenizer.model.save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        tiny_tokenizer.save(tmp_path / "tok")
    after = {f.name: f.read_bytes() for f in (tmp_path / "tok").iterdir() if not f.name.endswith(".tmp")}
    assert after == before


def test_load_errors_are_one_line_and_name_the_path(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    cases = {}
    cases[tmp_path / "missing"] = "no such file or directory"
    (tmp_path / "empty").mkdir()
    cases[tmp_path / "empty"] = "no config.json"
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint at all")
    cases[corrupt] = "corrupt or not a PyTorch checkpoint"
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((tiny_tokenizer_dir / "config.json").read_bytes())
    (truncated / "model.safetensors").write_bytes((tiny_tokenizer_dir / "model.safetensors").read_bytes()[:1000])
    cases[truncated / "model.safetensors"] = "corrupt safetensors file"
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.embed.weight": torch.zeros(2, 2)}}, other)
    cases[other] = "not a VQGAN checkpoint (no state_dict with quantize.embedding.weight)"
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}')
    cases[llama / "config.json"] = "neither a tokenizer saved by this project nor an open-muse VQGANModel config"
    for path, problem in cases.items():
        with pytest.raises(tokenizer.TokenizerLoadError) as info:
            tokenizer.load(path if path.name not in ("model.safetensors", "config.json") else path.parent)
        message = str(info.value)
        assert message.startswith(f"{path}: {problem}") and "\n" not in message, message


def test_wrong_architecture_is_refused(tmp_path: Path, tiny_tokenizer: tokenizer.VQTokenizer) -> None:
    tiny_tokenizer.save(tmp_path)
    config_file = tmp_path / "config.json"
    config_file.write_text(config_file.read_text().replace('"num_res_blocks": 1', '"num_res_blocks": 2'))
    with pytest.raises(tokenizer.TokenizerLoadError, match="state dict does not match the config: .* missing"):
        tokenizer.load(tmp_path)


@pytest.mark.slow
def test_f16_8192_config_gives_256_tokens_and_back() -> None:
    """configs/vqgan_f16_8192.yaml (the released LVM shape, random weights): 256x256 -> 256 codes -> 256x256."""
    section = OmegaConf.to_container(OmegaConf.load(F16_CONFIG).model.init_args.tokenizer)
    torch.manual_seed(0)
    tok = tokenizer.VQTokenizer(tokenizer.VQGANConfig(**section)).eval()
    assert 140e6 < sum(p.numel() for p in tok.parameters()) < 150e6
    tokens = tok.encode([Image.fromarray(_photo(256, 256))])
    assert tokens.shape == (1, 256) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 8192
    assert tok.decode(tokens).shape == (1, 3, 256, 256)


def test_restart_moves_dead_codes_onto_batch_latents():
    from tokenizer.quantizer import VectorQuantizer

    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=16, embed_dim=4)
    latents = torch.randn(3, 4)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 5]] = True
    before = vq.embedding.weight.clone()
    assert vq.restart(dead, latents) == 2
    after = vq.embedding.weight
    assert torch.equal(after[~dead], before[~dead])
    for code in (2, 5):  # each moved next to one of the latents
        assert (after[code] - latents).norm(dim=1).min() < 0.1


def test_commitment_cost_weights_the_encoder_term_not_the_codebook_term():
    """loss = ||sg[z] - e||^2 + beta ||z - sg[e]||^2: beta scales only the gradient to the encoder output."""
    from tokenizer.quantizer import VectorQuantizer

    torch.manual_seed(0)
    beta = 0.25
    vq = VectorQuantizer(codebook_size=8, embed_dim=3, commitment_cost=beta)
    z = torch.randn(2, 3, 2, 4).requires_grad_()
    out = vq(z)
    out.loss.backward()
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)  # [B*h*w, C], the layout the codes are looked up in
    indices = out.indices.flatten()
    chosen = vq.embedding.weight.detach()[indices]
    numel = flat.numel()  # mse_loss averages over every element
    expected_z = (beta * 2 * (flat - chosen) / numel).view(2, 2, 4, 3).permute(0, 3, 1, 2)
    assert torch.allclose(z.grad, expected_z, atol=1e-7)
    expected_codes = torch.zeros_like(vq.embedding.weight).index_add_(0, indices, 2 * (chosen - flat) / numel)
    assert torch.allclose(vq.embedding.weight.grad, expected_codes, atol=1e-7)
    assert len(indices.unique()) > 1  # several codes chosen, so the per-code sums are checked


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("l2_normalized_codes", "false", "must be true or false, got 'false'"),  # a true string: the cosine lookup went on
    ("codebook_size", 8192.0, "must be a whole number, got 8192.0"),  # a traceback from torch
    ("channel_mult", None, "must be a list of whole numbers, got None"),
])
def test_a_hand_edited_config_json_of_the_wrong_types_is_one_line(tiny_tokenizer_dir, tmp_path, field, value, problem):
    """Review 66 #2: config.json's JSON types are checked against the fields'."""
    folder = Path(shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok"))
    config = json.loads((folder / "config.json").read_text())
    config["config"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(tokenizer.TokenizerLoadError, match=rf"config\.json: .*{field} {problem.replace('(', '.').replace(')', '.')}"):
        tokenizer.load(folder)


def test_encode_takes_only_what_it_can_encode(tiny_tokenizer):
    """A taller batch gave twice an image's tokens, which decode refused; an empty one was a RuntimeError (review 66 #4)."""
    S, T = tiny_tokenizer.image_size, tiny_tokenizer.tokens_per_image
    for bad in (torch.zeros(1, 3, 2 * S, S), torch.zeros(1, 3, S, S, dtype=torch.uint8), torch.zeros(3, S, S)):
        with pytest.raises(ValueError, match=rf"expected preprocessed pixels, a float batch \[B, 3, {S}, {S}\]"):
            tiny_tokenizer.encode_pixels(bad)
    assert tiny_tokenizer.encode_pixels(torch.zeros(0, 3, S, S)).shape == (0, T) == tiny_tokenizer.encode([]).shape


def test_whole_floats_in_a_configs_lists_still_load():
    """yamls and open-muse configs write `ch_mult: [1.0, 2.0]`: the type checks refused them (review 67 #2)."""
    config = tiny_vqgan_config()
    assert tokenizer.VQGANConfig(**{**config.to_dict(), "channel_mult": [float(m) for m in config.channel_mult]}) == config
    with pytest.raises(tokenizer.VQGANConfigError, match=r"channel_mult must be a list of whole numbers, got \[1\.5\]"):
        tokenizer.VQGANConfig(**{**config.to_dict(), "channel_mult": [1.5]})
    with pytest.raises(tokenizer.VQGANConfigError, match=r"value_range must be two numbers \(low, high\), got '01'"):
        tokenizer.VQGANConfig(**{**config.to_dict(), "value_range": "01"})
