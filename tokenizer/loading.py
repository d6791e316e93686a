"""`tokenizer.load`: one entry point for every VQGAN checkpoint a user may bring.

Supported, detected from what is on disk:
  * a directory written by `VQTokenizer.save` (config.json with "format": "lvm-vqgan" + model.safetensors);
  * a Lightning `.ckpt` written by `lightning fit` with `tokenizer.training.VQGANTraining`
    (EMA weights preferred when the run kept them);
  * an open-muse `VQGANModel` directory (config.json + pytorch_model.bin or *.safetensors),
    the format of the released LVM tokenizer;
  * a taming-transformers `.ckpt` with its yaml (beside it, in the run's or release's configs/ folder, or `config=`).
A folder format (ours, open-muse) may also be named by a Hugging Face hub id (`Emma02/vqvae_ckpts`, the released
tokenizer, optionally `@revision`), fetched into the hub cache by `weights.resolve`; a `.ckpt` on the hub is
downloaded first (`hf download REPO FILE`) and named by its path.
Every failure is a `TokenizerLoadError` whose message names the path and the problem.
Pickles are read with `weights.torch_load` (`weights_only=True`: a pickle naming code is refused, never run);
state dicts must match the architecture exactly (no missing or unexpected keys) so a wrong config can never
load silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

import weights
from common.errors import UserError
from tokenizer.config import VQGANConfig
from tokenizer.model import CONFIG_NAME, FORMAT_NAME, WEIGHTS_NAME, VQTokenizer

LIGHTNING_KEY = "lvm_tokenizer"  # checkpoint entry written by VQGANTraining.on_save_checkpoint
OPEN_MUSE_WEIGHTS = ("pytorch_model.safetensors", "model.safetensors", "pytorch_model.bin")


class TokenizerLoadError(UserError):
    """A checkpoint that cannot be loaded: ``TokenizerLoadError(path, problem)``."""


def load(path: str | Path, device: str | torch.device = "cpu", config: str | Path | None = None) -> VQTokenizer:
    """Load any supported tokenizer checkpoint (a path or a hub id), in eval mode on `device`.

    `config` is only for taming `.ckpt` files whose yaml is not beside them.
    """
    try:
        path = weights.resolve(path, option="--tokenizer")
    except weights.WeightsError as err:
        raise TokenizerLoadError(err.where, err.what) from None
    if path.is_dir():
        if config is not None:  # a flag given and not used is a typo or a misunderstanding
            raise TokenizerLoadError("--config", f"only for a taming .ckpt; {path} is a folder, whose config.json is read")
        cfg, state = _read_directory(path)
    else:
        cfg, state = _read_ckpt(path, None if config is None else Path(config))
    model = build(cfg, state, path)
    return model.to(device).eval()


def build(cfg: VQGANConfig, state: dict[str, Tensor], path: str | Path) -> VQTokenizer:
    """Instantiate `cfg` (on the meta device: no wasted random init) and assign `state`, exactly."""
    with torch.device("meta"):
        model = VQTokenizer(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise TokenizerLoadError(path, f"state dict does not match the config: {_key_summary(missing, unexpected)}")
    for key, tensor in expected.items():
        if not isinstance(state[key], Tensor):
            raise TokenizerLoadError(path, f"{key} is not a tensor ({type(state[key]).__name__})")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise TokenizerLoadError(path, f"{key} has shape {tuple(state[key].shape)}, the config needs {tuple(tensor.shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model


def _key_summary(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    return "; ".join(parts)


# -- directories ---------------------------------------------------------------
def _read_directory(path: Path) -> tuple[VQGANConfig, dict[str, Tensor]]:
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        checkpoints = sorted(p.name for p in [*path.glob("*.ckpt"), *path.glob("checkpoints/*.ckpt")])
        hint = f"; it holds {', '.join(checkpoints[:3])}: a tokenizer's checkpoint is given as the file" if checkpoints else ""
        raise TokenizerLoadError(path, f"no {CONFIG_NAME} (expected a tokenizer directory saved by this project or "
                                 f"open-muse){hint}")
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerLoadError(config_file, f"not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise TokenizerLoadError(config_file, "expected a JSON object")
    if meta.get("format") == FORMAT_NAME:
        cfg = _config(config_file, VQGANConfig.from_dict, meta.get("config", {}))
        return cfg, _read_safetensors(path / WEIGHTS_NAME)
    named = meta.get("_class_name")
    if named not in (None, "VQGANModel"):
        raise TokenizerLoadError(config_file, f"an open-muse {named}, not a VQGANModel (the only open-muse class read)")
    if named is None and not {"hidden_channels", "num_embeddings"} <= set(meta):
        raise TokenizerLoadError(config_file, "neither a tokenizer saved by this project nor an open-muse VQGANModel config")
    cfg = _config(config_file, open_muse_config, meta)
    for name in OPEN_MUSE_WEIGHTS:
        if (path / name).is_file():
            file = path / name
            return cfg, _read_safetensors(file) if file.suffix == ".safetensors" else _torch_load(file)
    raise TokenizerLoadError(path, f"no weights file (looked for {', '.join(OPEN_MUSE_WEIGHTS)})")


def _config(path: Path, make: Callable[[Any], VQGANConfig], data: Any) -> VQGANConfig:
    try:
        return make(data)
    except (TypeError, ValueError, KeyError) as err:
        raise TokenizerLoadError(path, f"invalid tokenizer config: {err}") from None


def open_muse_config(cfg: dict[str, Any]) -> VQGANConfig:
    """open-muse `VQGANModel` config.json -> VQGANConfig (missing keys take VQGANModel's defaults)."""
    for option in ("decoder_res_blocks", "extra_mid_res_blocks", "decoder_hidden_channels", "decoder_channel_mult"):
        if cfg.get(option) is not None:
            raise ValueError(f"open-muse option {option}={cfg[option]!r} is not supported (only symmetric VQGANs)")
    if not cfg.get("resample_with_conv", True):
        raise ValueError("resample_with_conv=false is not supported")
    num_res_blocks = int(cfg.get("num_res_blocks", 2))
    attn_resolutions = list(cfg.get("attn_resolutions", [16]))
    if num_res_blocks == 1 and attn_resolutions:
        # open-muse applies encoder attention only when a level has more than one block: its
        # weights would exist but be skipped; refuse rather than compute different tokens.
        raise ValueError("num_res_blocks=1 with attn_resolutions is computed differently by open-muse")
    return VQGANConfig(
        resolution=int(cfg.get("resolution", 256)),
        in_channels=int(cfg.get("num_channels", 3)),
        hidden_channels=int(cfg.get("hidden_channels", 128)),
        channel_mult=list(cfg.get("channel_mult", [1, 1, 2, 2, 4])),
        num_res_blocks=num_res_blocks,
        attn_resolutions=attn_resolutions,
        mid_attention=not cfg.get("no_attn_mid_block", False),
        z_channels=int(cfg.get("z_channels", 256)),
        embed_dim=int(cfg.get("quantized_embed_dim", 256)),
        codebook_size=int(cfg.get("num_embeddings", 1024)),
        commitment_cost=float(cfg.get("commitment_cost", 0.25)),
        dropout=float(cfg.get("dropout", 0.0)),
        value_range=(0.0, 1.0),
        resize="stretch",
    )


# -- .ckpt files ---------------------------------------------------------------
def _read_ckpt(path: Path, config: Path | None) -> tuple[VQGANConfig, dict[str, Tensor]]:
    ckpt = _torch_load(path)
    state = ckpt.get("state_dict", {})
    if not isinstance(state, dict):
        raise TokenizerLoadError(path, f"its state_dict is not a mapping of names to tensors ({type(state).__name__})")
    if LIGHTNING_KEY in ckpt:  # written by `lightning fit` with VQGANTraining
        if config is not None:
            raise TokenizerLoadError("--config", f"only for a taming .ckpt; {path} is a training checkpoint of ours, "
                                                 "which holds its config")
        entry = ckpt[LIGHTNING_KEY]
        if not isinstance(entry, dict) or not isinstance(entry.get("prefix"), str):
            raise TokenizerLoadError(path, f"its {LIGHTNING_KEY} entry is not a mapping with a config and a prefix")
        cfg = _config(path, VQGANConfig.from_dict, entry.get("config"))
        prefix = entry["prefix"]
        return cfg, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "quantize.embedding.weight" not in state:
        if "quantize.embedding.weight" in ckpt:  # a bare state dict (model.safetensors, pytorch_model.bin)
            raise TokenizerLoadError(path, "a bare state dict without its config; give the folder that holds it and "
                                           "its config.json")
        raise TokenizerLoadError(path, "not a VQGAN checkpoint (no state_dict with quantize.embedding.weight)")
    yaml_path = config or _find_taming_yaml(path)
    cfg = _config(yaml_path, taming_config, _read_yaml(yaml_path))
    return cfg, {k: v for k, v in state.items() if not k.startswith("loss.")}  # discriminator + LPIPS


def _find_taming_yaml(ckpt: Path) -> Path:
    """taming's training runs keep `<run>/checkpoints/last.ckpt` and `<run>/configs/<date>-project.yaml`; its released
    downloads (`vqgan_imagenet_f16_1024`, ...) the same `.ckpt` with `configs/model.yaml`; other copies put the yaml
    beside. Not any `configs/*.yaml`: a run's `<date>-lightning.yaml` there holds no model."""
    configs = ckpt.parent.parent / "configs"
    beside = [y for y in sorted(ckpt.parent.glob("*.yaml")) if not y.name.endswith("-lightning.yaml")]
    candidates = [ckpt.with_suffix(".yaml"), *beside, *sorted(configs.glob("*project.yaml")), configs / "model.yaml"]
    found = [candidate for candidate in candidates if candidate.is_file()]
    for candidate in found:  # the first that holds a VQModel (an environment.yaml that sorts first holds none) ...
        try:
            data = OmegaConf.to_container(OmegaConf.load(candidate))
            if "ddconfig" in data.get("model", data)["params"]:  # where taming_config reads it
                return candidate
        except Exception:  # noqa: BLE001 - a yaml of any other shape is not the model's
            continue
    if found:
        return found[0]  # ... else the first, whose reading says what it lacks
    raise TokenizerLoadError(ckpt, "taming checkpoint without its yaml (put it beside the .ckpt or pass config=PATH)")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TokenizerLoadError(path, "no such config file")
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]
    except Exception as err:  # omegaconf/yaml raise many types for a malformed file
        raise TokenizerLoadError(path, f"not a readable yaml file ({type(err).__name__})") from None


