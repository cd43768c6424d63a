"""The harness's micro-benchmarks under pytest-benchmark (outside the default ``tests/`` run).

    pytest perf/ --benchmark-only                          # run, print the table
    pytest perf/ --benchmark-only --benchmark-autosave      # save .benchmarks/<machine>/NNNN_<commit>.json
    pytest perf/ --benchmark-only --benchmark-compare       # compare with the last saved run

Device: ``GSOPS_BENCH_DEVICE`` (default ``cuda`` when available, else ``cpu``), dtype
``GSOPS_BENCH_DTYPE`` (fp32 | bf16 | fp16 | fp64, default fp32).
"""
import os

import pytest
import torch

from gsops.flags import env_choice
from perf.micro import cayley_setup, gs_apply_setup

DEVICE = torch.device(os.environ.get("GSOPS_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE = _DTYPES[env_choice("GSOPS_BENCH_DTYPE", _DTYPES, "fp32")]


def _synced(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(DEVICE)

    return run


@pytest.mark.parametrize("impl", ["gsops.cayley", "torch.linalg.solve"])
@pytest.mark.parametrize("r,b", [(32, 32), (128, 32)])
def test_cayley_fwd_bwd(benchmark, r, b, impl):
    benchmark.group = f"cayley fwd+bwd r={r} b={b} {DTYPE}"
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), r=r, b=b)
    fn = _synced(cayley_setup(r, b, DEVICE, DTYPE)[impl])
    benchmark(fn)


@pytest.mark.parametrize("impl", ["gsops.gs_apply", "dense x @ Q^T", "copy x.clone()"])
@pytest.mark.parametrize("tokens,d,b", [(4096, 1024, 32)])
def test_gs_apply_fwd(benchmark, tokens, d, b, impl):
    benchmark.group = f"GS apply tokens={tokens} d={d} b={b} {DTYPE}"
    moved = 2 * tokens * d * torch.tensor([], dtype=DTYPE).element_size()
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), bytes_moved=moved)
    fn = _synced(gs_apply_setup(tokens, d, b, DEVICE, DTYPE)[impl])
    benchmark(fn)
    benchmark.extra_info["gbps"] = moved / benchmark.stats.stats.median / 1e9
