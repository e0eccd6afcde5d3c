"""The layout's promises, checked on the source: no import cycles, family names only in the adapters."""
import ast
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
