"""The `casp` command: compress, eval, sparsity, demo, info, export-dense, generate.

Logs go to stderr; `--json` prints machine-readable results on stdout. A user mistake is
one line on stderr and exit status 2, never a traceback (`--debug` shows it).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from casp.errors import CaspError

log = logging.getLogger("casp")


def _ratio_or_auto(text: str):
    if text in ("auto", "joint"):
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio in [0, 1], 'auto' or 'joint', got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1], got {v}")
    return v


def _layer_ratio(text: str):
    try:
        layer, ratio = text.split("=")
        return int(layer), float(ratio)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER=RATIO, got {text!r}") from None


def _int_list(text: str):
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


_OPTION = "option_"


def _flag_dest(flag: str) -> str:
    return _OPTION + flag.lstrip("-").replace("-", "_")


def _option_fields(name: str):
    """(field, flag) of every option of quantizer `name` that has a CLI flag."""
    import dataclasses

    from casp.quant.base import get_quantizer_class

    return [(f, f.metadata["flag"]) for f in dataclasses.fields(get_quantizer_class(name).Config) if "flag" in f.metadata]


def _quantizer_flags(p: argparse.ArgumentParser) -> None:
    """One flag per option flag that a registered quantizer declares (field metadata "flag")."""
    from casp.quant.base import available_quantizers

    owners: dict[str, list[str]] = {}
    fields = {}
    for name in available_quantizers():
        for f, flag in _option_fields(name):
            owners.setdefault(flag, []).append(name)
            fields.setdefault(flag, f)
    for flag, f in fields.items():
        meta = f.metadata
        kw = {"dest": _flag_dest(flag), "default": argparse.SUPPRESS,
              "help": f"{meta.get('help', '')} [{', '.join(owners[flag])}]"}
        if "action" in meta:
            kw["action"] = meta["action"]
        elif isinstance(f.default, bool):
            kw["action"] = "store_true"
        else:
            kw["type"] = _int_list if meta.get("type") == "ints" else meta.get("type", str)
        p.add_argument(flag, **kw)


def _quantizer_options(args) -> dict:
    """The chosen quantizer's options given on the command line; a flag of another quantizer is an error."""
    given = {k for k in vars(args) if k.startswith(_OPTION)}
    if not given:
        return {}
    from casp.quant.base import available_quantizers

    if args.quantizer not in available_quantizers():
        if args.quantizer == "none":
            raise CaspError(f"{_flags(given)} need a quantizer, not 'none'")
        return {}
    options = {}
    for f, flag in _option_fields(args.quantizer):
        if _flag_dest(flag) in given:
            options[f.name] = getattr(args, _flag_dest(flag))
            given.discard(_flag_dest(flag))
    if given:
        raise CaspError(f"{_flags(given)} does not apply to --quantizer {args.quantizer}")
    return options


