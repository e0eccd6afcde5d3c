"""A model, config, tokenizer or processor that cannot be loaded is one line on stderr and exit status 2.

Each case copies a good tiny model directory, breaks one thing and runs `casp compress` on it: in-process
through `casp.cli.main` for every case, and as a subprocess (`python -m casp`) for the cases whose raw
failure is an exception type transformers does not document (a Rust-side `Exception`, AttributeError,
ImportError). No case may leave an output directory or a temporary one behind.
"""
import json
import shutil
import subprocess
import sys

import pytest
import transformers
from safetensors.torch import load_file, save_file

from casp.errors import CaspError
from casp.io.modelio import load_processor


def _edit_json(name, edit):
    def apply(d):
        data = json.loads((d / name).read_text())
        edit(data)
        (d / name).write_text(json.dumps(data))
    return apply


def _write(name, text):
    return lambda d: (d / name).write_text(text)


def _remove(*names):
    def apply(d):
        for n in names:
            (d / n).unlink(missing_ok=True)
    return apply


def _truncate(d):
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _drop_a_tensor(d):
    f = d / "model.safetensors"
    sd = load_file(f)
    sd.pop(sorted(k for k in sd if k.endswith("mlp.up_proj.weight"))[0])
    save_file(sd, f, metadata={"format": "pt"})


# (case, base model, how to break it, a fragment the one line must contain)
CASES = [
    ("config_unknown_model_type", "llama", _edit_json("config.json", lambda c: c.update(model_type="no_such_model")),
     "config"),
    ("config_not_an_object", "llama", _write("config.json", "[1, 2, 3]"), "config.json"),
    ("tokenizer_files_missing", "llama",
     _remove("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"), "tokenizer"),
    ("tokenizer_json_garbage", "llama", _write("tokenizer.json", "garbage"), "tokenizer"),
    ("tokenizer_config_garbage", "llama", _write("tokenizer_config.json", "{not json"), "tokenizer_config.json"),
    ("unknown_tokenizer_class_without_tokenizer_json", "llama",
     lambda d: (_remove("tokenizer.json")(d),
                _edit_json("tokenizer_config.json", lambda c: c.update(tokenizer_class="NoSuchTokenizer"))(d)),
     "tokenizer"),
    ("processor_added_tokens_as_list", "llava",
     _edit_json("tokenizer_config.json", lambda c: c.update(added_tokens_decoder=[])), "processor"),
    ("truncated_safetensors", "llama", _truncate, "cannot load model weights"),
    ("safetensors_missing_a_tensor", "llama", _drop_a_tensor, "not in the checkpoint"),
]
SUBPROCESS = {"tokenizer_json_garbage", "processor_added_tokens_as_list", "truncated_safetensors"}


@pytest.fixture
def broken(request, tmp_path, tiny_llama_dir, tiny_llava_dir):
    """A broken copy of a tiny model directory, for one case of CASES (parametrized by name)."""
    name, base, breaker, fragment = next(c for c in CASES if c[0] == request.param)
    d = tmp_path / name
    shutil.copytree({"llama": tiny_llama_dir, "llava": tiny_llava_dir}[base], d)
    breaker(d)
    return d, fragment


def _error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.strip() and not l.startswith(("INFO", "WARNING"))]


def _assert_no_output(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("broken", [c[0] for c in CASES], indirect=True)
def test_broken_directory_is_one_line_in_process(broken, tmp_path, cli):
    d, fragment = broken
    err = (p := cli("compress", d, "-o", tmp_path / "out", "--quiet")).stderr
    lines = _error_lines(err)
    assert p.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("casp: error: "), err
    assert fragment in lines[0] and str(d) in lines[0], lines[0]
    assert "Traceback" not in err
    _assert_no_output(tmp_path)


@pytest.mark.parametrize("broken", sorted(SUBPROCESS), indirect=True)
def test_broken_directory_is_one_line_from_the_command(broken, tmp_path):
    d, fragment = broken
    p = subprocess.run([sys.executable, "-m", "casp", "compress", str(d), "-o", str(tmp_path / "out"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    lines = _error_lines(p.stderr)
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and fragment in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    _assert_no_output(tmp_path)


@pytest.mark.parametrize("exc", [AttributeError("'list' object has no attribute 'keys'"),
                                 ImportError("requires the protobuf library\nsee the instructions"),
                                 KeyError("image_processor_type")])
def test_processor_raising_any_exception_type_is_a_casp_error(tiny_llava_dir, monkeypatch, exc):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fail)
    with pytest.raises(CaspError) as info:
        load_processor(tiny_llava_dir)
    message = str(info.value)
    assert "\n" not in message
    assert type(exc).__name__ in message and str(tiny_llava_dir) in message
