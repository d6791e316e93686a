"""Pseudo-annotations for paired and multi-task sentences (`python -m lvm.annotate`).

The paper's annotation data (depth, surface normals, edges, segmentation made by off-the-shelf models) was
never published; this command makes it from the user's own images. Modules, in the order data flows:
`lvm.tokenize.sources` and `lvm.tokenize.decode` (the same inputs, units and skip reasons as the tokenize
step), `render` (pure functions: working size, Canny edges, depth -> image, normals from depth, PNG
encoding), `models` (transformers depth, normal and segmentation models, batched), `writer` (outputs keyed
like their images, atomic, resumable), `pipeline` (ranks, DataLoader workers, progress). The layout written
is documented in docs/FORMATS.md.
"""


from common.errors import UserError


class AnnotateError(UserError):
    """A problem with the user's inputs, options or models, printed as one line by the CLI (exit 2)."""


TASKS = ("edges", "depth", "normals", "segmentation")

__all__ = ["TASKS", "AnnotateError"]
