"""Step: the (uncompressed) model, its processor and adapter, the layer source and the calibration batches."""
from __future__ import annotations


from torch import nn

from casp.data.calibration import build_calibration
from casp.errors import CaspError
from casp.io.modelio import is_compressed, load_model, load_processor, model_source
from casp.models.adapters import adapter_for
from casp.models.streaming import InMemoryLayers, load_streamed


def load_parts(model, recipe, processor=None, spill_dir=None):
    """(source directory, model, processor, adapter, layer source).

    `model` is a local directory, a built-in name, None (the embedded model), or a model already
    in memory (then compressed in place; its processor is loaded from its `name_or_path` unless given).
    With `recipe.stream` only the non-layer parts are loaded; the layer source (`casp.models.streaming`)
    reads each decoder layer when the walk reaches it and spills activations into `spill_dir`.
    """
    layer_source, source = InMemoryLayers(), model_source(model)
    if isinstance(model, nn.Module):
        if recipe.stream:
            raise CaspError("--stream reads the model from its directory; it cannot compress a model in memory")
        loaded = model
    else:
        if is_compressed(source):
            raise CaspError(f"{source} is already compressed by casp; use the original model")
        if recipe.stream:
            cap = None if recipe.max_memory is None else int(recipe.max_memory * 2**30)
            loaded, layer_source = load_streamed(source, max_bytes=cap, spill_dir=spill_dir)
        else:
            loaded = load_model(source)
    processor = processor if processor is not None else load_processor(source)
    return source, loaded, processor, adapter_for(loaded), layer_source


def calibrate(run) -> list[dict]:
    """The run's calibration batches (with the search's held-out samples at the end)."""
    recipe = run.recipe
    held = recipe.search_samples if recipe.search_steps else 0
    return build_calibration(run.adapter, run.processor, run.source, n_samples=recipe.calib_samples + held,
                             seq_len=recipe.calib_seq_len, seed=recipe.seed, jsonl=recipe.calib_jsonl,
                             text_file=recipe.calib_text)
