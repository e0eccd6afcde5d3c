"""`PackedLinear`: a drop-in for `nn.Linear` that keeps only the stored (packed) tensors.

The buffers are exactly `QuantizedWeight.tensors` (same names), so a state dict of a compressed
model holds the packed form. `forward` rebuilds the weight with torch ops on the buffers' device
and calls `F.linear` in the input dtype; the dense weight is cached only when `cache_dequantized` is
set, or the layer is small (under `SMALL_WEIGHTS`: rebuilding it per call would cost more than its
matmul; the cache follows in-place changes of the buffers). A format's kernel may cache its own
repacked layout; every cache is dropped on `.to()` and loading.
On CPU the weight is rebuilt a slab of output rows at a time (`chunk_rows`), so the full dense
matrix never exists and the scratch buffers stay small enough to be reused by the allocator.

Extension point for fused kernels: `casp.quant.kernel_registry`, where each format declares its
kernels by device type (`register_matmul_kernel(format, device_type, fn)` adds or replaces one).
Before the generic path, `forward` offers the call to the format's kernel for x.device.type;
`fn(module, x)` returns the output, or None to decline (unsupported shape, dtype or batch), in
which case the generic dequantize + F.linear path runs. A batch-1 dequantize-matmul (e.g. Triton
on CUDA) plugs in there without touching this module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from casp.nn.base import CaspLinear
from casp.quant.base import QuantizedWeight, get_format
from casp.quant.kernel_registry import matmul_kernel

_CPU_CHUNK_ELEMENTS = 1 << 20  # ~4 MB of float32 weight per slab
SMALL_WEIGHTS = 1 << 16        # below this the dense weight (<= 256 KB in float32) is cached: rebuilding it
                               # from the codes on every call costs more than the layer's matmul


def buffers_key(module) -> tuple:
    """Identity of a module's stored buffers: storage and in-place version of each (for caches)."""
    key = []
    for name in module._tensor_names:
        t = module._buffers[name]
        try:
            version = t._version
        except RuntimeError:  # inference tensors keep no version counter
            version = -1
        key.append(t.data_ptr())
        key.append(version)
    return tuple(key)


class PackedLinear(CaspLinear, kind="packed"):
    """Linear layer whose weight lives in a packed quantized format (any registered format)."""

    def __init__(
        self,
        meta: dict,
        tensors: dict[str, torch.Tensor],
        bias: torch.Tensor | None = None,
        cache_dequantized: bool = False,
        chunk_rows: int | None = None,
    ):
        super().__init__()
        self.meta = dict(meta)
        self.in_features = int(meta["in_features"])
        self.out_features = int(meta["out_features"])
        self._tensor_names = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias shape {tuple(bias.shape)} != ({self.out_features},)")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.cache_dequantized = cache_dequantized
        # rows per dequantized slab in forward; None: automatic (slabs on CPU, whole elsewhere)
        self.chunk_rows = chunk_rows
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple = ()

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        cache_dequantized: bool = False,
        chunk_rows: int | None = None,
    ) -> PackedLinear:
        """Wrap a quantizer's output (tensors are shared, not copied)."""
        return cls(qw.meta, qw.tensors, bias=bias, cache_dequantized=cache_dequantized,
                   chunk_rows=chunk_rows)

    @classmethod
    def from_meta(
        cls, meta: dict, has_bias: bool = False, dtype: torch.dtype = torch.float32
    ) -> PackedLinear:
        """Empty module of the right buffer shapes (bias in `dtype`), to `load_state_dict` into."""
        tensors = get_format(meta["format"]).empty_tensors(meta)
        bias = torch.zeros(int(meta["out_features"]), dtype=dtype) if has_bias else None
        return cls(meta, tensors, bias=bias)

    def spec(self) -> dict:
        """The format's metadata, and whether there is a bias."""
        return {"type": self.kind, "bias": self.bias is not None, **self.meta}

    @classmethod
    def from_spec(cls, spec: dict) -> PackedLinear:
        meta = {k: v for k, v in spec.items() if k not in ("type", "bias")}
        return cls.from_meta(meta, has_bias=spec["bias"], dtype=torch.float32)

    def quantized_weight(self) -> QuantizedWeight:
        """The stored form as a `QuantizedWeight` (shares the buffers)."""
        return QuantizedWeight({n: getattr(self, n) for n in self._tensor_names}, dict(self.meta))

    def stored_bits(self) -> int:
        """Bits of the stored weight tensors (bias not included), as `QuantizedWeight.stored_bits`."""
        return self.quantized_weight().stored_bits()

    def dense_weight(self) -> torch.Tensor:
        """The float32 weight (out, in) rebuilt from the buffers, on their device."""
        return self.quantized_weight().dequantize()

    def dense_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.detach()

    def _weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        small = self.out_features * self.in_features < SMALL_WEIGHTS
        cache = self._cache
        if cache is not None and cache.dtype == dtype and (not small or self._cache_key == buffers_key(self)):
            return cache
        w = self.dense_weight().to(dtype)
        if self.cache_dequantized or small:
            self._cache, self._cache_key = w, buffers_key(self)
        return w

    def clear_cache(self) -> None:
        """Drop the dequantized weight and any kernel's repacked layout (`_kernel_cache`)."""
        self._cache = None
        self.__dict__.pop("_kernel_cache", None)

    def _apply(self, fn, *args, **kwargs):
        """.to()/.cuda()/.half() move the stored tensors but never change their dtypes (a model-wide
        .to(bfloat16) must not round the fp16 scales); the bias converts as usual."""
        self.clear_cache()
        before = {n: self._buffers[n] for n in self._tensor_names}
        out = super()._apply(fn, *args, **kwargs)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def _slab_rows(self, device: torch.device) -> int:
        if self.chunk_rows is not None:
            return max(1, self.chunk_rows)
        if device.type == "cpu":
            return max(32, _CPU_CHUNK_ELEMENTS // max(1, self.in_features) // 32 * 32)
        return self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = matmul_kernel(self.meta["format"], x.device.type)
        if kernel is not None:
            y = kernel(self, x)
            if y is not None:
                return y
        b = self.bias.to(x.dtype) if self.bias is not None else None
        step = self._slab_rows(x.device)
        if self.cache_dequantized or step >= self.out_features or self.out_features * self.in_features < SMALL_WEIGHTS:
            return F.linear(x, self._weight_as(x.dtype), b)
        read = get_format(self.meta["format"]).rows(self.quantized_weight())
        y = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, step):
            end = min(start + step, self.out_features)
            w = read(start, end).to(x.dtype)
            y[..., start:end] = F.linear(x, w, None if b is None else b[start:end])
        return y

    def extra_repr(self) -> str:
        m = self.meta
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"bias={self.bias is not None}", f"format={m['format']}"]
        for key in ("bits", "group_size", "sym"):
            if key in m:
                parts.append(f"{key}={m[key]}")
        return ", ".join(parts)
