"""Checkpoint formats: open-muse `VQGANModel` (the released LVM tokenizer) and taming-transformers `.ckpt`.

The open-muse key list and the reference forward pass below are written from the
published architecture (open-muse `modeling_taming_vqgan.py`), independently of
`tokenizer.model`, so they check our module names and wiring rather than restate them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from taming.modules.diffusionmodules.model import Decoder as TamingDecoder
from taming.modules.diffusionmodules.model import Encoder as TamingEncoder
from taming.modules.vqvae.quantize import VectorQuantizer as TamingQuantizer

import tokenizer
import weights
from tokenizer.loading import build, open_muse_config

RELEASED_LVM_CONFIG = {  # config.json of the released LVM tokenizer (open-muse VQGANModel)
    "_class_name": "VQGANModel",
    "resolution": 256,
    "num_channels": 3,
    "hidden_channels": 128,
    "channel_mult": [1, 2, 2, 4, 6],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "no_attn_mid_block": True,
    "z_channels": 64,
    "num_embeddings": 8192,
    "quantized_embed_dim": 64,
    "dropout": 0.0,
    "resample_with_conv": True,
    "commitment_cost": 0.25,
}
TINY_MUSE_CONFIG = {  # same format, tiny widths, every optional block switched on
    **RELEASED_LVM_CONFIG,
    "resolution": 32,
    "hidden_channels": 32,
    "channel_mult": [1, 2, 2],
    "attn_resolutions": [16],
    "no_attn_mid_block": False,
    "z_channels": 16,
    "quantized_embed_dim": 8,
    "num_embeddings": 512,
}


def open_muse_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape of an open-muse VQGANModel, from its published layout."""
    shapes: dict[str, tuple[int, ...]] = {}
    ch, mults, nrb, z = cfg["hidden_channels"], cfg["channel_mult"], cfg["num_res_blocks"], cfg["z_channels"]

    def conv(name: str, out: int, inp: int, k: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp, k, k), (out,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name: str, inp: int, out: int) -> None:
        norm(f"{name}.norm1", inp), conv(f"{name}.conv1", out, inp, 3), norm(f"{name}.norm2", out)
        conv(f"{name}.conv2", out, out, 3)
        if inp != out:
            conv(f"{name}.nin_shortcut", out, inp, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def mid(prefix: str, c: int) -> None:
        resnet(f"{prefix}.mid.block_1", c, c)
        if not cfg["no_attn_mid_block"]:
            attn(f"{prefix}.mid.attn_1", c)
        resnet(f"{prefix}.mid.block_2", c, c)

    res = cfg["resolution"]
    conv("encoder.conv_in", ch, cfg["num_channels"], 3)
    block_in = ch
    for i, mult in enumerate(mults):
        for j in range(nrb):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * mult)
            block_in = ch * mult
            if res in cfg["attn_resolutions"]:
                attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != len(mults) - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            res //= 2
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", z, block_in, 3)

    conv("decoder.conv_in", ch * mults[-1], z, 3)
    mid("decoder", ch * mults[-1])
    for i in reversed(range(len(mults))):
        block_in = ch * mults[-1] if i == len(mults) - 1 else ch * mults[i + 1]
        for j in range(nrb + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, ch * mults[i])
            block_in = ch * mults[i]
            if res in cfg["attn_resolutions"]:
                attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            res *= 2
    norm("decoder.norm_out", ch * mults[0]), conv("decoder.conv_out", cfg["num_channels"], ch * mults[0], 3)
    conv("quant_conv", cfg["quantized_embed_dim"], z, 1)
    conv("post_quant_conv", z, cfg["quantized_embed_dim"], 1)
    shapes["quantize.embedding.weight"] = (cfg["num_embeddings"], cfg["quantized_embed_dim"])
    return shapes


def test_released_lvm_tokenizer_keys_all_map() -> None:
    """Full-size released config on the meta device: every key used, none missing or left over."""
    shapes = open_muse_shapes(RELEASED_LVM_CONFIG)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert 140e6 < sum(t.numel() for t in state.values()) < 150e6  # the release: ~146M parameters
    model = build(open_muse_config(RELEASED_LVM_CONFIG), state, "released")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert (model.image_size, model.tokens_per_image, model.codebook_size) == (256, 256, 8192)
    assert model.config.value_range == (0.0, 1.0) and model.config.resize == "stretch"
    assert not hasattr(model.encoder.mid, "attn_1") and model.encoder.conv_out.out_channels == 64


