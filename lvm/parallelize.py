"""How the LVM runs on many devices, torchtitan-style: per transformer block, activation checkpointing,
then `torch.compile`, then FSDP2 (`fully_shard`); and the way back to one full copy.

Everything is applied in place, so parameter names stay `layers.N.*` whatever is on: checkpoints,
`lvm.checkpoint.load_lvm` and the Hugging Face export see the plain model. The mesh comes from
Lightning's `ModelParallelStrategy` (docs/training.md): with a 2-D mesh of (nodes, devices per node),
parameters are sharded over the devices of a node and replicated across nodes (HSDP), so the all-gathers of
every block stay inside a node; on one node that is plain full sharding.
"""

from __future__ import annotations

import torch
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lvm.model import LVM


def parallelize(
    model: LVM,
    mesh: DeviceMesh | None = None,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
) -> LVM:
    """Apply, to each Block and in this order, activation checkpointing, torch.compile and (given a mesh)
    FSDP2 sharding; then shard the rest (embedding, final norm, head) as the root unit.

    - Activation checkpointing recomputes each block's forward in the backward pass: activation memory
      drops to one block's worth plus the residual stream at block boundaries, for ~1/3 more compute.
    - Compiling block by block compiles one graph reused by every layer (same shapes), in minutes.
    - `param_dtype` (bf16 for bf16 training) is the dtype FSDP all-gathers and computes in; the sharded
      master weights, the optimizer state and the gradient reduce-scatter stay float32.
    Without a mesh (one device, DDP) only checkpointing and compilation apply.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        if activation_checkpointing:
            checkpoint(block)  # the composable form: hooks on the block, no wrapper module in the names
        if compile:
            block.compile()
        if mesh is not None:
            fully_shard(block, mesh=mesh, mp_policy=policy)
    if mesh is not None:
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 sharded the model (its parameters are DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def gather(model: LVM, device: torch.device | str) -> LVM | None:
    """A plain, unsharded copy of `model` on `device` on rank 0 (None on the other ranks); `model` itself
    if it is not sharded. Gathering is a collective: under FSDP2 every rank must call this."""
    if not is_sharded(model):
        return model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:  # full_state_dict + cpu_offload fill rank 0 only
        return None
    with torch.device("meta"):
        copy = LVM(model.cfg)
    copy.to_empty(device=device)
    copy.tie_weights()  # to_empty gives each module its own tensor
    copy.load_state_dict(state)
    copy.reset_parameters()  # the RoPE tables, which are not in the state dict
    return copy
