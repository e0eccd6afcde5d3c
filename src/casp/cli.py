"""The `casp` command: compress, eval, sparsity, demo, info, export-dense, generate.

Logs go to stderr; `--json` prints machine-readable results on stdout. A user mistake is
one line on stderr and exit status 2, never a traceback (`--debug` shows it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from casp.config import parse_ints, parse_qk_rank
from casp.errors import CaspError
from casp.threads import use_threads

log = logging.getLogger("casp")


def _parsed_by(parse):
    """An argparse type from one of `casp.config`'s parsers (their ValueError becomes argparse's error)."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


class _Renamed(argparse.Action):
    """A flag that also answers to an older name, with a one-line deprecation note when the old name is used."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string != self.option_strings[0]:
            print(f"casp: warning: {option_string} is deprecated and will be removed; use {self.option_strings[0]}",
                  file=sys.stderr)
            setattr(namespace, _ALIASES, getattr(namespace, _ALIASES, ()) + (option_string,))
        setattr(namespace, self.dest, values)


def _flag_kwargs(meta: dict, default) -> dict:
    """argparse keyword arguments of a flag described by field metadata (no default: unset flags are absent)."""
    kw = {"default": argparse.SUPPRESS}
    if "action" in meta:
        kw["action"] = meta["action"]
    elif isinstance(default, bool):
        kw["action"] = "store_true"
    if kw.get("action") in (None, "append"):
        parse = meta.get("type", str)
        kw["type"] = _parsed_by(parse_ints if parse == "ints" else parse)
    for key in ("choices", "metavar"):
        if key in meta:
            kw[key] = meta[key]
    return kw


def config_default(name: str):
    """The default of a `CompressionConfig` field (commands other than compress share some of them)."""
    from casp.config import CompressionConfig

    return CompressionConfig.__dataclass_fields__[name].default


def _config_flags(p: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """A flag per flagged `CompressionConfig` field (those in `names`, all by default), parsed into its field."""
    from casp.config import flagged_fields

    for f in flagged_fields():
        if names is not None and f.name not in names:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "" if isinstance(default, bool) or default in (None, {}) else f" (default {_shown(default)})"
        p.add_argument(f.metadata["flag"], dest=f.name, help=f.metadata["help"] + shown,
                       **_flag_kwargs(f.metadata, default))


def _shown(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def _given_config(args) -> dict:
    """The config fields given on the command line (appended pairs become a dict)."""
    from casp.config import CompressionConfig

    names = {f.name for f in dataclasses.fields(CompressionConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "qk_rank_overrides" in given:
        given["qk_rank_overrides"] = dict(given["qk_rank_overrides"])
    return given


_OPTION = "option_"
_ALIASES = "deprecated_names"


def _flag_dest(flag: str) -> str:
    return _OPTION + flag.lstrip("-").replace("-", "_")


def _option_fields(name: str):
    """(field, flag) of every option of quantizer `name` that has a CLI flag."""
    from casp.quant.base import get_quantizer_class

    return [(f, f.metadata["flag"]) for f in dataclasses.fields(get_quantizer_class(name).Config) if "flag" in f.metadata]


def _chosen_quantizer(argv: list[str] | None) -> str | None:
    """The `--quantizer` on the command line, so that help shows that quantizer's own defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv):
        if a == "--quantizer" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--quantizer="):
            return a.split("=", 1)[1]
    return None


def _quantizer_flags(p: argparse.ArgumentParser, chosen: str | None) -> None:
    """One flag per option flag that a registered quantizer declares (field metadata "flag"); a shared idea
    has one name across quantizers, each with its own default, and the older names as deprecated aliases."""
    from casp.quant.base import available_quantizers

    owners: dict[str, list[tuple[str, object]]] = {}
    fields, aliases = {}, {}
    for name in available_quantizers():
        for f, flag in _option_fields(name):
            owners.setdefault(flag, []).append((name, f.default))
            fields.setdefault(flag, f)
            aliases.setdefault(flag, []).extend(a for a in f.metadata.get("aliases", ()) if a not in aliases[flag])
    for flag, f in fields.items():
        shown = [(q, d) for q, d in owners[flag] if chosen in (None, q)] or owners[flag]
        defaults = "; ".join(f"{q}: default {_shown(d)}" if not isinstance(d, bool) else q for q, d in shown)
        kw = {"dest": _flag_dest(flag), **_flag_kwargs(f.metadata, f.default),
              "help": f"{f.metadata.get('help', '').split(' (default')[0]} [{defaults}]"}
        if aliases[flag]:
            kw["action"] = _Renamed
        p.add_argument(flag, *aliases[flag], **kw)


