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
    for name in ("report.md", "report.json", "demo.json", "casp_2bit_report.md"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "demo.json").read_text())["rows"]
    assert [r["method"] for r in saved] == methods
    fp = result["rows"][0]
    assert fp["kl"] == 0.0 and fp["average_bits"] == 16.0
    for row in result["rows"][1:]:
        assert row["average_bits"] < 4.0 and row["kl"] > 0.0
        if row["method"] == "CASP+GPTQ":
            assert row["average_bits"] <= row["target_bits"] + 1e-9


def test_demo_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(CaspError, match="not a casp demo directory"):
        demo.run_demo(tmp_path / "x", progress=False)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
