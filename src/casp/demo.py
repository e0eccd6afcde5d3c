"""`casp demo`: the main job end to end on the embedded model, measured in one run.

FP, RTN, GPTQ and CASP+GPTQ at 2.0 and 3.0 target bits, plus, at the uniform GPTQ row's
measured bits, the allocation alone (no low-rank Q/K) and full CASP, each evaluated on the
same held-out questions; writes report.md, report.json and plots into the output directory.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import replace
from pathlib import Path

from casp.config import CompressionConfig
from casp.embedded import EMBEDDED_MODEL_DIR
from casp.errors import CaspError
from casp.io.storage import atomic_dir

log = logging.getLogger(__name__)

DEMO_QUESTIONS = 600
DEMO_CAPTIONS = 100
DEMO_KL = 200
CALIB_SAMPLES = 128
KL_PLOT = "kl_vs_bits.png"


def demo_configs(seed: int) -> list[tuple[str, CompressionConfig]]:
    rows = []
    for bits in (2.0, 3.0):
        b = int(bits)
        common = dict(bits=bits, seed=seed, calib_samples=CALIB_SAMPLES)
        rows += [
            (f"RTN {b}-bit g128", CompressionConfig(quantizer="rtn", allocation="uniform", qk_rank=0, **common)),
            (f"GPTQ {b}-bit g128", CompressionConfig(quantizer="gptq", allocation="uniform", qk_rank=0, **common)),
            ("CASP+GPTQ", CompressionConfig(quantizer="gptq", allocation="rd", qk_rank="joint", **common)),
        ]
    return rows


def _table(rows: list[dict]) -> str:
    head = "| method | target bits | average bits | VQA acc | caption ppl | KL vs FP | stored MB | seconds |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['target_bits'] if r['target_bits'] is not None else '–'} | {r['average_bits']:.3f} | "
            f"{r['vqa_accuracy']:.4f} | {r['caption_ppl']:.4f} | {r['kl']:.5f} | {r['stored_mb']:.3f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def method_of(row_name: str) -> str:
    """The method a demo row belongs to (one plotted line): rows that differ only in their bits share it."""
    name = row_name.removesuffix(" (= GPTQ bits)")
    uniform = re.fullmatch(r"(\S+) \d+-bit g\d+", name)
    if uniform:
        return f"uniform {uniform.group(1)}"
    if name == "GPTQ + allocation":
        return "GPTQ + allocation (no low-rank Q/K)"
    if name == "CASP+GPTQ":
        return "CASP+GPTQ (joint Q/K ranks and bits)"
    return name


def _kl_plot(rows, out: Path) -> str:
    """KL vs the FP model against measured average bits, log y, one line per method sorted by bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["method"] != "FP" and r["kl"] > 0:
            lines.setdefault(method_of(r["method"]), []).append((r["average_bits"], r["kl"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (method, pts), marker in zip(lines.items(), "s^Dov<>p*"):
        ax.plot(*zip(*sorted(pts)), marker=marker, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("measured average bits per weight")
    ax.set_ylabel("KL(FP ‖ compressed), log scale")
    ax.set_title("lower is better; FP has KL 0")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / KL_PLOT, dpi=110)
    plt.close(fig)
    return KL_PLOT


def run_demo(out: str | Path = "casp-demo", seed: int = 0, progress: bool = True) -> dict:
    from casp.eval.evaluate import embedded_eval_records, evaluate_vlm
    from casp.io.modelio import load_model, load_processor
    from casp.models.adapters import adapter_for
    from casp.pipeline import compress
    from casp.run import RunOptions
    from casp.report import render_markdown, write_plots

    out = Path(out)
    if out.exists() and not (out / "demo.json").exists():
        raise CaspError(f"{str(out)!r} exists and is not a casp demo directory; choose another -o")
    t0 = time.time()
    reference = load_model(EMBEDDED_MODEL_DIR)
    processor = load_processor(EMBEDDED_MODEL_DIR)
    vqa, captions = embedded_eval_records()
    vqa, captions = vqa[:DEMO_QUESTIONS], captions[:DEMO_CAPTIONS]
    kl_records = vqa[:DEMO_KL]

    def measure(model, method, target, avg, stored_bytes, seconds):
        res = evaluate_vlm(model, processor, reference=reference, vqa_records=vqa, caption_records=captions,
                           kl_records=kl_records, progress=False)
        row = {"method": method, "target_bits": target, "average_bits": avg, "vqa_accuracy": res["vqa_accuracy"],
               "per_type": res["per_type"], "caption_ppl": res["caption_ppl"], "kl": res["kl_vs_reference"],
               "stored_mb": stored_bytes / 1e6, "seconds": seconds}
        log.info("%-18s target %-4s avg %.3f bits  acc %.4f  ppl %.3f  KL %.5f  %.1fs", method, target, avg,
                 row["vqa_accuracy"], row["caption_ppl"], row["kl"], seconds)
        return row

    adapter = adapter_for(reference)
    fp_weights = sum(layer.get_submodule(name).weight.numel()
                     for layer in adapter.decoder_layers(reference) for name in adapter.linear_names())
    rows = [measure(reference, "FP", None, 16.0, fp_weights * 2, 0.0)]
    casp_reports = {}
    cache: dict = {}
    configs = demo_configs(seed)
    while configs:
        method, cfg = configs.pop(0)
        t = time.time()
        result = compress(None, None, cfg, progress=progress, options=RunOptions(cache=cache))
        seconds = time.time() - t
        r = result.report
        rows.append(measure(result.model, method, cfg.bits, r["average_bits"], r["stored_bytes"], seconds))
        if method.startswith("CASP") and cfg.bits in (2.0, 3.0):
            casp_reports[cfg.bits] = r
        if cfg.quantizer == "gptq" and cfg.allocation == "uniform":
            # the same honest bits as the uniform GPTQ row just measured
            equal = round(r["average_bits"], 4)
            configs[:0] = [
                ("GPTQ + allocation (= GPTQ bits)", replace(cfg, bits=equal, allocation="rd", qk_rank=0)),
                ("CASP+GPTQ (= GPTQ bits)", replace(cfg, bits=equal, allocation="rd", qk_rank="joint")),
            ]
    with atomic_dir(out) as tmp:
        plot = _kl_plot(rows, tmp)
        detail = casp_reports[2.0]
        plots = write_plots(detail, tmp)
        (tmp / "casp_2bit_report.md").write_text(render_markdown(detail, plots))
        table = _table(rows)
        payload = {"rows": rows, "seconds": time.time() - t0, "table": table, "casp_report_2bit": detail,
                   "casp_report_3bit": casp_reports[3.0]}
        (tmp / "report.json").write_text(json.dumps(payload, indent=2, default=str))
        (tmp / "demo.json").write_text(json.dumps({"rows": rows}, indent=2, default=str))
        (tmp / "report.md").write_text("\n".join([
            "# casp demo: the embedded tiny LLaVA", "",
            f"Measured in one run (seed {seed}) on {len(vqa)} held-out test questions, {len(captions)} captions; "
            f"KL vs FP on {len(kl_records)} answers. Average bits count every stored bit of the compressed "
            "language-model linears (codes, scales, zeros, low-rank factors) over their original weight count.", "",
            table, "", f"![KL vs FP against measured bits, one line per method]({plot})", "",
            "Per-layer detail of CASP+GPTQ at 2.0 bits: [casp_2bit_report.md](casp_2bit_report.md)", "",
            *[f"![{p}]({p})" for p in plots], "",
        ]))
    return {"rows": rows, "table": table, "out": str(out), "seconds": time.time() - t0}