def _quantizer_options(args) -> dict:
    """The chosen quantizer's options given on the command line; a flag of another quantizer is an error."""
    given = {k for k in vars(args) if k.startswith(_OPTION)}
    if not given:
        return {}
    from casp.quant.base import available_quantizers

    quantizer = getattr(args, "quantizer", config_default("quantizer"))
    if quantizer not in available_quantizers():
        if quantizer == "none":
            raise CaspError(f"{_flags(given)} need a quantizer, not 'none'")
        return {}
    owned = {a for f, _ in _option_fields(quantizer) for a in f.metadata.get("aliases", ())}
    foreign = [a for a in getattr(args, _ALIASES, ()) if a not in owned]
    if foreign:
        raise CaspError(f"{', '.join(foreign)} does not apply to --quantizer {quantizer}")
    options = {}
    for f, flag in _option_fields(quantizer):
        if _flag_dest(flag) in given:
            options[f.name] = getattr(args, _flag_dest(flag))
            given.discard(_flag_dest(flag))
    if given:
        raise CaspError(f"{_flags(given)} does not apply to --quantizer {quantizer}")
    return options


def _flags(dests) -> str:
    return ", ".join(sorted("--" + d[len(_OPTION):].replace("_", "-") for d in dests))


def _common(p: argparse.ArgumentParser, seed: bool = True) -> None:
    if seed:
        _config_flags(p, ("seed",))
    p.add_argument("--json", action="store_true", help="print machine-readable results on stdout")
    if not any("--threads" in a.option_strings for a in p._actions):
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads of the heavy kernels (default: every core this process may use)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


CALIBRATION = ("calib_samples", "calib_seq_len", "calib_jsonl", "calib_text", "density_mass")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="casp", description="CASP compression of multimodal models and LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="compress a model (default: the embedded model)")
    c.add_argument("model", nargs="?", help="local HF model directory or built-in name (default: embedded model)")
    c.add_argument("-o", "--out", required=True, help="output directory (written atomically)")
    c.add_argument("--recipe", help="run the recipe.json of an earlier run (flags given beside it override it)")
    _config_flags(c)
    c.add_argument("--incoherence", action="store_const", const="incoherence", dest="transform",
                   default=argparse.SUPPRESS,
                   help="randomized Hadamard incoherence processing on both sides of W (= --transform incoherence)")
    _quantizer_flags(c, _chosen_quantizer(argv))
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.add_argument("--no-plan-cache", action="store_true",
                   help="measure the plan even if an earlier run on the same model, calibration and options kept it "
                        "(default: kept under $CASP_CACHE/plans and reused, so another --bits costs only the "
                        "allocation and the layer pass)")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted --stream run from OUT.partial (same options; same bytes as an "
                        "uninterrupted run)")
    _common(c, seed=False)

    e = sub.add_parser("eval", help="evaluate a model (dense or compressed)")
    e.add_argument("model", nargs="?", help="model directory or built-in name (default: embedded model)")
    e.add_argument("--reference", help="reference model for KL (default: the uncompressed original when known)")
    e.add_argument("--vqa-jsonl", help='local VQA file of {"image","question","answer"} records')
    e.add_argument("--text", help="text file for token perplexity")
    e.add_argument("--context-length", type=int, default=2048, help="perplexity window (default 2048 or model max)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    e.add_argument("--device", default=config_default("device"),
                   help="run each decoder layer on this device in turn; the model stays on the CPU (default cpu)")
    _common(e)

    s = sub.add_parser("sparsity", help="attention density per layer and head")
    s.add_argument("model", nargs="?", help="model directory or built-in name (default: embedded model)")
    s.add_argument("--qk-rank", type=_parsed_by(parse_qk_rank), default=0.25,
                   help="also measure the attention-map error of low-rank Q/K at this ratio and our bound (0: skip; "
                        "default 0.25)")
    _config_flags(s, CALIBRATION)
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


def _seed(args) -> int:
    return getattr(args, "seed", config_default("seed"))