def _flags(dests) -> str:
    return ", ".join(sorted("--" + d[len(_OPTION):].replace("_", "-") for d in dests))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (calibration sampling, everything else)")
    p.add_argument("--json", action="store_true", help="print machine-readable results on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-samples", type=int, default=128, help="number of calibration samples (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per text calibration sample (default 512)")
    p.add_argument("--calib-jsonl", help='JSONL of {"image","text"} or {"image","question","answer"} records')
    p.add_argument("--calib-text", help="plain text file for text-only calibration")
    p.add_argument("--density-mass", type=float, default=0.9, help="attention mass that defines density (default 0.9)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="casp", description="CASP compression of multimodal models and LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="compress a model (default: the embedded model)")
    c.add_argument("model", nargs="?", help="local HF model directory or built-in name (default: embedded model)")
    c.add_argument("-o", "--out", required=True, help="output directory (written atomically)")
    c.add_argument("--bits", type=float, default=2.0, help="target average bits per original weight (default 2.0)")
    c.add_argument("--quantizer", default="gptq", help="a registered quantizer (gptq, rtn, ...) or none (default gptq)")
    c.add_argument("--transform", default=None, help="a registered weight transform applied before quantizing")
    c.add_argument("--incoherence", action="store_const", const="incoherence", dest="transform",
                   help="randomized Hadamard incoherence processing on both sides of W (= --transform incoherence)")
    c.add_argument("--qk-rank", type=_ratio_or_auto, default=None,
                   help="'joint' (default with rd allocation): W_q/W_k rank (dense, 1/2, 1/4, 1/8) chosen with the bits "
                        "under one budget; a ratio fixes the fraction of W_q/W_k parameters kept (0 disables; default "
                        "0.25 with --allocation paper or --quantizer none, 0 with uniform); 'auto' spreads a 0.25 budget")
    c.add_argument("--qk-rank-layer", type=_layer_ratio, action="append", default=[], metavar="LAYER=RATIO",
                   help="per-layer override of --qk-rank: a ratio <= 1 or an integer rank > 1 (repeatable)")
    c.add_argument("--allocation", default="rd", choices=["rd", "paper", "uniform"],
                   help="bit allocation: rate-distortion (default), the paper's rule, or uniform int(--bits)")
    c.add_argument("--granularity", default="layer", choices=["matrix", "layer"],
                   help="rd allocation unit: each decoder layer (default; measured better on the embedded model) or each matrix")
    _quantizer_flags(c)
    c.add_argument("--search-steps", type=int, default=0,
                   help="KL-guided search steps over the allocation, on held-out calibration samples (default 0: off)")
    c.add_argument("--search-samples", type=int, default=8, help="calibration samples held out for the search (default 8)")
    c.add_argument("--layers", type=_int_list, default=None,
                   help="compress only these decoder layers (comma-separated indices; default all)")
    c.add_argument("--device", default="cpu",
                   help="device for the heavy work (XᵀX, quantizers, measurements, sensitivity, search), one decoder "
                        "layer at a time; the model stays on the CPU (default cpu)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.add_argument("--stream", action="store_true",
                   help="read the model one decoder layer at a time from its safetensors and write each compressed "
                        "layer as it finishes (for models bigger than memory; implied by --resume / --max-memory)")
    c.add_argument("--max-memory", type=float, default=None, metavar="GB",
                   help="with --stream: GB of caught activations kept in memory (fp16) before spilling to disk")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted --stream run from OUT.partial (same options; same bytes as an "
                        "uninterrupted run)")
    _calib(c)
    _common(c)

    e = sub.add_parser("eval", help="evaluate a model (dense or compressed)")
    e.add_argument("model", nargs="?", help="model directory or built-in name (default: embedded model)")
    e.add_argument("--reference", help="reference model for KL (default: the uncompressed original when known)")
    e.add_argument("--vqa-jsonl", help='local VQA file of {"image","question","answer"} records')
    e.add_argument("--text", help="text file for token perplexity")
    e.add_argument("--context-length", type=int, default=2048, help="perplexity window (default 2048 or model max)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    e.add_argument("--device", default="cpu",
                   help="run each decoder layer on this device in turn; the model stays on the CPU (default cpu)")
    _common(e)

    s = sub.add_parser("sparsity", help="attention density per layer and head")
    s.add_argument("model", nargs="?", help="model directory or built-in name (default: embedded model)")
    s.add_argument("--qk-rank", type=_ratio_or_auto, default=0.25,
                   help="also measure the attention-map error of low-rank Q/K at this ratio and our bound (0: skip)")
    _calib(s)
    _common(s)

    d = sub.add_parser("demo", help="the main job end to end on the embedded model")
    d.add_argument("-o", "--out", default="casp-demo", help="output directory for report and plots")
    d.add_argument("--overwrite", action="store_true", default=True, help=argparse.SUPPRESS)
    _common(d)

    i = sub.add_parser("info", help="versions, supported families, built-in models; or describe a model")
    i.add_argument("model", nargs="?", help="model directory or built-in name")
    i.add_argument("--families", action="store_true",
                   help="list the supported model families: classes, what is compressed, what stays 16-bit")
    _common(i)

    x = sub.add_parser("export-dense", help="write a plain fp16 checkpoint from a compressed one")
    x.add_argument("src", help="casp-compressed model directory")
    x.add_argument("dst", help="output directory")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _common(x)

    g = sub.add_parser("generate", help="greedy answer to a prompt, decode tokens/s beside the dense model's")
    g.add_argument("model", nargs="?", help="model directory or built-in name (default: embedded model)")
    g.add_argument("--prompt", required=True, help="the prompt (a question about --image for a VLM)")
    g.add_argument("--image", help="image file for a multimodal model")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens per timed run and answer cap (default 32)")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per model; the median is reported (default 3)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    _common(g)
    return parser


