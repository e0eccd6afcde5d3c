"""Every user mistake is one line on stderr, exit status 2, no traceback, no partial output."""
import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_command(*args, cwd=None):
    """The real `casp` command in its own process (most tests use the in-process `cli` fixture)."""
    return subprocess.run([sys.executable, "-m", "casp", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.split("\n") if l.strip() and "\r" not in l and not l.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def _no_leftovers(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp")]


def test_nonexistent_model_dir(tmp_path):
    p = run_command("compress", tmp_path / "nope", "-o", tmp_path / "out")
    assert_one_line_error(p, "does not exist")
    _no_leftovers(tmp_path, "out")


def test_missing_config_json(tmp_path, cli):
    (tmp_path / "m").mkdir()
    assert_one_line_error(cli("eval", tmp_path / "m"), "config.json")


def test_unreadable_config_json(tmp_path, cli):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    assert_one_line_error(cli("info", tmp_path / "m"), "cannot read")


def test_unsupported_architecture(tmp_path, cli):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert_one_line_error(cli("compress", tmp_path / "m", "-o", tmp_path / "out"), "unsupported architecture",
                          "LlavaForConditionalGeneration")
    _no_leftovers(tmp_path, "out")


def test_corrupt_safetensors(tmp_path, tiny_llama_dir, cli):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    assert_one_line_error(cli("compress", bad, "-o", tmp_path / "out"), str(bad))
    _no_leftovers(tmp_path, "out")


def test_empty_calibration_text(tmp_path, tiny_llama_dir, cli):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    p = cli("compress", tiny_llama_dir, "-o", tmp_path / "out", "--calib-text", empty)
    assert_one_line_error(p)
    assert "empty" in p.stderr.lower()
    _no_leftovers(tmp_path, "out")


def test_unreadable_image(tmp_path, tiny_llava_dir, cli):
    bad = tmp_path / "calib.jsonl"
    (tmp_path / "broken.png").write_bytes(b"not an image")
    bad.write_text(json.dumps({"image": "broken.png", "question": "what color is the square ?", "answer": "red"}) + "\n")
    p = cli("compress", tiny_llava_dir, "-o", tmp_path / "out", "--calib-jsonl", bad)
    assert_one_line_error(p, "broken.png")
    _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("args,fragment", [
    (["--bits", "-1"], "--bits"),
    (["--qk-rank", "1.5"], "ratio"),
    (["--qk-rank", "lots"], "ratio"),
    (["--calib-samples", "0"], "--calib-samples"),
    (["--candidate-bits", "5"], "bit-widths"),
    (["--quantizer", "magic"], "--quantizer"),
    (["--quantizer", "rtn", "--damp", "0.1"], "damp"),
    (["--damp", "20"], "--damp"),
    (["--quantizer", "none", "--sym"], "need a quantizer"),
    (["--transform", "spin"], "transform"),
])
def test_nonsensical_options(tmp_path, tiny_llama_dir, args, fragment, cli):
    p = cli("compress", tiny_llama_dir, "-o", tmp_path / "out", *args)
    assert_one_line_error(p, fragment)
    _no_leftovers(tmp_path, "out")


def test_existing_output_needs_overwrite(tmp_path, tiny_llama_dir, cli):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    p = cli("compress", tiny_llama_dir, "-o", tmp_path / "out")
    assert_one_line_error(p, "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_debug_shows_traceback(tmp_path):
    p = run_command("compress", tmp_path / "nope", "-o", tmp_path / "out", "--debug")
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_rank_above_full_rank(tmp_path, tiny_llama_dir, cli):
    p = cli("compress", tiny_llama_dir, "-o", tmp_path / "out", "--qk-rank-layer", "0=5000")
    assert_one_line_error(p, "rank")
    _no_leftovers(tmp_path, "out")


def test_model_without_separate_qk(tmp_path):
    """A supported family whose attention lost W_q (e.g. a fused checkpoint) is refused with one line."""
    from casp.errors import CaspError
    from casp.models.adapters import adapter_for
    from casp.steps.ranks import choose_ranks
    from tiny_models import tiny_model

    model = tiny_model("llama")
    for layer in model.model.layers:
        del layer.self_attn.q_proj
    with pytest.raises(CaspError, match="no separate"):
        choose_ranks(model.model.layers, adapter_for(model), 0.25, {})


def test_moe_architecture_is_refused_with_the_reason(tmp_path, cli):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"]}))
    p = cli("compress", tmp_path / "m", "-o", tmp_path / "out")
    assert_one_line_error(p, "unsupported architecture", "mixture-of-experts", "Gemma3ForConditionalGeneration",
                          "Phi3ForCausalLM")
    _no_leftovers(tmp_path, "out")


@pytest.fixture(scope="module")
def tiny_phi3_dir(tmp_path_factory):
    """A tiny Phi-3 (fused W_qkv) with a word-level tokenizer."""
    from tiny_models import tiny_model, word_tokenizer

    out = tmp_path_factory.mktemp("phi3")
    tiny_model("phi3").save_pretrained(out)
    word_tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("qk_rank", ["0.25", "auto"])
def test_low_rank_qk_on_fused_qkv_is_refused(tmp_path, tiny_phi3_dir, scene_text, qk_rank, cli):
    p = cli("compress", tiny_phi3_dir, "-o", tmp_path / "out", "--bits", "3", "--qk-rank", qk_rank,
                "--calib-text", scene_text, "--calib-samples", "4", "--calib-seq-len", "16", "--quiet")
    assert_one_line_error(p, "phi3", "fused", "--qk-rank 0")
    _no_leftovers(tmp_path, "out")


def test_info_families_with_a_model_is_refused(tmp_path, tiny_phi3_dir, cli):
    assert_one_line_error(cli("info", tiny_phi3_dir, "--families"), "--families")
