"""LPIPS perceptual distance (Zhang et al. 2018, VGG16 variant) from weights already on disk.

taming's `LPIPS` class cannot be used here: it downloads both the ImageNet VGG16
and the LPIPS linear heads when constructed (and its module imports `requests`).
This is the same network (torchvision's VGG16 features, the five ReLU taps, the
learned 1x1 heads, keys `lin{k}.model.1.weight` as in the LPIPS/taming `vgg.pth`),
built only from files the user already has. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torchvision.models.vgg import cfgs, make_layers

import weights
from common.errors import UserError, warn

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, as cached by torch.hub
LINEAR_FILE = "vgg.pth"  # LPIPS v0.1 linear heads (lpips package / taming)
_TAPS = (4, 9, 16, 23, 30)  # VGG16 feature indices ending relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """Frozen perceptual distance between two image batches in [-1, 1] -> Tensor[B]."""

    def __init__(self) -> None:
        super().__init__()
        features = make_layers(cfgs["D"])[: _TAPS[-1]]
        self.slices = nn.ModuleList(features[a:b] for a, b in zip((0, *_TAPS[:-1]), _TAPS))
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = x.new_zeros(x.shape[0])
        for block, lin in zip(self.slices, self.lins):
            h = block(h)
            fx, fy = (h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)).chunk(2)
            total = total + lin((fx - fy).pow(2)).mean(dim=(1, 2, 3))
        return total

    def load_weights(self, vgg16: Path, linear: Path) -> "LPIPS":
        """torchvision's VGG16 file and LPIPS v0.1's linear layers; a file of another kind is one line naming it."""
        vgg_state, lin_state = weights.torch_load(vgg16), weights.torch_load(linear)
        for path, found, key, kind in ((vgg16, vgg_state, "features.0.weight", "torchvision's VGG16"),
                                       (linear, lin_state, "lin0.model.1.weight", "LPIPS v0.1 vgg.pth")):
            if not isinstance(found, dict) or key not in found:
                raise UserError(path, f"no {key}: not {kind} weights")
        state = {}
        for key, value in vgg_state.items():  # features.{i}.weight -> slices.{slice of i}.{i}.weight
            parts = key.split(".")
            if parts[0] == "features" and int(parts[1]) < _TAPS[-1]:
                s = next(k for k, end in enumerate(_TAPS) if int(parts[1]) < end)
                state[f"slices.{s}.{parts[1]}.{parts[2]}"] = value
        for k in range(len(_CHANNELS)):
            state[f"lins.{k}.weight"] = lin_state[f"lin{k}.model.1.weight"]
        self.load_state_dict(state, strict=True)
        return self


def _default_linear_path(hub_checkpoints: Path) -> Path:
    """Prefer the torch hub cache; fall back to the file the `lpips` package ships, if installed."""
    cached = hub_checkpoints / LINEAR_FILE
    spec = importlib.util.find_spec("lpips")
    if not cached.is_file() and spec is not None and spec.origin is not None:
        return Path(spec.origin).parent / "weights" / "v0.1" / LINEAR_FILE
    return cached


def load_lpips(vgg16: str | Path | None = None, linear: str | Path | None = None) -> LPIPS | None:
    """LPIPS from local files, or None (with one warning) when they are not on disk.

    Defaults: `<torch hub dir>/checkpoints/vgg16-397923af.pth` and `.../checkpoints/vgg.pth`.
    """
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    vgg16_path = Path(vgg16) if vgg16 else hub / VGG16_FILE
    linear_path = Path(linear) if linear else _default_linear_path(hub)
    for given in (vgg16, linear):  # a path the user typed is a request: a typo must not drop the perceptual loss
        if given and not Path(given).is_file():
            raise UserError(given, "no such file (LPIPS weights); leave it unset to look in the torch hub cache")
    missing = [str(p) for p in (vgg16_path, linear_path) if not p.is_file()]
    if missing:
        rank_zero_only(warn)(f"LPIPS weights not found ({', '.join(missing)}); training without the perceptual loss")
        return None
    return LPIPS().load_weights(vgg16_path, linear_path)