def test_state_dict_left_over_or_missing_key_is_named() -> None:
    shapes = open_muse_shapes(RELEASED_LVM_CONFIG)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    state["encoder.mid.attn_1.q.weight"] = torch.empty(768, 768, 1, 1, device="meta")
    del state["decoder.up.0.block.2.conv2.bias"]
    with pytest.raises(tokenizer.TokenizerLoadError) as info:
        build(open_muse_config(RELEASED_LVM_CONFIG), state, "x")
    assert str(info.value) == (
        "x: state dict does not match the config: 1 missing (e.g. decoder.up.0.block.2.conv2.bias); "
        "1 unexpected (e.g. encoder.mid.attn_1.q.weight)"
    )


def _reference_encode(sd: dict[str, torch.Tensor], cfg: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open-muse's VQGANModel.encode written out functionally: (latent after quant_conv, token ids)."""

    def conv(name: str, h: torch.Tensor, stride: int = 1, padding: int | None = None) -> torch.Tensor:
        w = sd[f"{name}.weight"]
        return F.conv2d(h, w, sd[f"{name}.bias"], stride, w.shape[-1] // 2 if padding is None else padding)

    def gn(name: str, h: torch.Tensor) -> torch.Tensor:
        return F.group_norm(h, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def resnet(name: str, h: torch.Tensor) -> torch.Tensor:
        out = conv(f"{name}.conv1", F.silu(gn(f"{name}.norm1", h)))
        out = conv(f"{name}.conv2", F.silu(gn(f"{name}.norm2", out)))
        return (conv(f"{name}.nin_shortcut", h) if f"{name}.nin_shortcut.weight" in sd else h) + out

    def attn(name: str, h: torch.Tensor) -> torch.Tensor:
        n = gn(f"{name}.norm", h)
        b, c, hh, ww = h.shape
        q, k, v = (conv(f"{name}.{p}", n).reshape(b, c, hh * ww) for p in "qkv")
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c**-0.5, dim=2)
        return h + conv(f"{name}.proj_out", torch.einsum("bcj,bij->bci", v, weights).reshape(b, c, hh, ww))

    h = conv("encoder.conv_in", x)
    for i in range(len(cfg["channel_mult"])):
        for j in range(cfg["num_res_blocks"]):
            h = resnet(f"encoder.down.{i}.block.{j}", h)
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = attn(f"encoder.down.{i}.attn.{j}", h)
        if f"encoder.down.{i}.downsample.conv.weight" in sd:
            h = conv(f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = resnet("encoder.mid.block_1", h)
    if "encoder.mid.attn_1.q.weight" in sd:
        h = attn("encoder.mid.attn_1", h)
    h = resnet("encoder.mid.block_2", h)
    z = conv("quant_conv", conv("encoder.conv_out", F.silu(gn("encoder.norm_out", h))))
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    codebook = sd["quantize.embedding.weight"]
    distances = (flat**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * flat @ codebook.t()
    return z, distances.argmin(1).reshape(x.shape[0], -1)


@pytest.mark.parametrize("weights_name", ["pytorch_model.bin", "model.safetensors"])
def test_open_muse_directory_loads_and_encodes_like_open_muse(tmp_path: Path, weights_name: str) -> None:
    torch.manual_seed(0)
    sd = {k: torch.randn(s) * (0.3 if len(s) > 1 else 0.1) for k, s in open_muse_shapes(TINY_MUSE_CONFIG).items()}
    (tmp_path / "config.json").write_text(json.dumps(TINY_MUSE_CONFIG))
    if weights_name.endswith(".bin"):
        torch.save(sd, tmp_path / weights_name)
    else:
        save_file(sd, str(tmp_path / weights_name))
    tok = tokenizer.load(tmp_path)
    pixels = torch.rand(3, 3, 32, 32)
    z_ref, tokens_ref = _reference_encode(sd, TINY_MUSE_CONFIG, pixels)
    with torch.no_grad():
        z = tok.quant_conv(tok.encoder(pixels))
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(tok.encode_pixels(pixels), tokens_ref)
    image = torch.randint(0, 256, (3, 40, 20), dtype=torch.uint8)
    assert torch.equal(tok.preprocess(image), F.interpolate(image[None].float() / 255, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1))


def test_unsupported_open_muse_option_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**TINY_MUSE_CONFIG, "decoder_res_blocks": 3}))
    with pytest.raises(tokenizer.TokenizerLoadError, match=r"config.json: invalid tokenizer config: open-muse option decoder_res_blocks=3"):
        tokenizer.load(tmp_path)


TAMING_DDCONFIG = {
    "double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [16], "dropout": 0.0,
}


def _save_as_lightning_1_0(state: dict, path: Path) -> None:
    """A checkpoint as PyTorch Lightning 1.0 (taming's releases) saves one: each callback's state keyed by the
    callback's class, which the pickle names (pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint)."""
    fakes = {package: types.ModuleType(package) for package in ("pytorch_lightning", "pytorch_lightning.callbacks")}
    callbacks = {}
    for module, name, callback_state in (("model_checkpoint", "ModelCheckpoint", {"best_model_score": torch.tensor(0.5)}),
                                         ("early_stopping", "EarlyStopping", {"wait_count": 0, "patience": 3})):
        fakes[f"pytorch_lightning.callbacks.{module}"] = types.ModuleType(f"pytorch_lightning.callbacks.{module}")
        callback = type(name, (), {"__module__": f"pytorch_lightning.callbacks.{module}"})
        setattr(fakes[f"pytorch_lightning.callbacks.{module}"], name, callback)
        callbacks[callback] = callback_state
    checkpoint = {"epoch": 3, "global_step": 10, "pytorch-lightning_version": "1.0.8", "state_dict": state,
                  "callbacks": callbacks, "optimizer_states": [], "lr_schedulers": []}
    with mock.patch.dict(sys.modules, fakes):  # the class is found by its name while it is pickled, never after
        torch.save(checkpoint, path)


def _taming_run(tmp_path: Path) -> tuple[Path, dict[str, torch.nn.Module]]:
    """A taming-style run folder: checkpoints/last.ckpt + configs/<date>-project.yaml, built from taming's modules."""
    torch.manual_seed(0)
    modules = {
        "encoder": TamingEncoder(**TAMING_DDCONFIG),
        "decoder": TamingDecoder(**TAMING_DDCONFIG),
        "quantize": TamingQuantizer(256, 8, beta=0.25),
        "quant_conv": torch.nn.Conv2d(16, 8, 1),
        "post_quant_conv": torch.nn.Conv2d(8, 16, 1),
    }
    with torch.no_grad():
        modules["quantize"].embedding.weight.normal_()  # spread the codes so many are used
    state = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)  # training-only, must be ignored
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "configs").mkdir()
    _save_as_lightning_1_0(state, tmp_path / "checkpoints" / "last.ckpt")
    project = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": 8, "n_embed": 256, "ddconfig": TAMING_DDCONFIG,
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}
    (tmp_path / "configs" / "2021-01-01T00-00-00-project.yaml").write_text(yaml.safe_dump(project))
    return tmp_path / "checkpoints" / "last.ckpt", {k: m.eval() for k, m in modules.items()}


