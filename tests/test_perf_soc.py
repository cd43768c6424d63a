"""The harness's GS-SOC vs SOC rows (perf/soc.py) on tiny shapes: every row, finite numbers, honest counts.

No timing is asserted (timings live in perf/); parameter counts are checked against models built here.
"""
import csv
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # perf/ lives at the repo root, beside tests/
from perf import harness, soc  # noqa: E402

from gsops.models import LipConvnet  # noqa: E402


def test_soc_rows_tiny(tmp_path):
    res = harness.main(["--only", "soc", "--tiny", "--quiet", "--out-dir", str(tmp_path)])
    records = res["soc"]["records"]
    cases = sorted({r["case"] for r in records})
    assert len(records) == len(cases) * len(soc.ROWS) == 8
    for case in cases:
        rows = [r for r in records if r["case"] == case]
        assert [(r["conv"], r["groups"]) for r in rows] == [
            ("soc", "-"), ("gssoc", "(4, -)"), ("gssoc", "(4, 1)"), ("gssoc", "(4, 2)")]
        base = rows[0]["time_ms"]
        for r in rows:
            assert math.isfinite(r["time_ms"]) and r["time_ms"] > 0 and r["n_samples"] >= 1
            assert r["time_ms_min"] <= r["time_ms"]
            assert math.isclose(r["speedup_vs_soc"], base / r["time_ms"])  # ratio from the same run
            assert (r["met"] is None) == (r["conv"] == "soc")
            if r["met"] is not None:
                assert r["met"] == (r["speedup_vs_soc"] >= soc.GOAL)
            assert r["saved_act_bytes"] > 0
            assert r["peak_mem_bytes"] is None  # CPU: no CUDA peak, said as such
    net = [r for r in records if r["case"].startswith("LipConvnet-5")]
    for r, (conv, groups) in zip(net, soc.ROWS):
        with torch.device("meta"):
            m = LipConvnet(5, 8, conv, groups or (4, None), num_classes=100)
        assert r["trainable_params"] == sum(p.numel() for p in m.parameters())
    assert len({r["trainable_params"] for r in net}) == 4
    with open(res["soc"]["paths"]["soc_csv"]) as f:
        assert len(list(csv.DictReader(f))) == 8
    assert "LipConvnet-5 training step" in soc.format_table(records)


def test_harness_soc_switches():
    p = harness.build_parser()
    assert p.parse_args([]).soc is True and p.parse_args([]).only is None
    assert p.parse_args(["--no-soc"]).soc is False
    assert p.parse_args(["--only", "soc"]).only == "soc"