def taming_config(data: dict[str, Any]) -> VQGANConfig:
    """taming-transformers yaml (`model.params` with ddconfig, n_embed, embed_dim) -> VQGANConfig."""
    model = _mapping(_mapping(data, "the file").get("model", data), "model")
    target = str(model.get("target", "taming.models.vqgan.VQModel"))
    if target.rsplit(".", 1)[-1] != "VQModel":
        raise ValueError(f"only taming.models.vqgan.VQModel is supported, not {target}")
    params = _mapping(model["params"], "model.params")
    dd = _mapping(params["ddconfig"], "model.params.ddconfig")
    if dd.get("double_z", False):
        raise ValueError("ddconfig.double_z=true is a VAE, not a VQGAN")
    if int(dd.get("out_ch", dd["in_channels"])) != int(dd["in_channels"]):
        raise ValueError("ddconfig.out_ch must equal in_channels")
    if not dd.get("resamp_with_conv", True):
        raise ValueError("resamp_with_conv=false is not supported")
    return VQGANConfig(
        resolution=int(dd["resolution"]),
        in_channels=int(dd["in_channels"]),
        hidden_channels=int(dd["ch"]),
        channel_mult=list(dd["ch_mult"]),
        num_res_blocks=int(dd["num_res_blocks"]),
        attn_resolutions=list(dd["attn_resolutions"]),
        mid_attention=True,  # taming's Encoder/Decoder always have mid.attn_1
        z_channels=int(dd["z_channels"]),
        embed_dim=int(params["embed_dim"]),
        codebook_size=int(params["n_embed"]),
        dropout=float(dd.get("dropout", 0.0)),
        value_range=(-1.0, 1.0),
        resize="center_crop",
    )


def _mapping(value: Any, name: str) -> dict[str, Any]:
    """`value` if it is a mapping: a yaml of another kind (a list, a string where a section belongs) is a config
    error naming the section, not an AttributeError."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping, not a {type(value).__name__}")
    return value


# -- raw readers -----------------------------------------------------------------
def _torch_load(path: Path) -> dict[str, Any]:
    try:
        obj = weights.torch_load(path, mmap=True)  # a training .ckpt is ~4x its tokenizer: page in only what is kept
    except weights.WeightsError as err:
        raise TokenizerLoadError(path, err.what) from None
    if not isinstance(obj, dict):
        raise TokenizerLoadError(path, f"expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise TokenizerLoadError(path, "no such weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        problem = weights.LFS_POINTER if weights.is_lfs_pointer(path) else f"corrupt safetensors file ({err})"
        raise TokenizerLoadError(path, problem) from None
