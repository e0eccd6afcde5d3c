"""`casp demo` end to end on the embedded model, shrunk (few questions, small calibration) to CI size."""

import json

import pytest

from casp import demo
from casp.errors import CaspError


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(demo, "DEMO_QUESTIONS", 24)
    mp.setattr(demo, "DEMO_CAPTIONS", 4)
    mp.setattr(demo, "DEMO_KL", 8)
    mp.setattr(demo, "CALIB_SAMPLES", 8)
    out = tmp_path_factory.mktemp("demo") / "casp-demo"
    try:
        yield demo.run_demo(out, seed=0, progress=False), out
    finally:
        mp.undo()


def test_demo_rows_and_files(small_demo):
    result, out = small_demo
    methods = [r["method"] for r in result["rows"]]
    assert methods[0] == "FP"
    for b in (2, 3):
        i = methods.index(f"GPTQ {b}-bit g128")
        assert methods[i + 1 : i + 3] == ["GPTQ + allocation (= GPTQ bits)", "CASP+GPTQ (= GPTQ bits)"]
        gptq = result["rows"][i]
        for row in result["rows"][i + 1 : i + 3]:  # equal-bits rows never spend more than the GPTQ row
            assert row["average_bits"] <= gptq["average_bits"] + 1e-9
    for name in ("report.md", "report.json", "demo.json", "casp_2bit_report.md", demo.KL_PLOT):
        assert (out / name).is_file(), name
    assert not (out / "accuracy_vs_bits.png").exists()
    assert f"]({demo.KL_PLOT})" in (out / "report.md").read_text()
    saved = json.loads((out / "demo.json").read_text())["rows"]
    assert [r["method"] for r in saved] == methods
    fp = result["rows"][0]
    assert fp["kl"] == 0.0 and fp["average_bits"] == 16.0
    for row in result["rows"][1:]:
        assert row["average_bits"] < 4.0 and row["kl"] > 0.0
        if row["method"] == "CASP+GPTQ":
            assert row["average_bits"] <= row["target_bits"] + 1e-9


def test_plot_lines_group_rows_by_method():
    names = ["RTN 2-bit g128", "GPTQ 2-bit g128", "GPTQ + allocation (= GPTQ bits)", "CASP+GPTQ (= GPTQ bits)",
             "CASP+GPTQ", "RTN 3-bit g128", "GPTQ 3-bit g128", "GPTQ + allocation (= GPTQ bits)",
             "CASP+GPTQ (= GPTQ bits)", "CASP+GPTQ"]
    assert [n for n, _ in demo.demo_configs(0)] == [n for n in names if "=" not in n]
    lines = {}
    for n in names:
        lines.setdefault(demo.method_of(n), []).append(n)
    assert {m: len(v) for m, v in lines.items()} == {
        "uniform RTN": 2, "uniform GPTQ": 2, "GPTQ + allocation (no low-rank Q/K)": 2,
        "CASP+GPTQ (joint Q/K ranks and bits)": 4}


def test_kl_plot_draws_each_method_sorted_by_bits(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, **kw: drawn.append((kw.get("label"), list(x))) or real(self, x, y, **kw))
    rows = [{"method": "FP", "average_bits": 16.0, "kl": 0.0},
            {"method": "GPTQ 3-bit g128", "average_bits": 3.148, "kl": 7e-5},
            {"method": "CASP+GPTQ", "average_bits": 3.0, "kl": 2e-4},
            {"method": "GPTQ 2-bit g128", "average_bits": 2.141, "kl": 1.35e-3},
            {"method": "CASP+GPTQ (= GPTQ bits)", "average_bits": 2.141, "kl": 2.24e-3},
            {"method": "CASP+GPTQ", "average_bits": 2.0, "kl": 1.19e-3}]
    assert demo._kl_plot(rows, tmp_path) == demo.KL_PLOT
    assert (tmp_path / demo.KL_PLOT).is_file()
    assert dict(drawn) == {"uniform GPTQ": [2.141, 3.148], "CASP+GPTQ (joint Q/K ranks and bits)": [2.0, 2.141, 3.0]}


def test_demo_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(CaspError, match="not a casp demo directory"):
        demo.run_demo(tmp_path / "x", progress=False)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