def test_taming_checkpoint_gives_taming_tokens_and_reconstructions(tmp_path: Path) -> None:
    ckpt, taming = _taming_run(tmp_path)
    tok = tokenizer.load(ckpt)
    assert tok.config.value_range == (-1.0, 1.0) and tok.config.resize == "center_crop" and tok.config.mid_attention
    pixels = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_q, _, (_, _, indices) = taming["quantize"](taming["quant_conv"](taming["encoder"](pixels)))
        reconstruction = taming["decoder"](taming["post_quant_conv"](z_q))
    tokens = tok.encode_pixels(pixels)
    assert torch.equal(tokens, indices.view(4, -1))
    assert len(tokens.unique()) > 4  # not a degenerate all-one-code case
    expected = ((reconstruction.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    assert (tok.decode(tokens).int() - expected.int()).abs().max() <= 1  # equal up to float rounding at .5


def test_taming_yaml_passed_explicitly_or_missing(tmp_path: Path) -> None:
    ckpt, _ = _taming_run(tmp_path)
    moved = tmp_path / "elsewhere.ckpt"
    ckpt.rename(moved)
    with pytest.raises(tokenizer.TokenizerLoadError, match=r"elsewhere.ckpt: taming checkpoint without its yaml"):
        tokenizer.load(moved)
    (project,) = (tmp_path / "configs").glob("*.yaml")
    assert tokenizer.load(moved, config=project).tokens_per_image == 64


def test_a_taming_run_copied_flat_finds_its_project_yaml(tmp_path: Path) -> None:
    """last.ckpt with the run's two yamls beside it: the lightning one (which sorts first) holds no model (review 48 #7)."""
    (tmp_path / "run").mkdir()
    ckpt, _ = _taming_run(tmp_path / "run")
    flat = tmp_path / "flat"
    flat.mkdir()
    ckpt.rename(flat / "last.ckpt")
    (project,) = (tmp_path / "run" / "configs").glob("*.yaml")
    project.rename(flat / project.name)
    (flat / "2021-01-01T00-00-00-lightning.yaml").write_text(yaml.safe_dump({"lightning": {"trainer": {"gpus": 1}}}))
    assert tokenizer.load(flat / "last.ckpt").tokens_per_image == 64
    # any other yaml that sorts first holds no model either: it was taken, and the load refused (review 66 #1)
    (flat / "000-environment.yaml").write_text(yaml.safe_dump({"name": "env", "channels": ["conda-forge"]}))
    assert tokenizer.load(flat / "last.ckpt").tokens_per_image == 64
    # the .ckpt's own yaml holding the model at its top level, as taming_config reads it, comes first (review 67 #3)
    model = yaml.safe_load((flat / project.name).read_text())["model"]
    (flat / "last.yaml").write_text(yaml.safe_dump(model))
    model["params"]["n_embed"] *= 2
    (flat / project.name).write_text(yaml.safe_dump({"model": model}))  # another model's
    assert tokenizer.load(flat / "last.ckpt").tokens_per_image == 64


def test_an_open_muse_class_other_than_vqganmodel_is_named(tmp_path: Path) -> None:
    """A MOVQ folder was built as a VQGANModel and refused later for mismatched keys (review 48 #12)."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY_MUSE_CONFIG, "_class_name": "MOVQ"}))
    with pytest.raises(tokenizer.TokenizerLoadError, match=r"config\.json: an open-muse MOVQ, not a VQGANModel"):
        tokenizer.load(tmp_path)


def test_taming_release_layout_finds_configs_model_yaml(tmp_path: Path) -> None:
    """taming's downloads (`logs/vqgan_imagenet_f16_1024/`) are `checkpoints/last.ckpt` + `configs/model.yaml`."""
    ckpt, _ = _taming_run(tmp_path)
    (project,) = (tmp_path / "configs").glob("*.yaml")
    project.rename(tmp_path / "configs" / "model.yaml")
    assert tokenizer.load(ckpt).tokens_per_image == 64


@pytest.mark.parametrize(
    "change,problem",
    [
        ({"target": "taming.models.vqgan.GumbelVQ"}, "only taming.models.vqgan.VQModel is supported, not taming.models.vqgan.GumbelVQ"),
        ({"target": "taming.models.vqgan.EMAVQ"}, "only taming.models.vqgan.VQModel is supported, not taming.models.vqgan.EMAVQ"),
        ({"ddconfig": {**TAMING_DDCONFIG, "double_z": True}}, "ddconfig.double_z=true is a VAE, not a VQGAN"),
    ],
)
def test_taming_models_other_than_a_vqgan_are_refused(tmp_path: Path, change: dict, problem: str) -> None:
    ckpt, _ = _taming_run(tmp_path)
    (project,) = (tmp_path / "configs").glob("*.yaml")
    model = yaml.safe_load(project.read_text())["model"]
    model.update({k: v for k, v in change.items() if k == "target"})
    model["params"].update({k: v for k, v in change.items() if k != "target"})
    project.write_text(yaml.safe_dump({"model": model}))
    with pytest.raises(tokenizer.TokenizerLoadError) as info:
        tokenizer.load(ckpt)
    assert str(info.value) == f"{project}: invalid tokenizer config: {problem}"


@pytest.mark.parametrize("yaml_text,problem", [("- a\n- b\n", "the file must be a mapping, not a list"),
                                               ("model: hello\n", "model must be a mapping, not a str"),
                                               ("model: {params: [1]}\n", "model.params must be a mapping, not a list"),
                                               ("model: {params: {ddconfig: [1, 2]}}\n",
                                                "model.params.ddconfig must be a mapping, not a list")])
def test_a_taming_yaml_of_another_shape_is_one_line(tmp_path: Path, yaml_text: str, problem: str) -> None:
    """Any stray `*.yaml` beside a .ckpt is read as its config: a list or a string section must not be a traceback."""
    ckpt, _ = _taming_run(tmp_path)
    (project,) = (tmp_path / "configs").glob("*.yaml")
    project.write_text(yaml_text)
    with pytest.raises(tokenizer.TokenizerLoadError) as info:
        tokenizer.load(ckpt)
    assert str(info.value) == f"{project}: invalid tokenizer config: {problem}"


@pytest.mark.parametrize("checkpoint,problem", [
    ({"lvm_tokenizer": {"config": {}}, "state_dict": {}}, "its lvm_tokenizer entry is not a mapping with a config and a prefix"),
    ({"lvm_tokenizer": "oops", "state_dict": {}}, "its lvm_tokenizer entry is not a mapping with a config and a prefix"),
    ({"state_dict": 5}, "its state_dict is not a mapping of names to tensors (int)"),
])
def test_malformed_checkpoint_entries_are_one_line(tmp_path: Path, checkpoint: dict, problem: str) -> None:
    path = tmp_path / "x.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(tokenizer.TokenizerLoadError) as info:
        tokenizer.load(path)
    assert str(info.value) == f"{path}: {problem}"


def test_weights_that_are_not_tensors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_MUSE_CONFIG))
    torch.save({key: [0.0] for key in open_muse_shapes(TINY_MUSE_CONFIG)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(tokenizer.TokenizerLoadError) as info:
        tokenizer.load(tmp_path)
    assert str(info.value) == f"{tmp_path}: encoder.conv_in.weight is not a tensor (list)"


def test_a_bare_state_dict_and_an_unused_config_are_said_to_be_so(tmp_path: Path, tiny_tokenizer) -> None:
    """A bare model.safetensors was "not a VQGAN checkpoint" though it holds the weights; --config was ignored
    unless the checkpoint was taming's (review 41 #12, #13)."""
    folder = tiny_tokenizer.save(tmp_path / "tok")
    with pytest.raises(tokenizer.TokenizerLoadError, match=r"model.safetensors: a bare state dict without its config; "
                                                           r"give the folder that holds it and its config.json$"):
        tokenizer.load(folder / "model.safetensors")
    with pytest.raises(tokenizer.TokenizerLoadError, match=r"^--config: only for a taming .ckpt; .*tok is a folder"):
        tokenizer.load(folder, config=tmp_path / "taming.yaml")


class _RunsCodeWhenUnpickled:
    """What a malicious checkpoint holds: unpickling it calls os.makedirs(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


@pytest.mark.parametrize("pickled", ["os.makedirs", "argparse.Namespace"])  # torch words the two refusals differently
def test_checkpoints_that_pickle_other_objects_are_refused_unrun(tmp_path: Path, pickled: str) -> None:
    ckpt, _ = _taming_run(tmp_path)
    checkpoint = {k: v for k, v in weights.torch_load(ckpt).items() if k != "callbacks"}  # (keyed by stand-ins)
    marker = tmp_path / "code_ran"
    extra = _RunsCodeWhenUnpickled(marker) if pickled == "os.makedirs" else argparse.Namespace(lr=1e-4)
    torch.save({**checkpoint, "hyper_parameters": extra}, ckpt)
    with pytest.raises(tokenizer.TokenizerLoadError) as info:
        tokenizer.load(ckpt)
    assert str(info.value).startswith(f"{ckpt}: refused: it pickles {pickled}, which is code, not weights")
    assert not marker.exists()