def _emit(args, payload: dict, text: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        print(text)


def cmd_compress(args) -> None:
    from casp.config import CompressionConfig
    from casp.pipeline import compress

    cfg = CompressionConfig(
        bits=args.bits, quantizer=args.quantizer, qk_rank=args.qk_rank, qk_rank_overrides=dict(args.qk_rank_layer),
        quantizer_options=_quantizer_options(args), transform=args.transform,
        allocation=args.allocation, granularity=args.granularity,
        search_steps=args.search_steps, search_samples=args.search_samples,
        calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, calib_jsonl=args.calib_jsonl,
        calib_text=args.calib_text, density_mass=args.density_mass, seed=args.seed, device=args.device,
        layers=args.layers, stream=args.stream, max_memory=args.max_memory, resume=args.resume,
    )
    result = compress(args.model, args.out, cfg, overwrite=args.overwrite, progress=not args.quiet)
    r = result.report
    summary = {k: r[k] for k in ("average_bits", "stored_bytes", "original_weights", "seconds", "peak_rss_mb")}
    summary["out"] = str(result.out)
    summary["target_bits"] = cfg.bits
    excluded = r.get("excluded_candidates")
    if excluded:
        summary["excluded_candidates"] = excluded["settings"]
    note = f"; left out {', '.join(excluded['settings'])} ({excluded['why']})" if excluded else ""
    stand_in = r.get("builtin_text_defaults")
    if stand_in:
        summary["builtin_text_defaults"] = stand_in
        note += ("; calibrated on casp's built-in text, so " + ", ".join(f"{k}={v}" for k, v in stand_in.items())
                 + " (give --calib-text with your own data, or the option itself, to change it)")
    _emit(args, summary, f"wrote {result.out}: average {r['average_bits']:.4f} bits/weight (target {cfg.bits}), "
          f"{r['stored_bytes'] / 2**20:.3f} MiB stored, {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB{note}")


def cmd_eval(args) -> None:
    from casp.eval.evaluate import evaluate

    res = evaluate(args.model, reference=args.reference, vqa_jsonl=args.vqa_jsonl, text=args.text,
                   context_length=args.context_length, limit=args.limit, progress=not args.quiet,
                   device=args.device)
    lines = []
    if "vqa_accuracy" in res:
        lines.append(f"VQA exact-match accuracy: {res['vqa_accuracy']:.4f} ({res.get('n', '?')} questions)")
        for t, a in sorted(res.get("per_type", {}).items()):
            lines.append(f"  {t:10s} {a:.4f}")
    if res.get("caption_ppl") is not None:
        lines.append(f"caption perplexity (token-level): {res['caption_ppl']:.4f}")
    if res.get("kl_vs_reference") is not None:
        lines.append(f"mean KL(reference || model) of next-token distributions: {res['kl_vs_reference']:.5f}")
    if "text_ppl" in res:
        lines.append(f"text perplexity (token-level, non-overlapping windows of {res['context_length']} tokens, "
                     f"{res['tokens']} predicted tokens): {res['text_ppl']:.4f}")
    _emit(args, res, "\n".join(lines))


def cmd_sparsity(args) -> None:
    from casp.config import CompressionConfig
    from casp.analysis.sparsity import measure_sparsity

    cfg = CompressionConfig(qk_rank=args.qk_rank, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                            calib_jsonl=args.calib_jsonl, calib_text=args.calib_text, density_mass=args.density_mass,
                            seed=args.seed)
    res = measure_sparsity(args.model, cfg, progress=not args.quiet)
    lines = [f"attention density ({res['definition']})", "",
             "layer  mean    per head" + ("                         rank  map-MSE   row-L1   bound-L1" if res["qk_rank"] else "")]
    for lr in res["layers"]:
        heads = " ".join(f"{d:.2f}" for d in lr["density_per_head"])
        tail = ""
        if lr.get("attn_row_l1") is not None:
            tail = f"   {lr['rank_q']:4d}  {lr['attn_map_mse']:.2e}  {lr['attn_row_l1']:.4f}  {lr['attn_bound_l1']:.4f}"
        lines.append(f"{lr['index']:5d}  {lr['density']:.3f}   {heads}{tail}")
    lines.append(f"\nmodel mean density: {res['mean_density']:.3f}")
    _emit(args, res, "\n".join(lines))


def cmd_demo(args) -> None:
    from casp.demo import run_demo

    res = run_demo(args.out, seed=args.seed, progress=not args.quiet)
    _emit(args, res, res["table"])


def cmd_info(args) -> None:
    from casp.info import describe, families, format_families

    if args.families:
        if args.model:
            raise CaspError("give either a model or --families, not both")
        rows = families()
        _emit(args, {"families": rows}, format_families(rows))
        return
    res = describe(args.model)
    _emit(args, res, "\n".join(f"{k}: {v}" for k, v in res.items()))


def cmd_export_dense(args) -> None:
    from casp.io.storage import export_dense

    out = export_dense(args.src, args.dst, overwrite=args.overwrite)
    _emit(args, {"out": str(out)}, f"wrote dense fp16 checkpoint {out}")


def cmd_generate(args) -> None:
    from casp.generate import run_generate

    res = run_generate(args.model, args.prompt, image=args.image, max_new_tokens=args.max_new_tokens,
                       repeats=args.repeats, seed=args.seed, threads=args.threads)
    speed = (f"decode: {res['tokens_per_s']:.1f} tokens/s, dense {res['dense_tokens_per_s']:.1f} tokens/s "
             f"({res['new_tokens']} new tokens, median of {res['repeats']}, {res['threads']} thread(s); "
             f"prefill {res['prefill_s'] * 1e3:.0f} ms, dense {res['dense_prefill_s'] * 1e3:.0f} ms; "
             f"peak RSS {res['peak_rss_mb']:.0f} MB)")
    _emit(args, res, f"{res['text']}\n{speed}")


COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "sparsity": cmd_sparsity, "demo": cmd_demo,
            "info": cmd_info, "export-dense": cmd_export_dense, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not args.debug else logging.INFO)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # 5.x draws "Loading weights" bars on stderr
    try:
        COMMANDS[args.command](args)
    except CaspError as e:
        if args.debug:
            raise
        print(f"casp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("casp: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
