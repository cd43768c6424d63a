"""Helpers shared by the example scripts' report writers (run the examples as ``python examples/NAME.py``)."""
from __future__ import annotations

import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def git_commit():
    """Short hash of the checkout's HEAD (empty outside a git checkout), or None when git cannot be run."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip()
    except OSError:
        return None


def write_json(path: str, meta: dict) -> None:
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)


def pyplot_or_none():
    """``matplotlib.pyplot`` on the non-interactive Agg backend; None (saying so) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG written")
        return None
    return plt
