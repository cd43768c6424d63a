"""Smoke test of the perf harness (perf/harness.py) on tiny shapes: every requested row, finite numbers, real peft.

No timing is asserted here (timings live in perf/); this checks the harness runs
end to end and writes complete, honest results.
"""
import csv
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # perf/ lives at the repo root, beside tests/
from perf import harness  # noqa: E402

peft = pytest.importorskip("peft", reason="the harness's PEFT baselines need peft (a dev requirement)")

NUMERIC = ("time_ms", "ratio_to_base", "saved_act_bytes", "trainable_params")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf")
    res = harness.main(["--tiny", "--quiet", "--out-dir", str(out)])
    return out, res["fp32"]


def _expected_keys():
    backends = [b for b, _ in harness.gsops_backends(__import__("torch").device("cpu"))]
    assert "torch" in backends
    keys = []
    for k in harness.METHODS:
        if k in harness.GSOPS_ORTHO:
            keys += [f"{k}[{b}]" for b in backends]
        else:
            keys.append(k)
    return keys


def test_csv_has_every_row_with_finite_numbers(tiny_run):
    out, res = tiny_run
    with open(res["paths"]["csv"]) as f:
        rows = list(csv.DictReader(f))
    cases = {c.name for c in harness.tiny_cases()}
    assert {r["case"] for r in rows} == cases
    for case in cases:
        got = [r["method"] for r in rows if r["case"] == case]
        assert sorted(got) == sorted(_expected_keys()), case
    for r in rows:
        if r["kind"] == "conv" and r["method"].startswith("double_gsoft["):
            # Q_out acts on out_channels=4, which block_size=18 does not divide: said so (the method's rule), not dropped
            assert r["status"].startswith("n/a: block_size=18 must divide out_channels=4"), r["status"]
            continue
        assert r["status"] == "ok", (r["case"], r["method"], r["status"])
        for k in NUMERIC:
            assert math.isfinite(float(r[k])), (r["method"], k, r[k])
        assert float(r["time_ms"]) > 0 and int(r["n_samples"]) >= 3
    base = [r for r in rows if r["method"] == "base"]
    assert all(float(r["ratio_to_base"]) == 1.0 for r in base)
    for r in rows:
        if r["status"] == "ok" and r["method"].split("[")[0] in ("peft_oft", "peft_boft", "peft_boft_m2", "gsoft", "gsoft_noscale",
                                         "double_gsoft", "oft", "boft"):
            assert 0 < float(r["density_q"]) <= 1, r["method"]


def test_json_records_environment_and_rows(tiny_run):
    out, res = tiny_run
    doc = json.loads(open(res["paths"]["json"]).read())
    for k in ("device_name", "dtype", "git_commit", "versions", "cases", "threads"):
        assert doc[k] not in (None, ""), k
    assert doc["versions"]["peft"] == peft.__version__
    for mod in ("torch", "triton", "gsops"):
        assert mod in doc["versions"]
    assert doc["git_commit"] in res["paths"]["csv"].name and "cpu_fp32" in res["paths"]["csv"].name
    assert len(doc["rows"]) == len(_expected_keys()) * len(harness.tiny_cases())
    assert all(c["block_size"] and c["tokens"] for c in doc["cases"])
    assert res["paths"]["png"].exists() and res["paths"]["png"].stat().st_size > 0
    micro = doc["micro"]
    assert {m["impl"] for m in micro} >= {"gsops.cayley", "torch.linalg.solve", "gsops.gs_apply", "copy x.clone()"}
    assert all(math.isfinite(m["ms"]) for m in micro)


def test_peft_rows_come_from_installed_peft_with_requested_factors(tiny_run):
    _, res = tiny_run
    from perf.peft_boft import STANDIN_LABEL

    recs = res["records"]
    for r in recs:
        if r["method"] in ("lora", "peft_oft", "peft_boft", "peft_boft_m2"):
            assert r["impl"] == f"peft {peft.__version__}", r
    lin = next(c for c in harness.tiny_cases() if c.kind == "linear")
    boft = [r for r in recs if r["method"] == "peft_boft" and r["kind"] == "linear"]
    assert [r["n_factors"] for r in boft] == [lin.boft_dense_factors]
    assert lin.boft_dense_factors > 2  # the stand-in is exercised with m > 1 factors
    m2 = [r for r in recs if r["method"] == "peft_boft_m2"]
    assert m2 and all(r["n_factors"] == 2 for r in m2)
    import torch

    if not torch.cuda.is_available():
        assert all(STANDIN_LABEL in r["note"] for r in boft + m2)


def test_missing_peft_is_a_clear_error(tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "peft" or name.startswith("peft."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ImportError, match="peft"):
        harness.main(["--tiny", "--quiet", "--no-micro", "--no-plot", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing written: no table with dropped rows


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        harness.parse_methods(["base,nope"])
    assert harness.parse_methods(["peft", "gsoft"]) == ["lora", "peft_oft", "peft_boft", "peft_boft_m2", "gsoft"]


def test_bf16_micro_rows_all_run_with_the_solve_baseline_in_float32():
    """torch.linalg.solve has no bfloat16 kernel: the bf16 micro run keeps every row (the GS-apply-vs-copy
    row included), its solve baseline computed in float32 and saying so."""
    import torch

    from perf.micro import run_micro

    rows = run_micro("cpu", torch.bfloat16, quick=True, sizes={"cayley": [(4, 4)], "gs_apply": [(8, 16, 4)]})
    impls = {r["impl"]: r for r in rows}
    assert set(impls) == {"gsops.cayley", "torch.linalg.solve", "gsops.gs_apply", "dense x @ Q^T", "copy x.clone()"}
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in rows)
    assert "float32" in impls["torch.linalg.solve"]["note"] and "bfloat16" in impls["torch.linalg.solve"]["note"]
    assert impls["gsops.cayley"]["note"] == ""
    assert math.isfinite(impls["gsops.gs_apply"]["copy_fraction"])
