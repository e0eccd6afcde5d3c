"""Random quantization problems shared by the quantizer tests: a weight and a correlated XᵀX."""
from __future__ import annotations

import torch


def weight_and_xtx(rows: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W (rows × n, unit row norm scale) and XᵀX of 2n correlated tokens with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, n, generator=g) @ torch.randn(n, n, generator=g) / n ** 0.5
    x = x * torch.exp(0.5 * torch.randn(n, generator=g))
    return torch.randn(rows, n, generator=g) / n ** 0.5, x.T @ x
