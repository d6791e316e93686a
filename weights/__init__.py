"""Where weights come from and how they are read, shared by `tokenizer` and `lvm` (it imports only `common`).

- `resolve(spec)`: a local file or folder, or a Hugging Face hub id (`org/name[@revision]`) fetched into
  the standard hub cache; `DEFAULT_MODEL` and `DEFAULT_TOKENIZER` are the release's ids.
- `torch_load(path)`: `torch.load(weights_only=True)`: a pickle that names anything but tensors and plain
  containers is refused, naming the global, and nothing in it runs.
- `module_digest(module)`: a digest of a module's weights, recorded by whatever its outputs feed.
- `is_lfs_pointer(path)`, `LFS_POINTER`: a git-lfs stand-in where weights were expected, and what to say about it.
"""

from weights.digest import module_digest
from weights.errors import WeightsError
from weights.hub import DEFAULT_MODEL, DEFAULT_TOKENIZER, hub_repo, resolve
from weights.pickles import LFS_POINTER, is_lfs_pointer, torch_load

__all__ = ["DEFAULT_MODEL", "DEFAULT_TOKENIZER", "LFS_POINTER", "WeightsError", "hub_repo", "is_lfs_pointer", "module_digest",
           "resolve", "torch_load"]
