"""One resolver for every `--model` / `--tokenizer`: a local file or folder, or a Hugging Face hub id.

    resolve("runs/lvm_tiny/checkpoints/last.ckpt")   # a path that exists: returned as it is
    resolve("Emma02/LVM_ckpts")                      # the hub's main branch, fetched into the hub cache
    resolve("Emma02/vqvae_ckpts@<commit or tag>")    # a pinned revision

Hub ids are fetched with `huggingface_hub.snapshot_download` into its standard cache, so HF_HOME,
HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN and its progress bars behave as everywhere else. Only what the
loaders read is fetched: the config, image processor and index json files, then the safetensors weights, or the `.bin` pickles
when the repository has none, at the repository's top. The environment is read at each call, not at import.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from weights.errors import WeightsError

DEFAULT_TOKENIZER = "Emma02/vqvae_ckpts"
"""The release's VQGAN tokenizer (open-muse `VQGANModel`: config.json + pytorch_model.bin at the root)."""
DEFAULT_MODEL = "Emma02/LVM_ckpts"
"""The release's LVM-7B (a Hugging Face `LlamaForCausalLM` folder)."""

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
_LOCAL_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".json", ".yaml", ".tar")
# The files the loaders read, named from the repository's top: "*.safetensors" would also match the checkpoints of
# a subfolder (`original/consolidated.safetensors`, Meta's format beside the HF one), several times the model's size.
# preprocessor_config.json is the image processor lvm.annotate's depth, normals and segmentation models load.
_CONFIGS = ["config.json", "generation_config.json", "preprocessor_config.json", "model.safetensors.index.json",
            "pytorch_model.bin.index.json"]
_WEIGHTS = (["model*.safetensors", "pytorch_model*.safetensors"], ["pytorch_model*.bin"])  # safetensors hold no code


def hub_repo(spec: str | Path) -> tuple[str, str | None] | None:
    """(repo id, revision) when `spec` is a hub id rather than a local path, else None."""
    text = str(spec)
    match = _HUB_ID.match(text)
    if match is None or Path(text).exists() or text.endswith(_LOCAL_SUFFIXES):
        return None
    return match["repo"], match["revision"]


def resolve(spec: str | Path, option: str = "--model") -> Path:
    """A local path that exists, or the snapshot folder of a hub id in the cache (downloading what is missing).

    `option` is the command-line flag the spec came from, named in the error when nothing is found.
    """
    path = Path(spec)
    if path.exists():
        return path
    hub = hub_repo(spec)
    if hub is None:
        raise WeightsError(spec, "no such file or directory")
    return _snapshot(str(spec), *hub, option)


def _offline() -> bool:
    """huggingface_hub's offline switch, read now: HF_HUB_OFFLINE or its older name TRANSFORMERS_OFFLINE."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _cache_dir() -> Path:
    """The hub cache as huggingface_hub finds it (HF_HUB_CACHE, its older name HUGGINGFACE_HUB_CACHE, HF_HOME, then
    XDG_CACHE_HOME, with `~` and `$VAR`s expanded), read now: its own constants are read once, at import, and a
    caller may set the environment later (tests, notebooks)."""
    def expand(path: str) -> Path:
        return Path(os.path.expanduser(os.path.expandvars(path)))

    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return expand(cache)
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return expand(home) / "hub"


def _snapshot(spec: str, repo: str, revision: str | None, option: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline, cache = _offline(), _cache_dir()
    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        folder = None
        for weights in _WEIGHTS:  # a second call only when the first found no weights of its kind
            folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=offline,
                                            allow_patterns=_CONFIGS + weights))
            if any(any(folder.glob(pattern)) for pattern in weights):
                return folder
        # What an interrupted download leaves (the json files come first), or a repository without weights.
        raise WeightsError(spec, f"no *.safetensors or *.bin weight files in its Hugging Face snapshot ({folder}): "
                                 f"fetch it again (`{fetch}`) or pass a local folder: {option} PATH")
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1" if offline else "the hub cannot be reached"
        raise WeightsError(
            spec,
            f"no such local path, and as a hub id not in the Hugging Face cache ({cache}) and {why}; fetch it once "
            f"where there is network (`{fetch}`, into the same cache) or pass a local folder: {option} PATH",
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise WeightsError(spec, f"no such Hugging Face repository (or it needs a token: HF_TOKEN); for a local "
                                 f"folder or file give a path that exists: {option} PATH") from None
    except RevisionNotFoundError:
        raise WeightsError(spec, f"no revision {revision!r} in {repo}") from None
    except (HfHubHTTPError, OSError) as err:
        raise WeightsError(spec, f"download failed ({type(err).__name__}: {str(err).splitlines()[0]})") from None
