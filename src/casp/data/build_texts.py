"""Rebuild the shipped text files in this folder from their sources (run by hand, offline).

Not imported by casp. The outputs are committed so that every Python version sees the same
text; this script records exactly how they were made (see docs/data.md):

    python src/casp/data/build_texts.py --alice PATH/TO/brotli-1.2.1/tests/testdata/alice29.txt

* python_docs.txt: the help topics of `pydoc_data.topics` (the language reference text behind
  `help("assert")` etc.) followed by the docstrings of the public standard-library modules,
  their public classes and functions, as the running interpreter has them (we used 3.11.7).
* alice_in_wonderland.txt: the Canterbury-corpus file `alice29.txt` as shipped in the
  `brotli` sdist on PyPI, with CRLF turned into LF, trailing spaces and the final DOS
  end-of-file byte (0x1A) removed.
* licences.txt: the licence texts Debian ships in /usr/share/common-licenses (package base-files)
  named in `LICENCES`, in that order, trailing spaces removed: a second evaluation text, legal
  English, far from both others.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Modules that act on import (browser, stdout, GUI) or are aliases/deprecated internals.
SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data",
    "lib2to3", "sre_compile", "sre_constants", "sre_parse", "distutils", "encodings",
    "msilib", "msvcrt", "nt", "winreg", "winsound", "ntpath", "nturl2path",
}
LICENCES = ("GPL-3", "LGPL-2.1", "GFDL-1.3", "MPL-2.0", "Apache-2.0")
MODULE_CAP = 6000  # characters of one module's docs, so that no single module dominates
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _clean(text: str) -> str:
    return ADDRESS.sub("", inspect.cleandoc(text)).strip()


class _Elided:
    """Stands in for a default whose repr is long or machine-dependent (e.g. os.environ)."""

    def __repr__(self) -> str:
        return "..."


def _machine_dependent(text: str) -> bool:
    here = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.executable, str(Path.home())}
    return len(text) > 40 or any(h and h in text for h in here)


def _signature(obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = []
    for p in sig.parameters.values():
        if p.default is not p.empty and _machine_dependent(repr(p.default)):
            p = p.replace(default=_Elided())
        params.append(p)
    return ADDRESS.sub("", str(sig.replace(parameters=params, return_annotation=sig.empty)))


def _module_docs(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = __import__(name)
        except Exception:  # noqa: BLE001 - platform-specific modules simply drop out
            return ""
    parts = [f"Module {name}\n" + "=" * (7 + len(name))]
    if mod.__doc__:
        parts.append(_clean(mod.__doc__))
    names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
    for attr in sorted(set(names)):
        obj = getattr(mod, attr, None)
        own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not isinstance(own, str):
            continue
        if getattr(obj, "__module__", None) not in (name, None) and name != "builtins":
            continue
        kind = "class" if inspect.isclass(obj) else "function"
        body = "\n".join("    " + line if line else "" for line in _clean(own).splitlines())
        parts.append(f"{kind} {name}.{attr}{_signature(obj)}\n{body}")
    text = "\n\n".join(parts)
    if len(text) > MODULE_CAP:  # cut at a paragraph boundary
        cut = text.rfind("\n\n", 0, MODULE_CAP)
        text = text[: cut if cut > 0 else MODULE_CAP]
    return text if len(parts) > 1 else ""


def python_docs() -> str:
    import pydoc_data.topics as topics

    sections = [topics.topics[k].strip() for k in sorted(topics.topics)]
    modules = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP)
    sections += [t for t in (_module_docs(n) for n in modules) if t]
    text = "\n\n\n".join(sections)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def alice(path: Path) -> str:
    raw = path.read_text(encoding="ascii").replace("\r\n", "\n").replace("\x1a", "")  # DOS EOF mark
    return "\n".join(line.rstrip() for line in raw.splitlines()).strip("\n") + "\n"


def licences(folder: Path) -> str:
    texts = [(folder / name).read_text(encoding="utf-8") for name in LICENCES]
    lines = "\n\n\n".join(t.strip("\n") for t in texts).splitlines()
    return "\n".join(line.rstrip() for line in lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alice", type=Path, required=True, help="alice29.txt from the brotli sdist")
    ap.add_argument("--licences", type=Path, default=Path("/usr/share/common-licenses"))
    args = ap.parse_args()
    (HERE / "python_docs.txt").write_text(python_docs(), encoding="utf-8")
    (HERE / "alice_in_wonderland.txt").write_text(alice(args.alice), encoding="utf-8")
    (HERE / "licences.txt").write_text(licences(args.licences), encoding="utf-8")


if __name__ == "__main__":
    main()
