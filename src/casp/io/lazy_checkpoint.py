"""Read single tensors from a (possibly sharded) safetensors checkpoint, without loading the rest.

`LazyCheckpoint(path)` indexes the tensor names of every `*.safetensors` file in a model directory
(through `model.safetensors.index.json` when present) and reads tensors on request. Each read opens
the shards it needs and closes them again: a file stays memory-mapped only while it is read, so the
pages of layers already done do not stay in the process's resident memory.
`model_key_map` matches the checkpoint's names to a model's state-dict names, undoing the legacy
renames some families apply when saving (a prefix moved between releases, and the like).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from casp.errors import CaspError

INDEX_FILE = "model.safetensors.index.json"


class LazyCheckpoint:
    """Tensor name -> file of one model directory; tensors read one at a time."""

    def __init__(self, path: str | Path):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CaspError(f"{str(self.path)!r} holds no .safetensors weights (casp streams safetensors only)")
        self.files: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as handle:
                    for key in handle.keys():
                        self.files[key] = f
                        self._shapes[key] = tuple(handle.get_slice(key).get_shape())
            except (SafetensorError, OSError) as e:
                raise CaspError(f"corrupt safetensors file {str(f)!r}: {str(e).splitlines()[0]}") from None
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                listed = json.loads(index.read_text()).get("weight_map", {})
            except (OSError, json.JSONDecodeError) as e:
                raise CaspError(f"cannot read {index}: {e}") from None
            absent = sorted(set(listed) - set(self.files))
            if absent:
                raise CaspError(f"{index} lists tensors no shard holds (e.g. {absent[0]!r}): incomplete download?")

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]

    def get_many(self, keys) -> dict[str, torch.Tensor]:
        """The tensors named `keys`, each shard opened once and closed after."""
        from safetensors import SafetensorError, safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for path, names in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in names:
                        out[name] = handle.get_tensor(name).clone()
            except (SafetensorError, OSError) as e:
                raise CaspError(f"cannot read {str(path)!r}: {str(e).splitlines()[0]}") from None
        return out


def _renamed(key: str, mapping: dict[str, str]) -> str:
    for pattern, repl in mapping.items():
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def model_key_map(model_keys: list[str], checkpoint_keys: list[str], mapping: dict[str, str] | None = None,
                  tied: set[str] = frozenset()) -> dict[str, str]:
    """Model state-dict name -> checkpoint name, for every model tensor the checkpoint holds.

    A checkpoint name is used as is, else renamed by the model's legacy `mapping` (regex -> repl),
    else matched to the one model name that ends with it or that it ends with (prefix differences
    between releases). Model tensors left without a source, other than `tied` ones, are an error.
    """
    wanted = set(model_keys)
    out: dict[str, str] = {}
    left = []
    for ck in checkpoint_keys:
        mk = ck if ck in wanted else _renamed(ck, mapping or {})
        if mk in wanted:
            out[mk] = ck
        else:
            left.append(ck)
    unmatched = [k for k in model_keys if k not in out]
    for ck in left:
        hits = [mk for mk in unmatched if mk.endswith("." + ck) or ck.endswith("." + mk)]
        if len(hits) == 1:
            out[hits[0]] = ck
            unmatched.remove(hits[0])
    missing = [k for k in unmatched if k not in tied]
    if missing:
        raise CaspError(f"the checkpoint holds no tensor for {len(missing)} model weights (e.g. {missing[0]!r})")
    return out
