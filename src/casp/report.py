"""The compression report: honest bit accounting, per-layer decisions and why, and plots."""
from __future__ import annotations

import json
from pathlib import Path


def build_report(*, recipe, source, adapter, layer_reports, seconds, peak_rss_mb, peak_device_mb,
                 calibration_batches, calibration_tokens) -> dict:
    units = [u for lr in layer_reports for u in lr["units"]]
    stored_bits = sum(u["stored_bits"] for u in units)
    weights = sum(u["num_weights"] for u in units)
    tuned = [lr["finetune"] for lr in layer_reports if "finetune" in lr]
    return {
        "casp_version": __import__("casp").__version__,
        "source": str(source),
        "family": adapter.family,
        "recipe": recipe.to_dict(),
        **({"excluded_candidates": {"settings": list(recipe.excluded_candidates),
                                    "why": recipe.reasons["excluded_candidates"]}} if recipe.excluded_candidates else {}),
        "average_bits": stored_bits / weights if weights else 0.0,
        "stored_bits": stored_bits,
        "stored_bytes": stored_bits // 8,
        "original_weights": weights,
        "layers": units,
        "decoder_layers": [{k: v for k, v in lr.items() if k != "units"} for lr in layer_reports],
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb,
        "peak_device_mb": peak_device_mb,
        "calibration": {"batches": calibration_batches, "tokens": calibration_tokens},
        **({"finetune": _finetune_total(tuned)} if tuned else {}),
        "accounting": "average_bits = stored bits of every compressed language-model linear (packed codes, "
                      "fp16 scales, packed zeros, codebooks, transform parameters, low-rank factors) / weights those linears had before compression; "
                      "biases, norms, embeddings, lm_head, vision tower and projector are kept in fp16 and not counted",
    }


def _finetune_total(entries: list[dict]) -> dict:
    """--finetune-steps over the run: layer-output MSEs summed over layers, layers improved, seconds."""
    return {"steps": entries[0]["steps"], "layers": len(entries), "layers_improved": sum(e["kept"] for e in entries),
            "mse_before": sum(e["mse_before"] for e in entries), "mse_after": sum(e["mse_after"] for e in entries),
            "seconds": sum(e["seconds"] for e in entries)}


def _layer_bits(report) -> list[float]:
    """Stored bits per original weight of each reported decoder layer, in report order."""
    bits = {lr["index"]: 0 for lr in report["decoder_layers"]}
    weights = dict(bits)
    for u in report["layers"]:
        i = u["layer"]
        bits[i] += u["stored_bits"]
        weights[i] += u["num_weights"]
    return [bits[i] / weights[i] if weights[i] else 0.0 for i in bits]


def write_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["decoder_layers"]
    idx = [lr["index"] for lr in layers]
    made = []
    for fname, ys, ylabel, series in (
        ("bits_per_layer.png", [_layer_bits(report)], "stored bits / original weight", ["average"]),
        ("rank_per_layer.png", [[lr["rank_q"] for lr in layers], [lr["rank_k"] for lr in layers]], "rank", ["W_q", "W_k"]),
        ("density_per_layer.png", [[lr["density"] for lr in layers]], "attention density", ["mean over heads"]),
    ):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for y, label in zip(ys, series):
            ax.plot(idx, y, marker="o", label=label)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        made.append(fname)
    return made


def _fmt(v, spec=".4f"):
    return "–" if v is None else format(v, spec)


def _excluded_lines(report: dict) -> list[str]:
    ex = report.get("excluded_candidates")
    if not ex:
        return []
    return [f"Candidates left out: {', '.join(ex['settings'])} ({ex['why']}).", ""]


def _check_lines(report: dict) -> list[str]:
    c = report.get("baseline_check")
    if not c:
        return []
    if "skipped" in c:
        return [f"Baseline check: skipped ({c['skipped']}).", ""]
    return [f"Baseline check on {c['samples']} held-out samples: KL(FP ‖ model) {c['allocation_kl']:.4g} allocated, "
            f"{c['uniform_kl']:.4g} uniform {c['uniform_setting']} ({c['uniform_bits']:.4f} bits{_check_inputs(c)}); kept the "
            f"{c['kept']} model ({c['seconds']:.1f} s, {100 * c['share_of_run']:.0f} % of the run).", ""]


def _check_inputs(c: dict) -> str:
    """How the uniform layers were calibrated (absent from reports written before `--check-inputs`)."""
    if c.get("inputs") == "shared":
        return f", calibrated on the allocated run's inputs, {c['reused_units']} matrices reused"
    if "shared_uniform_kl" in c:
        return f", calibrated on its own inputs after {c['shared_uniform_kl']:.4g} on the allocated run's"
    return ", calibrated on its own inputs" if c.get("inputs") == "own" else ""


