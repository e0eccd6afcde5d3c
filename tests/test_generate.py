"""`casp generate`: answers, the timing contract, the dense equivalent, one-line errors."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from casp.config import CompressionConfig
from casp.generate import build_inputs, casp_module_names, densify, greedy_decode, load
from casp.nn import MODULE_TYPES
from casp.pipeline import compress
from test_cli_errors import assert_one_line_error


GENERATE = ("--threads", "1", "--repeats", "1", "--quiet")


@pytest.fixture
def run_generate_cli(cli):
    """`casp generate ARGS...` in this process."""
    return lambda *args: cli("generate", *args, *GENERATE)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A held-out scene of the embedded model's world, saved as PNG, with its questions and answers."""
    from casp.embedded.scenes import make_scene

    s = make_scene("test", 0)
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    s.image.save(path)
    return path, s.qa


@pytest.fixture(scope="module")
def compressed_llama(tiny_llama_dir, scene_text, tmp_path_factory):
    """The tiny Llama at 3 bits with low-rank Q/K (LowRankLinear over PackedLinear factors), saved."""
    out = tmp_path_factory.mktemp("gen") / "c3"
    cfg = CompressionConfig(bits=3.0, qk_rank=0.25, calib_samples=4, calib_seq_len=32, seed=0,
                            calib_text=str(scene_text))
    compress(tiny_llama_dir, out, cfg, progress=False)
    return out


def test_cli_answers_a_question_about_an_image(scene, run_generate_cli):
    path, qa = scene
    color = next((q, a) for q, a, kind in qa if kind == "color")
    proc = run_generate_cli("--prompt", color[0], "--image", path, "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == color[1]
    assert "tokens/s" in lines[1] and "dense" in lines[1]


def test_cli_json_on_a_compressed_model(compressed_llama, run_generate_cli):
    proc = run_generate_cli(compressed_llama, "--prompt", "a red circle", "--max-new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert isinstance(res["text"], str)
    for key in ("tokens_per_s", "dense_tokens_per_s"):
        assert isinstance(res[key], float) and res[key] > 0
    assert res["new_tokens"] == 6 and res["compressed_modules"] > 0 and res["threads"] == 1


def test_dense_equivalent_decodes_the_same_tokens(compressed_llama, one_torch_thread):
    model, tok, _ = load(compressed_llama)
    names = casp_module_names(model)
    assert any(".q_proj" in n for n in names) and not any(n.endswith((".up", ".down")) for n in names)
    dense = copy.deepcopy(model)
    assert densify(dense) == len(names)
    assert not any(isinstance(m, tuple(MODULE_TYPES.values())) for m in dense.modules())
    for name in names:
        lin = dense.get_submodule(name)
        assert type(lin) is nn.Linear and lin.weight.dtype == torch.float32
    inputs = build_inputs(tok, "a red circle at the top left")
    with torch.no_grad():
        torch.testing.assert_close(dense(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-4)
    got = greedy_decode(model, inputs, 12, fixed_length=True)
    want = greedy_decode(dense, inputs, 12, fixed_length=True)
    assert got.tokens == want.tokens and len(got.tokens) == 12
    assert got.prefill_s > 0 and got.decode_s > 0 and got.tokens_per_s == pytest.approx(11 / got.decode_s)


def test_text_model_without_chat_template_takes_the_raw_prompt(tiny_llama_dir, one_torch_thread):
    _, tok, _ = load(tiny_llama_dir)
    inputs = build_inputs(tok, "a red circle")
    assert inputs["input_ids"].shape == (1, len(tok("a red circle")["input_ids"]))


def generate_main(capsys, *args):
    """`casp generate` in this process (no interpreter start-up): exit status and stderr lines."""
    from casp.cli import main

    code = main(["generate", *map(str, args), "--threads", "1", "--repeats", "1", "--quiet"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith(("INFO", "WARNING"))]
    return code, err


@pytest.mark.parametrize("args, fragment", [
    (["--prompt", "  "], "prompt is empty"),
    (["--prompt", "hi", "--image", "missing.png"], "does not exist"),
    (["nope-model", "--prompt", "hi"], "does not exist"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "at least 1"),
    (["--prompt", "hi", "--image", "broken.png"], "cannot read image"),
])
def test_user_mistakes_are_one_line(args, fragment, tmp_path, capsys, one_torch_thread):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    code, err = generate_main(capsys, *[str(tmp_path / a) if a.endswith(("model", ".png")) else a for a in args])
    assert code == 2 and len(err) == 1 and fragment in err[0], err


def test_image_on_a_text_model_is_one_line(tmp_path, tiny_llama_dir, capsys, one_torch_thread):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    code, err = generate_main(capsys, tiny_llama_dir, "--prompt", "hi", "--image", tmp_path / "ok.png")
    assert code == 2 and len(err) == 1 and "text-only" in err[0], err


def test_cli_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "casp", "generate", "--prompt", "", *GENERATE],
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "prompt is empty")
