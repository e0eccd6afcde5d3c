"""The real `casp` command on tiny models: JSON contracts of compress, eval, sparsity, info."""
import json
import subprocess
import sys

import pytest

from casp.errors import CaspError


def command_json(*args):
    """The real `casp` command in its own process, its JSON answer."""
    proc = subprocess.run([sys.executable, "-m", "casp", *map(str, args), "--json", "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def casp_json(cli):
    """`casp ARGS... --json --quiet` run in this process, its JSON answer."""
    def run(*args):
        proc = cli(*args, "--json", "--quiet")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    return run


def test_compress_eval_info_on_text_model(tiny_llama_dir, scene_text, tmp_path, casp_json):
    out = tmp_path / "c"
    res = casp_json("compress", tiny_llama_dir, "-o", out, "--bits", "3", "--calib-text", scene_text,
                    "--calib-samples", "8", "--calib-seq-len", "32", "--seed", "1")
    assert res["out"] == str(out) and 2.0 < res["average_bits"] <= 3.0
    report = json.loads((out / "report.json").read_text())
    assert report["average_bits"] == res["average_bits"]
    ev = casp_json("eval", out, "--text", scene_text, "--context-length", "64")
    assert {"text_ppl", "context_length", "tokens"} <= set(ev)
    assert ev["context_length"] == 64 and ev["tokens"] > 100 and ev["text_ppl"] > 1
    info = casp_json("info", out)
    assert info["compressed"] is True and info["architecture"] == "LlamaForCausalLM"
    assert abs(info["average_bits"] - res["average_bits"]) < 1e-9


def test_sparsity_json_on_vlm(tiny_llava_dir, scene_jsonl, casp_json):
    res = casp_json("sparsity", tiny_llava_dir, "--calib-jsonl", scene_jsonl, "--calib-samples", "4", "--qk-rank", "0.25")
    assert len(res["layers"]) == 2
    for lr in res["layers"]:
        assert len(lr["density_per_head"]) == 4
        assert all(0 < d <= 1 for d in lr["density_per_head"])
        assert lr["attn_row_l1"] <= lr["attn_bound_l1"] + 1e-9
        assert lr["attn_map_mse"] <= lr["attn_map_mse_bound"] + 1e-12


def test_info_lists_families():
    info = command_json("info")
    assert "LlavaForConditionalGeneration" in info["supported_architectures"]
    assert "smollm2-135m" in info["builtin_models"]
    assert {"gptq", "rtn", "none"} <= set(info["quantizers"])


def test_quantizer_flags_reach_the_quantizer_config():
    from casp.cli import _quantizer_options, build_parser
    from casp.config import CompressionConfig
    from casp.recipe import resolve

    args = build_parser().parse_args(["compress", "-o", "x", "--damp", "0.05", "--no-act-order", "--group-size", "64",
                                      "--candidate-bits", "2,4"])
    q = resolve(CompressionConfig(quantizer="gptq", quantizer_options=_quantizer_options(args)), None).build_quantizer()
    assert (q.config.damp, q.config.act_order, q.config.group_size, q.config.candidate_bits) == (0.05, False, 64, (2, 4))
    plain = build_parser().parse_args(["compress", "-o", "x"])
    assert _quantizer_options(plain) == {}


def test_incoherence_flag_and_search_flags_reach_the_config():
    from casp.cli import build_parser

    args = build_parser().parse_args(["compress", "-o", "x", "--incoherence", "--search-steps", "5",
                                      "--qk-rank", "joint"])
    assert (args.transform, args.search_steps, args.qk_rank) == ("incoherence", 5, "joint")
    assert "qk_rank" not in vars(build_parser().parse_args(["compress", "-o", "x"]))


def test_shared_option_names_and_their_deprecated_aliases(capsys):
    """--damp / --hessian-shrink are one flag for gptq, e8 and aqlm; the old names still work, with a note."""
    from casp.cli import _quantizer_options, build_parser

    new = build_parser().parse_args(["compress", "-o", "x", "--quantizer", "e8", "--damp", "0.05",
                                     "--hessian-shrink", "0.3"])
    assert _quantizer_options(new) == {"ldlq_damp": 0.05, "shrink": 0.3}
    assert capsys.readouterr().err == ""
    old = build_parser().parse_args(["compress", "-o", "x", "--quantizer", "e8", "--e8-damp", "0.05",
                                     "--e8-shrink", "0.3"])
    assert _quantizer_options(old) == _quantizer_options(new)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--e8-damp is deprecated" in err[0] and "use --damp" in err[0]
    aqlm = build_parser().parse_args(["compress", "-o", "x", "--quantizer", "aqlm", "--aqlm-damp", "0.2"])
    assert _quantizer_options(aqlm) == {"damp": 0.2}
    with pytest.raises(CaspError, match="--e8-damp does not apply to --quantizer gptq"):
        _quantizer_options(build_parser().parse_args(["compress", "-o", "x", "--e8-damp", "0.2"]))


def test_help_shows_the_chosen_quantizers_own_defaults():
    from casp.cli import build_parser

    def damp_help(argv):
        compress = build_parser(argv)._subparsers._group_actions[0].choices["compress"]
        return next(a.help for a in compress._actions if "--damp" in a.option_strings)

    assert "gptq: default 0.01" in damp_help(["compress", "-o", "x"]) and "e8:" in damp_help(["compress", "-o", "x"])
    e8_only = damp_help(["compress", "-o", "x", "--quantizer", "e8"])
    assert "e8: default 0.01" in e8_only and "gptq" not in e8_only
