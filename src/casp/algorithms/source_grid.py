"""Does a weight matrix already lie on a k-bit grid with groups of g? (weights dequantized from GGUF and the like)

Checkpoints converted from a quantized file (GGUF Q4_0/Q4_1 by 32, Q5_0/Q8_0 by 32, Q4_K/Q5_K by 32
within 256, Q6_K by 16 within 256) hold weights where each group of g consecutive input columns of a
row takes values c + step·q with integer q in [0, 2^k). A candidate setting that reproduces such a grid
measures almost no error, for that reason alone; the allocator must not be told so.

A group fits k bits when its values, less their minimum, are integer multiples of their smallest
positive gap, the largest multiple below 2^k. A matrix lies on (k, g) when at least `share` of its
groups fit k bits: a group whose levels leave gaps with a common divisor below the smallest gap fails
the test, so a few groups of a real grid can miss.
"""
from __future__ import annotations

import math

import torch

GROUP_SIZES = (256, 128, 64, 32, 16)
MAX_BITS = 8


def group_bits(w: torch.Tensor, group_size: int, *, tol: float = 1e-3) -> torch.Tensor:
    """Bits each (row, group) of `w` needs as a uniform grid (`inf` where its values are on none).

    Groups are cut along the last dim from column 0; trailing columns that fill no whole group are
    ignored. A group with a single distinct value needs 0 bits.
    """
    w = w.detach().to(torch.float64)
    groups = w.shape[-1] // group_size
    if groups == 0:
        return torch.empty(0, dtype=torch.float64)
    g = w[..., : groups * group_size].reshape(-1, group_size).sort(dim=-1).values
    gaps = g[:, 1:] - g[:, :-1]
    scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    positive = gaps > scale * 1e-6
    step = torch.where(positive, gaps, torch.full_like(gaps, math.inf)).amin(dim=-1, keepdim=True)
    flat = ~positive.any(dim=-1)
    q = (g - g[:, :1]) / torch.where(flat.unsqueeze(-1), torch.ones_like(step), step)
    on_grid = ((q - q.round()).abs() <= tol).all(dim=-1) | flat
    levels = q[:, -1].round()
    bits = torch.where(levels > 0, torch.log2(levels + 1).ceil(), torch.zeros_like(levels))
    return torch.where(on_grid, bits, torch.full_like(bits, math.inf))


def detect_grid(w: torch.Tensor, *, share: float = 0.9) -> tuple[int, int] | None:
    """(bits, group size) of the coarsest grid `w` lies on, else None.

    The largest group size of `GROUP_SIZES` on which at least `share` of the groups fit at most
    `MAX_BITS` bits wins; its bits are the `share`-quantile of the groups' bits.
    """
    if w.dim() != 2:
        return None
    for g in GROUP_SIZES:
        bits = group_bits(w, g)
        if bits.numel() == 0:
            continue
        k = bits.sort().values[max(math.ceil(share * bits.numel()) - 1, 0)].item()
        if k <= MAX_BITS:
            return int(max(k, 1)), g
    return None