def _emit(args, payload: dict, text: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        print(text)


def compression_request(args):
    """A `CompressionConfig` from the flags, or the `Recipe` of `--recipe` (re-resolved only when flags beside it
    change it)."""
    from casp.config import CompressionConfig
    from casp.recipe import Recipe

    given, options = _given_config(args), _quantizer_options(args)
    if not args.recipe:
        return CompressionConfig(**given, quantizer_options=options)
    recipe = Recipe.load(args.recipe)
    if not given and not options:
        return recipe
    base = recipe.to_config()
    kept = {} if "quantizer" in given else base.quantizer_options
    return dataclasses.replace(base, **given, quantizer_options={**kept, **options})


def cmd_compress(args) -> None:
    from casp.pipeline import compress
    from casp.run import RunOptions

    from casp.io.plan_cache import PlanCache

    cache = None if args.no_plan_cache else PlanCache()
    result = compress(args.model, args.out, compression_request(args), progress=not args.quiet,
                      options=RunOptions(overwrite=args.overwrite, resume=args.resume, cache=cache))
    r, recipe = result.report, result.recipe
    summary = {k: r[k] for k in ("average_bits", "stored_bytes", "original_weights", "seconds", "peak_rss_mb")}
    summary.update(out=str(result.out), target_bits=recipe.bits, preset=recipe.preset,
                   recipe=str(result.out / "recipe.json"))
    note = ""
    if recipe.excluded_candidates:
        summary["excluded_candidates"] = list(recipe.excluded_candidates)
        note = f"; left out {', '.join(recipe.excluded_candidates)} ({recipe.reasons['excluded_candidates']})"
    check = r.get("baseline_check", {})
    if check.get("kept") == "uniform":
        summary["baseline_check"] = check
        note += (f"; the allocation measured worse than uniform {check['uniform_setting']} on held-out samples "
                 f"(KL {check['allocation_kl']:.4g} against {check['uniform_kl']:.4g}), so the uniform model was kept")
    _emit(args, summary, f"wrote {result.out}: average {r['average_bits']:.4f} bits/weight (target {recipe.bits}), "
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

    res = measure_sparsity(args.model, CompressionConfig(**_given_config(args)),
                           progress=not args.quiet)
    lines = [f"attention density ({res['definition']})", "",
             "layer  mean    per head" + ("                         rank  map-MSE   row-L1   bound-L1" if res["qk_rank"] else "")]
    for lr in res["layers"]:
        heads = " ".join(f"{d:.2f}" for d in lr["density_per_head"])
        tail = ""
        if lr.get("attn_row_l1") is not None:
            tail = f"   {lr['rank_q']:4d}  {lr['attn_map_mse']:.2e}  {lr['attn_row_l1']:.4f}  {lr['attn_bound_l1']:.4f}"
        lines.append(f"{lr['index']:5d}  {lr['density']:.3f}   {heads}{tail}")
    lines.append(f"\nmodel mean density: {res['mean_density']:.3f}")
    if "mean_visual_density" in res:
        lines += ["", f"text queries over image against text keys ({res['visual_definition']})", "",
                  "layer  image keys  text keys  mass on image"]
        lines += [f"{lr['index']:5d}  {lr['visual_density']:10.3f}  {lr['text_density']:9.3f}  "
                  f"{lr['visual_mass_share']:13.3f}" for lr in res["layers"]]
        lines.append(f"\nmodel mean density over image keys {res['mean_visual_density']:.3f}, "
                     f"over text keys {res['mean_text_density']:.3f}")
    _emit(args, res, "\n".join(lines))


def cmd_demo(args) -> None:
    from casp.demo import run_demo

    res = run_demo(args.out, seed=_seed(args), progress=not args.quiet)
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
                       repeats=args.repeats, seed=_seed(args), threads=args.threads)
    speed = (f"decode: {res['tokens_per_s']:.1f} tokens/s, dense {res['dense_tokens_per_s']:.1f} tokens/s "
             f"({res['new_tokens']} new tokens, median of {res['repeats']}, {res['threads']} thread(s); "
             f"prefill {res['prefill_s'] * 1e3:.0f} ms, dense {res['dense_prefill_s'] * 1e3:.0f} ms; "
             f"peak RSS {res['peak_rss_mb']:.0f} MB)")
    _emit(args, res, f"{res['text']}\n{speed}")


COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "sparsity": cmd_sparsity, "demo": cmd_demo,
            "info": cmd_info, "export-dense": cmd_export_dense, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not args.debug else logging.INFO)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # 5.x draws "Loading weights" bars on stderr
    try:
        if args.command != "generate":
            use_threads(getattr(args, "threads", None))
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
