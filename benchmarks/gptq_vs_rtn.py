"""GPTQ vs RTN: the layer objective tr((W-Q) H (W-Q)ᵀ) at 2/3/4 bits, g128, asymmetric.

    python benchmarks/gptq_vs_rtn.py                      # synthetic correlated data
    python benchmarks/gptq_vs_rtn.py --model DIR          # also the linears of a model's first layer
    python benchmarks/gptq_vs_rtn.py --model embedded     # ... of the embedded tiny LLaVA

Losses are shown relative to tr(W H Wᵀ) (the layer's output energy), so 0.01 means the layer
output error is 1% of its energy. For a model, H is collected from the built-in calibration text
when a tokenizer and `casp.data.textdata` are available, otherwise from random token ids.
"""
from __future__ import annotations

import argparse
import re
import time

import torch
from torch import nn

from casp.quant import GPTQ, QuantSpec, get_quantizer_class, quant_loss

BITS = (2, 3, 4)


def synthetic_problem(out_f: int, in_f: int, samples: int, seed: int = 0):
    """W ~ N(0, 1/in) and H = XᵀX of inputs with correlated, log-normally scaled features."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=gen) / in_f**0.5
    x = torch.randn(samples, in_f, generator=gen) @ mix + 0.2 * torch.randn(samples, in_f, generator=gen)
    x = x * torch.exp(0.5 * torch.randn(in_f, generator=gen))
    w = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    return w, x.double().T @ x.double()


def compare(name: str, w: torch.Tensor, h: torch.Tensor, bits_list=BITS) -> None:
    """Print one line per bit-width: RTN, GPTQ, GPTQ with act-order (relative losses, seconds)."""
    energy = quant_loss(w, torch.zeros_like(w), h)
    methods = [("rtn", get_quantizer_class("rtn")()), ("gptq", GPTQ(act_order=False)),
               ("gptq+ao", GPTQ(act_order=True))]
    for bits in bits_list:
        spec = QuantSpec(bits, 128, False)
        cells = []
        for label, q in methods:
            t0 = time.perf_counter()
            _, deq = q.quantize(w, h, spec)
            dt = time.perf_counter() - t0
            cells.append((label, quant_loss(w, deq, h) / energy, dt))
        rtn = cells[0][1]
        text = "  ".join(f"{lab} {loss:.4g} ({dt:.2f}s)" for lab, loss, dt in cells)
        print(f"{name:32} {spec.label():8} {text}  gptq+ao/rtn {cells[2][1] / rtn:.2f}")


def _load_model(model_arg: str):
    if model_arg == "embedded":
        from casp.embedded import load_embedded_model, EMBEDDED_MODEL_DIR

        return load_embedded_model(), str(EMBEDDED_MODEL_DIR)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_arg, local_files_only=True)
    if hasattr(config, "vision_config"):
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(model_arg, local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_arg, local_files_only=True)
    return model.float().eval(), model_arg


def _calibration_ids(model: nn.Module, path: str, n_tokens: int) -> torch.Tensor:
    try:
        from transformers import AutoTokenizer

        from casp.data.textdata import calibration_text

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        ids = tok(calibration_text(), return_tensors="pt").input_ids[:, :n_tokens]
        if ids.shape[1] >= 16:
            return ids
    except Exception as exc:  # noqa: BLE001  (any failure: fall back to random tokens)
        print(f"(calibration text unavailable: {type(exc).__name__}; using random token ids)")
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", None) or cfg.get_text_config().vocab_size
    return torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(0))


def model_layers(model_arg: str, n_layers: int, n_tokens: int) -> None:
    """Compare on every nn.Linear of the first `n_layers` decoder layers that sees input."""
    try:
        model, path = _load_model(model_arg)
    except Exception as exc:  # noqa: BLE001  (not shipped / not a model dir: synthetic part only)
        print(f"(model part skipped: cannot load {model_arg!r}: {type(exc).__name__}: {exc})"[:300])
        return
    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    xtx: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        m = pattern.search(name)
        if isinstance(mod, nn.Linear) and m and int(m.group(1)) < n_layers and "vision" not in name:
            def hook(module, inputs, output, name=name):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                xtx[name] = xtx.get(name, 0) + x.T @ x
            hooks.append(mod.register_forward_hook(hook))
    ids = _calibration_ids(model, path, n_tokens)
    with torch.no_grad():
        for chunk in ids.split(256, dim=1):
            model(input_ids=chunk)
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    for name, h in xtx.items():
        compare(name[-32:], modules[name].weight.data.float(), h)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory, or 'embedded'")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers to compare (with --model)")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens (with --model)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print("relative loss = tr((W-Q)H(W-Q)ᵀ) / tr(W H Wᵀ); g128 asym; gptq+ao = act-order, static groups")
    for out_f, in_f in ((512, 1024), (1024, 512)):
        w, h = synthetic_problem(out_f, in_f, samples=4 * in_f)
        compare(f"synthetic {out_f}x{in_f}", w, h)
    if args.model:
        model_layers(args.model, args.layers, args.tokens)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
