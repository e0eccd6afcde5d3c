"""The layout's promises, checked on the source: no import cycles, family names only in the adapters."""
import ast
import dataclasses
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
FAMILY_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_layernorm",
                "self_attn", "language_model", "multi_modal_projector", "vision_tower", "embed_tokens")


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for t in names:
                # importing a package's own parent runs that package's __init__ only
                if t in mods and t != m and not m.startswith(t + "."):
                    graph[m].add(t)
    return graph


def test_no_import_cycles():
    graph = _imports(_modules())
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in graph[m]:
            assert state.get(t) != 1, f"import cycle: {' -> '.join(path + [t])}"
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_family_module_names_live_only_in_the_adapters():
    allowed = {"casp.models.adapters"}
    for m, p in _modules().items():
        if m in allowed or m.startswith("casp.embedded"):
            continue
        strings = [n.value for n in ast.walk(ast.parse(p.read_text()))
                   if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        leaks = [s for s in strings for name in FAMILY_NAMES if name in s]
        assert not leaks, f"{m} names model modules: {leaks[:3]}"


MIDDLE = ("casp/pipeline.py", "casp/steps", "casp/config.py", "casp/cli.py")
MAX_PARAMETERS = 6


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
            names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
            yield node.name, [n for n in names if n not in ("self", "cls")]


def test_the_middle_layer_passes_the_run_not_ten_parameters():
    paths = [p for m in MIDDLE for p in ([SRC / m] if m.endswith(".py") else sorted((SRC / m).rglob("*.py")))]
    wide = [f"{p.relative_to(SRC)}:{name}({len(params)})" for p in paths for name, params in _functions(p)
            if len(params) > MAX_PARAMETERS]
    assert not wide, f"functions with more than {MAX_PARAMETERS} parameters: {wide}"


def test_the_pipeline_reads_in_one_short_file():
    lines = [line for line in (SRC / "casp" / "pipeline.py").read_text().splitlines() if line.strip()]
    assert len(lines) <= 150, len(lines)


def test_the_compress_flags_hold_no_default_of_their_own():
    """Every `casp compress` flag that sets a config field takes its default from the config (argparse leaves
    unset flags out), and the help shows the config's default: a default is written once."""
    import argparse

    from casp.cli import build_parser
    from casp.config import CompressionConfig, flagged_fields

    compress = build_parser()._subparsers._group_actions[0].choices["compress"]
    by_dest = {a.dest: a for a in compress._actions}
    for f in flagged_fields():
        action = by_dest[f.name]
        assert action.default is argparse.SUPPRESS, f.name
        if f.default not in (None, False, dataclasses.MISSING) and not isinstance(f.default, bool):
            shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
            assert f"(default {shown})" in action.help, f.name
    unset = vars(compress.parse_args(["-o", "x"]))
    assert not set(unset) & {f.name for f in dataclasses.fields(CompressionConfig)}
    assert not [k for k in unset if k.startswith("option_")]


def test_cli_source_repeats_no_config_default_or_check():
    """cli.py names no literal default of a config field, and no range check: those live in config.py."""
    from casp.config import flagged_fields

    tree = ast.parse((SRC / "casp" / "cli.py").read_text())
    defaults = {f.metadata["flag"]: f.default for f in flagged_fields()}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and node.args[0].value in defaults:
            for k in node.keywords:
                if k.arg == "default" and isinstance(k.value, ast.Constant):
                    assert k.value.value != defaults[node.args[0].value], node.args[0].value
    text = (SRC / "casp" / "cli.py").read_text()
    assert "must be in" not in text and "ratio must be" not in text
