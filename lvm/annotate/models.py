"""The transformers models behind depth, normals and segmentation: loading, identity, batched inference.

An `AutoModelForDepthEstimation` checkpoint of a type in `METRIC_DEPTH`, `INVERSE_DEPTH` or `EITHER_DEPTH`
(Depth Anything V2, DPT, ZoeDepth, GLPN, ...), and any `AutoModelForNormalEstimation` and
`AutoModelForSemanticSegmentation` / `AutoModelForUniversalSegmentation` (SegFormer, Mask2Former, ...) checkpoint
whose forward takes images alone works (OneFormer, which also wants text task inputs, is refused), with its own
image processor. The processors run in the DataLoader workers (`preprocess`), the models
in the main process on `cuda:LOCAL_RANK` in float32 (TF32 matmuls): depth precision matters, since normals
come from its gradients.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import Tensor

import weights
from lvm.annotate import AnnotateError
from lvm.annotate.render import fill_depth_holes, nearness
from weights import module_digest

Role = Literal["depth", "normals", "segmentation"]

# What `predicted_depth` means, per model type: nothing in a config says it (but Depth Anything's
# depth_estimation_type), and a wrong guess silently inverts every depth map, so other types are refused.
METRIC_DEPTH = frozenset({"glpn", "tipsv2_dpt", "zoedepth"})  # distance (far = large)
INVERSE_DEPTH = frozenset({"dpt", "depth_pro"})  # inverse depth (near = large; Depth Pro's post-processing, unused, inverts it)
EITHER_DEPTH = frozenset({"depth_anything", "prompt_depth_anything"})  # by config.depth_estimation_type


@dataclass
class Model:
    """A loaded model with its processor; `identity` enters the fingerprint of every output it makes."""

    role: Role
    name: str  # as given: a local folder or a hub id
    model: torch.nn.Module
    processor: Any
    identity: dict
    legacy_identity: dict  # the identity fingerprints of versions before 2026-12-07 held


def model_flag(role: str) -> str:
    """The command-line flag that names the model of `role` (segmentation's is the short `--seg-model`)."""
    return "--seg-model" if role == "segmentation" else f"--{role}-model"


def _auto_classes(role: str) -> list:
    try:
        import transformers
    except ImportError:
        raise AnnotateError(f"{model_flag(role)} needs transformers: pip install -e '.[annotate]'") from None

    names = {
        "depth": ["AutoModelForDepthEstimation"],
        "normals": ["AutoModelForNormalEstimation"],
        "segmentation": ["AutoModelForSemanticSegmentation", "AutoModelForUniversalSegmentation"],
    }[role]
    classes = [getattr(transformers, n) for n in names if hasattr(transformers, n)]
    if not classes:
        raise AnnotateError(f"{model_flag(role)} needs a transformers with {names[0]} (installed: {transformers.__version__})")
    return classes


def load(role: str, name: str, device: torch.device) -> Model:
    """The model and image processor of a local folder or hub id; one-line error when it cannot be loaded.

    `weights.resolve` maps `name` to a folder first, as for --model and --tokenizer: a path that does not exist
    is said to be missing at once, and a hub id comes from the Hugging Face cache (HF_HUB_OFFLINE=1 works with
    models fetched before) with the same offline advice."""
    classes = _auto_classes(role)
    folder = weights.resolve(name, model_flag(role))
    from transformers import AutoImageProcessor
    from transformers.utils import logging

    logging.disable_progress_bar()
    errors = []
    for auto in classes:
        try:
            model = auto.from_pretrained(folder)
            break
        # not found, offline, not this kind of model, or damaged weights (a truncated safetensors file)
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            errors.append(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    else:
        raise AnnotateError(f"{name}: cannot load a {role} model ({errors[-1][:300]})")
    needs = [p.name for p in inspect.signature(model.forward).parameters.values() if p.name != "pixel_values"
             and p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if needs:  # `predict` gives pixel_values alone (OneFormer also wants task_inputs from a text processor)
        raise AnnotateError(f"{name}: {type(model).__name__} needs {', '.join(needs)} besides pixel_values, which "
                            f"annotate does not give; use a model that takes images alone")
    try:
        processor = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise AnnotateError(f"{name}: no image processor for the {role} model ({str(error).splitlines()[0][:300]})") from None
    if role == "normals" and not hasattr(processor, "post_process_normal_estimation"):
        raise AnnotateError(f"{name}: its image processor has no post_process_normal_estimation")
    if role == "depth":
        is_metric(model.config, name)  # an unknown type is refused before any work
    if role == "segmentation" and not hasattr(processor, "post_process_semantic_segmentation"):
        raise AnnotateError(f"{name}: its image processor has no post_process_semantic_segmentation")
    model = model.to(device).eval()
    # What decides the maps, not where the model was found: the same weights under another path or as a hub id
    # keep every complete output (the config records the path it was loaded from as `_name_or_path`).
    config = json.loads(model.config.to_json_string(use_diff=False))
    processor_json, weights_digest = json.loads(processor.to_json_string()), module_digest(model)
    identity = {
        "config": {key: value for key, value in config.items() if key != "_name_or_path"},
        "processor": processor_json,
        "weights": weights_digest,
    }
    # How versions before 2026-12-07 identified the same model, path included: their complete outputs stay complete
    # when the model is given as it was then (recomputing them would cost as much GPU time as making them).
    legacy = {"name": name, "config": config, "processor": processor_json, "weights": weights_digest}
    return Model(role, name, model, processor, identity, legacy)


def preprocess(processor: Any, squares: list[np.ndarray]) -> Tensor:
    """The processor's pixel_values of a batch of uint8 [S, S, 3] images (in a DataLoader worker).

    Images are squashed to squares first, so every processor (fixed size, aspect-keeping or shortest-edge)
    gives one tensor shape per batch; predictions are resized back to each image's own size.
    """
    return processor(images=squares, return_tensors="pt")["pixel_values"]


def is_metric(config: Any, name: str) -> bool:
    """Whether a depth model of this config predicts distance rather than inverse depth; AnnotateError for a
    model type not in the tables above."""
    kind = config.model_type
    if kind in EITHER_DEPTH:
        return getattr(config, "depth_estimation_type", "relative") == "metric"
    if kind in METRIC_DEPTH | INVERSE_DEPTH:
        return kind in METRIC_DEPTH
    supported = ", ".join(sorted(METRIC_DEPTH | INVERSE_DEPTH | EITHER_DEPTH))
    raise AnnotateError(f"{name}: depth model type {kind!r} is not supported: whether it predicts distance or "
                        f"inverse depth is unknown (supported: {supported})")


@torch.inference_mode()
def predict(model: Model, pixel_values: Tensor, sizes: list[tuple[int, int]]) -> list[Tensor]:
    """One batch through one model; per image at its (height, width), on the model's device:
    depth -> nearness [H, W] in [0, 1]; normals -> unit vectors [3, H, W]; segmentation -> label ids [H, W]."""
    device = next(model.model.parameters()).device
    outputs = model.model(pixel_values=pixel_values.to(device, non_blocking=True))
    if model.role == "segmentation":
        return model.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
    if model.role == "normals":
        post = model.processor.post_process_normal_estimation
        # Processors that pad (Sapiens2) crop the padding only when told the size they were given: the square.
        squares = {"source_sizes": [(max(size),) * 2 for size in sizes]}
        extra = squares if "source_sizes" in inspect.signature(post).parameters else {}
        results = post(outputs, target_sizes=sizes, **extra)
        return [F.normalize(r["normals"].float(), dim=0) for r in results]
    metric = is_metric(model.model.config, model.name)
    if metric:
        outputs.predicted_depth = fill_depth_holes(outputs.predicted_depth)
    post = getattr(model.processor, "post_process_depth_estimation", None)
    if post is not None and "source_sizes" in inspect.signature(post).parameters:
        # Processors that pad (ZoeDepth's reflect padding) crop it only when told the size they were given.
        results = post(outputs, source_sizes=[(max(size),) * 2 for size in sizes], target_sizes=sizes)
        return [nearness(r["predicted_depth"], metric) for r in results]
    depth = outputs.predicted_depth
    depth = depth if depth.dim() == 4 else depth[:, None]
    return [
        nearness(F.interpolate(d[None].float(), size=size, mode="bilinear", align_corners=False)[0, 0], metric)
        for d, size in zip(depth, sizes)
    ]
