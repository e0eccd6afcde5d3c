"""CASP step 1 measured: whitened vs plain SVD of W_q/W_k, accuracy after low-rank only, uniform vs auto ranks.

Prints three tables from one run:
1. relative error of the attention logits X W_q (X W_k)ᵀ at the same rank, whitened vs plain SVD,
   on random correlated data and on every layer of the embedded model (calibration inputs);
2. embedded-model VQA accuracy after the low-rank step alone (no quantization) at ratios 0.5/0.25/0.125;
3. uniform 0.25 vs auto ranks at the same total parameter budget.

Usage: python benchmarks/lowrank_qk.py [--questions N] [--seed S]
"""
from __future__ import annotations

import argparse
import time

import torch

from casp.models.adapters import adapter_for
from casp.data.calibration import task_batches
from casp.config import CompressionConfig
from casp.embedded import EMBEDDED_MODEL_DIR
from casp.models.engine import capture_layer0_inputs, record_attention_inputs, run_layer
from casp.eval.evaluate import embedded_eval_records
from casp.eval.vqa import vqa_accuracy
from casp.algorithms.lowrank import plain_lowrank, rank_for_ratio, whitened_lowrank
from casp.io.modelio import load_model, load_processor
from casp.pipeline import compress


def _logits(x, wq, wk, head_dim):
    """Per-head q kᵀ (before RoPE), kv heads repeated for grouped-query attention: [heads, t, t]."""
    t = x.shape[0]
    q = (x @ wq.T).view(t, -1, head_dim).transpose(0, 1)
    k = (x @ wk.T).view(t, -1, head_dim).transpose(0, 1)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    return q @ k.transpose(1, 2)


def logit_error(x, wq, wk, q2, k2, head_dim=32) -> float:
    ref = _logits(x, wq, wk, head_dim)
    return float((_logits(x, q2, k2, head_dim) - ref).norm() / ref.norm())


def compare(x, wq, wk, ratio):
    xtx = (x.T @ x).double()
    rq, rk = rank_for_ratio(*wq.shape, ratio), rank_for_ratio(*wk.shape, ratio)
    out = {}
    for name, fn in (("whitened", lambda w, r: whitened_lowrank(w, xtx, r)), ("plain", lambda w, r: plain_lowrank(w, r))):
        aq, bq = fn(wq, rq)
        ak, bk = fn(wk, rk)
        out[name] = logit_error(x, wq, wk, aq @ bq, ak @ bk)
    return out


def random_case(seed: int, ratio: float):
    g = torch.Generator().manual_seed(seed)
    n, t = 256, 512
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)
    x = torch.randn(t, n, generator=g) @ mix.T
    wq = torch.randn(256, n, generator=g) / n**0.5
    wk = torch.randn(64, n, generator=g) / n**0.5
    return compare(x, wq, wk, ratio)


def embedded_layer_inputs(n_samples: int, seed: int):
    model = load_model(EMBEDDED_MODEL_DIR)
    processor = load_processor(EMBEDDED_MODEL_DIR)
    adapter = adapter_for(model)
    batches = task_batches(processor, EMBEDDED_MODEL_DIR, n_samples, seed)
    inputs = capture_layer0_inputs(model, adapter, batches)
    per_layer = []
    for layer in adapter.decoder_layers(model):
        sink = []
        with record_attention_inputs(layer, adapter, sink, max_tokens=10**9):
            outs = run_layer(layer, inputs)
        x = torch.cat([s[0].reshape(-1, s[0].shape[-1]) for s in sink]).float()
        per_layer.append((x, layer.self_attn.q_proj.weight.data, layer.self_attn.k_proj.weight.data))
        inputs.hidden = outs
    return per_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    print("## 1. relative error of the per-head logits X W_q (X W_k)^T (before RoPE, t=512 tokens), whitened vs plain SVD at the same rank\n")
    print("| data | ratio | whitened | plain | plain / whitened |")
    print("|---|---|---|---|---|")
    for ratio in (0.5, 0.25, 0.125):
        r = random_case(args.seed, ratio)
        print(f"| random correlated 256-d | {ratio} | {r['whitened']:.4f} | {r['plain']:.4f} | {r['plain'] / r['whitened']:.2f} |")
    layers = embedded_layer_inputs(32, args.seed)
    for ratio in (0.25,):
        for i, (x, wq, wk) in enumerate(layers):
            r = compare(x, wq, wk, ratio)
            print(f"| embedded layer {i} | {ratio} | {r['whitened']:.4f} | {r['plain']:.4f} | {r['plain'] / r['whitened']:.2f} |")

    processor = load_processor(EMBEDDED_MODEL_DIR)
    vqa, _ = embedded_eval_records()
    vqa = vqa[: args.questions]
    fp = vqa_accuracy(load_model(EMBEDDED_MODEL_DIR), processor, vqa, progress=False)
    print(f"\n## 2. VQA accuracy after low-rank Q/K alone ({len(vqa)} test questions; FP {fp['vqa_accuracy']:.4f})\n")
    print("| qk-rank | q/k params kept | average bits (fp16 factors) | VQA acc | relation acc | seconds |")
    print("|---|---|---|---|---|---|")
    for ratio in (0.5, 0.25, 0.125, "auto"):
        t = time.time()
        cfg = CompressionConfig(quantizer="none", qk_rank=ratio, seed=args.seed, calib_samples=args.calib_samples)
        res = compress(None, None, cfg, progress=False)
        secs = time.time() - t
        acc = vqa_accuracy(res.model, processor, vqa, progress=False)
        kept = sum(lr["rank_q"] * (256 + 256) + lr["rank_k"] * (256 + 64) for lr in res.report["decoder_layers"])
        total = len(res.report["decoder_layers"]) * (256 * 256 + 64 * 256)
        ranks = " ".join(f"{lr['rank_q']}/{lr['rank_k']}" for lr in res.report["decoder_layers"])
        label = f"{ratio}" if ratio != "auto" else f"auto (budget of 0.25; ranks q/k {ranks})"
        print(f"| {label} | {kept / total:.3f} | {res.report['average_bits']:.3f} | {acc['vqa_accuracy']:.4f} | "
              f"{acc['per_type'].get('relation', float('nan')):.4f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
