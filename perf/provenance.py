"""Where a perf result comes from: the commit of the checkout, one definition for every perf script.

The commit is ``git rev-parse --short HEAD`` of the checkout; where the tree has no ``.git``
(a copied or unpacked tree) the ``GSOPS_COMMIT`` environment variable names it; else ``unknown``.
It goes into file names, so ``GSOPS_COMMIT`` is reduced to ``[A-Za-z0-9._-]``, 40 characters.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Commit:
    sha: str  # short hash, the GSOPS_COMMIT value, or "unknown"
    dirty: bool  # tracked files differ from HEAD
    source: str  # how it was found: "git", "git (uncommitted changes)", "GSOPS_COMMIT", or why neither


def git_commit(root: Path | str | None = None) -> Commit:
    """The commit of the checkout at ``root`` (default: this one)."""
    root = Path(root) if root is not None else ROOT
    if (root / ".git").exists():
        try:
            sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                 check=True, timeout=30).stdout.strip()
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                        capture_output=True, text=True, timeout=30).stdout.strip())
            if sha:
                return Commit(sha, dirty, "git" + (" (uncommitted changes)" if dirty else ""))
        except (OSError, subprocess.SubprocessError):
            pass
    env = re.sub(r"[^A-Za-z0-9._-]", "", os.environ.get("GSOPS_COMMIT", "").strip())[:40]
    if env:
        return Commit(env, False, "GSOPS_COMMIT")
    return Commit("unknown", False, "no .git and no GSOPS_COMMIT")
