"""Dense bf16 peak FLOP/s of GPUs (datasheets, without sparsity): what MFU is measured against.

One table for the training log (`lvm.callbacks.TokenThroughput`) and every benchmark, so that a run and a
benchmark on the same card never report against different limits. Lightning's `get_available_flops` is not
used: it lists some cards with sparsity (2x the dense peak) and the H200 only under names the driver does not
report. Names are matched longest first, so the NVL and PCIe cards are not taken for the SXM ones ("NVIDIA H100
80GB HBM3", "NVIDIA H200").
"""

from __future__ import annotations

import torch

DENSE_BF16_FLOPS = {
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H200 NVL": 835e12,
    "H200": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def dense_bf16_peak(device: torch.device) -> float | None:
    """The card's dense bf16 FLOP/s; None on a CPU or an unlisted GPU (no utilisation figure then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((DENSE_BF16_FLOPS[key] for key in sorted(DENSE_BF16_FLOPS, key=len, reverse=True) if key in name), None)
