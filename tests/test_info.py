import subprocess
import sys

import gsops
from gsops import backends


def test_info_reports_versions_and_backend_reasons():
    out = subprocess.run([sys.executable, "-m", "gsops.info"], capture_output=True, text=True, check=True).stdout
    assert f"gsops {gsops.__version__}" in out
    for name, (ok, reason) in backends.status().items():
        assert f"{name:7s} {'available' if ok else 'unavailable'}: {reason}" in out
    # the reference path is always there; an unavailable backend always says why
    assert backends.status()["torch"][0]
    assert all(reason for ok, reason in backends.status().values())


def test_info_says_auto_order_and_why():
    from gsops.ops import dispatch

    out = subprocess.run([sys.executable, "-m", "gsops.info"], capture_output=True, text=True, check=True).stdout
    assert dispatch.AUTO_ORDER.index("triton") < dispatch.AUTO_ORDER.index("cuda")
    assert f"auto on CUDA tensors: triton > cuda > torch ({dispatch.AUTO_ORDER_REASON})" in out
