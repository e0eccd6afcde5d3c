"""A streamed compression's output, written layer by layer, and the state that lets it resume.

Everything goes into `OUT.partial/` beside OUT:
- `layer-NNNNN.safetensors`: decoder layer N as stored (fp16 dense parts, packed codes), written when
  the layer finishes; its casp modules, report row and tensor names in `layer-NNNNN.json`;
- `inputs-NNNNN.safetensors`: the fp16 inputs of the next layer to compress (the previous file is
  deleted once this one is complete); `plan.json`: ranks, units and bit plan; `state.json`: the options.
Every file is written under a temporary name and renamed, so a kill at any moment leaves either the
old or the new file. `--resume` continues from the next layer whose inputs are saved; because the
inputs are fp16 and each layer's work depends only on them and the seed, the output is the same
bytes as an uninterrupted run. `finish` writes the non-layer weights, the shard index, config,
processor files and report, deletes the state files and renames the directory to OUT.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from casp.errors import CaspError
from casp.io.storage import PROCESSOR_FILES, check_output_dir, module_specs, quantization_config, storage_state_dict

NOT_COMPARED = ("max_memory", "stream", "reasons")   # recipe fields that do not change the output
STATE = "state.json"
PLAN = "plan.json"
REST = "model-rest.safetensors"
INDEX = "model.safetensors.index.json"


def partial_dir(out: Path) -> Path:
    return out.parent / (out.name + ".partial")


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    _write_atomic(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class StreamWriter:
    """OUT.partial/: finished layers, the next layer's inputs, and the run's plan."""

    def __init__(self, out: str | Path, options: dict, *, resume: bool, overwrite: bool):
        options = json.loads(json.dumps({k: v for k, v in options.items() if k not in NOT_COMPARED}))
        self.out = Path(out)
        self.dir = partial_dir(self.out)
        check_output_dir(self.out, overwrite)
        state = self.dir / STATE
        if self.dir.exists():
            if not resume:
                raise CaspError(f"{str(self.dir)!r} holds an interrupted run: continue it with --resume, or delete it")
            try:
                saved = json.loads(state.read_text())
            except (OSError, json.JSONDecodeError):
                raise CaspError(f"{str(self.dir)!r} is not a casp run to resume (no readable {STATE})") from None
            if saved != options:
                changed = sorted(k for k in set(saved) | set(options) if saved.get(k) != options.get(k))
                raise CaspError(f"--resume: the run in {str(self.dir)!r} used other options ({', '.join(changed)})")
        else:
            self.dir.mkdir()
            _write_atomic(state, lambda p: p.write_text(json.dumps(options, indent=1, sort_keys=True)))

    def abandon(self) -> None:
        """After a failure: delete OUT.partial unless it holds work worth resuming (a plan or a finished layer)."""
        if self.dir.is_dir() and not (self.dir / PLAN).exists() and not any(self.dir.glob("layer-*.json")):
            shutil.rmtree(self.dir, ignore_errors=True)

    def save_plan(self, state: dict) -> None:
        """Keep the run's plan (JSON data, `casp.steps.units.plan_state`) for `--resume`."""
        _write_atomic(self.dir / PLAN, lambda p: p.write_text(json.dumps(state)))

    def saved_plan(self) -> dict | None:
        """The plan data of the run being resumed, or None."""
        path = self.dir / PLAN
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise CaspError(f"--resume: cannot read {path}; delete the partial run and start again") from None

    def resume_point(self, num_layers: int) -> tuple[int, list[torch.Tensor] | None]:
        """(first layer still to do, its saved fp16 inputs); (0, None) for a fresh run."""
        done = 0
        while done < num_layers and (self.dir / f"layer-{done:05d}.json").is_file():
            done += 1
        if done == num_layers:
            return done, None
        saved = sorted(self.dir.glob("inputs-*.safetensors"))
        if not saved:
            return 0, None
        path = saved[-1]
        start = int(path.stem.split("-")[1])
        if start > done:
            raise CaspError(f"--resume: {str(self.dir)!r} lacks finished layer {done}; delete it and start again")
        tensors = _load_tensors(path)
        return start, [tensors[f"b{j}"] for j in range(len(tensors))]

    @property
    def spill_dir(self) -> Path:
        return self.dir / "spill"

    def layer_done(self, index: int, layer: nn.Module, prefix: str, row: dict | None, next_inputs) -> None:
        """Write layer `index` as stored, then the next layer's inputs (if any; a function that makes them), then
        drop older inputs."""
        next_inputs = next_inputs() if callable(next_inputs) else next_inputs
        specs = {prefix + k: v for k, v in module_specs(layer).items()}
        stored = storage_state_dict(layer, prefix)
        _save_tensors(self.dir / f"layer-{index:05d}.safetensors", stored, {"format": "pt"})
        record = {"modules": specs, "report": row, "tensors": sorted(stored)}
        _write_atomic(self.dir / f"layer-{index:05d}.json", lambda p: p.write_text(json.dumps(record, sort_keys=True)))
        if next_inputs is not None:
            tensors = {f"b{j}": h for j, h in enumerate(next_inputs)}
            _save_tensors(self.dir / f"inputs-{index + 1:05d}.safetensors", tensors)
        for old in self.dir.glob("inputs-*.safetensors"):
            if int(old.stem.split("-")[1]) <= index:
                old.unlink()

    def layer_rows(self) -> list[dict]:
        rows = []
        for path in sorted(self.dir.glob("layer-*.json")):
            row = json.loads(path.read_text())["report"]
            if row is not None:
                rows.append(row)
        return rows

    def finish(self, result, layer_source) -> Path:
        """Write the non-layer weights (`layer_source.rest_tensors()`), index, config, processor files and the
        report of `result` (a `CompressionResult`); rename to OUT."""
        from casp.report import write_report

        rest = layer_source.rest_tensors()
        model_config, report, recipe, source = result.model.config, result.report, result.recipe, result.source
        modules, weight_map = {}, {}
        for path in sorted(self.dir.glob("layer-*.json")):
            record = json.loads(path.read_text())
            modules.update(record["modules"])
            weight_map.update({k: path.with_suffix(".safetensors").name for k in record["tensors"]})
        _save_tensors(self.dir / REST, rest, {"format": "pt"})
        weight_map.update({k: REST for k in rest})
        total = sum(p.stat().st_size for p in self.dir.glob("*.safetensors"))
        (self.dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        model_config.quantization_config = quantization_config(modules, report, recipe)
        try:
            model_config.save_pretrained(self.dir)
        finally:
            del model_config.quantization_config
        for fname in PROCESSOR_FILES:
            src = Path(source) / fname
            if src.is_file() and not (self.dir / fname).exists():
                shutil.copy2(src, self.dir / fname)
        for name in (STATE, PLAN):
            (self.dir / name).unlink(missing_ok=True)
        for path in self.dir.glob("layer-*.json"):
            path.unlink()
        report["stored_bytes_on_disk"] = total
        write_report(report, self.dir)
        if self.out.exists():
            shutil.rmtree(self.out)
        self.dir.rename(self.out)
        return self.out