def _damage_lines(report: dict) -> list[str]:
    scales = report.get("layer_scales")
    if not scales:
        return []
    values = [s for points in scales.values() for _, s in points]
    trust = report.get("layer_scale_trust") or {}
    kept = "; share of their spread kept over sample noise: " + ", ".join(
        f"{label} {share:.2f}" for label, share in trust.items()) if trust else ""
    by_type = ""
    if report.get("type_scales"):
        by_type = "; by projection type " + ", ".join(f"{m.split('.')[-1]} {f:.3g}" for m, f in report["type_scales"].items())
        shares = report.get("type_scale_trust") or {}
        by_type += f" (spread kept {', '.join(f'{v:.2f}' for v in shares.values())}; `type_scales`)" if shares else ""
    return [f"Damage: each layer's estimate scaled to the held-out KL the layer causes at its probe setting "
            f"(scales {min(values):.3g} to {max(values):.3g} over {len(scales)} layers{kept}; `layer_scales`)"
            f"{by_type}.", ""]


def render_markdown(report: dict, plots: list[str]) -> str:
    cfg = report["recipe"]
    lines = [
        "# casp compression report",
        "",
        f"- source: `{report['source']}` ({report['family']})",
        f"- quantizer: {cfg['quantizer']}, target {cfg['bits']} bits, allocation {cfg['allocation']}, "
        f"Q/K rank {cfg['qk_rank']}",
        f"- **average bits: {report['average_bits']:.4f}** over {report['original_weights']:,} original weights; "
        f"stored {report['stored_bytes'] / 2**20:.3f} MiB",
        f"- time {report['seconds']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB, calibration "
        f"{report['calibration']['batches']} batches / {report['calibration']['tokens']} tokens",
        *([f"- fine-tuning: {ft['steps']} steps per layer, layer-output MSE summed over {ft['layers']} layers "
             f"{ft['mse_before']:.4g} -> {ft['mse_after']:.4g} ({ft['layers_improved']} improved), {ft['seconds']:.0f} s"]
          if (ft := report.get("finetune")) else []),
        "",
        report["accounting"] + ".",
        "",
        *_excluded_lines(report),
        *_damage_lines(report),
        *_check_lines(report),
        "## Per decoder layer",
        "",
        "Density: per head and query row, the fraction of visible keys needed to hold "
        f"{cfg['density_mass']:.0%} of the attention mass, averaged. Map MSE and row L1: error of the attention "
        "map after low-rank Q/K on the calibration inputs; bound: our upper bound on the row L1 error (docs/theory.md).",
        "",
        "| layer | density | rank q | rank k | map MSE | MSE bound | row L1 | L1 bound | bits/weight |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lr, b in zip(report["decoder_layers"], _layer_bits(report)):
        lines.append(f"| {lr['index']} | {lr['density']:.3f} | {lr['rank_q']} | {lr['rank_k']} | "
                     f"{_fmt(lr['attn_map_mse'], '.3e')} | {_fmt(lr.get('attn_map_mse_bound'), '.3e')} | "
                     f"{_fmt(lr['attn_row_l1'], '.4e')} | {_fmt(lr['attn_bound_l1'], '.4e')} | {b:.3f} |")
    lines += [
        "",
        "## Per matrix",
        "",
        "Why: with `rd` allocation each matrix's candidate is chosen to minimise the total Fisher-weighted "
        "output distortion (column `distortion`, measured at the chosen setting) under the bit budget.",
        "",
        "| matrix | setting | rank | stored bits/weight | distortion |",
        "|---|---|---|---|---|",
    ]
    for u in report["layers"]:
        lines.append(f"| `{u['name']}` | {u['setting']} | {u['rank']} | "
                     f"{u['stored_bits'] / max(u['num_weights'], 1):.3f} | {_fmt(u.get('distortion'), '.3e')} |")
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)


def recipe_json(data: dict) -> str:
    """The text of recipe.json for a recipe's `to_dict()` data (one format for the file and `Recipe.to_json`)."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_report(report: dict, out: Path) -> None:
    """report.json, report.md, the plots, and recipe.json (the run's recipe, verbatim)."""
    out = Path(out)
    (out / "recipe.json").write_text(recipe_json(report["recipe"]))
    plots = write_plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "report.md").write_text(render_markdown(report, plots))
