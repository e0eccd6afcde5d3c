"""Bytes on disk of the compressed decoder linears of a saved model: what the report's bits must equal."""
from __future__ import annotations

from pathlib import Path

from safetensors import safe_open


def linear_bytes_on_disk(out: Path) -> int:
    """Every stored tensor of a decoder-layer projection (packed codes, scales, factors, transforms), no biases."""
    total = 0
    for f in Path(out).glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                if ".layers." in key and "_proj." in key and not key.endswith(".bias"):
                    t = st.get_tensor(key)
                    total += t.numel() * t.element_size()
    return total
