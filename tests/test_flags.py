"""gsops.flags: one rule for every yes/no environment variable, and setup.py follows it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gsops import flags

ROOT = Path(__file__).resolve().parents[1]

ON = ["1", "true", "TRUE", "Yes", "on", " on "]
OFF = ["0", "false", "False", "NO", "off", "", "  "]
BAD = ["2", "y", "enabled", "tru", "-1"]


@pytest.mark.parametrize("value", ON)
def test_on_words(monkeypatch, value):
    monkeypatch.setenv("GSOPS_TEST_FLAG", value)
    assert flags.env_flag("GSOPS_TEST_FLAG", False) is True


@pytest.mark.parametrize("value", OFF)
def test_off_words_and_the_empty_string(monkeypatch, value):
    monkeypatch.setenv("GSOPS_TEST_FLAG", value)
    assert flags.env_flag("GSOPS_TEST_FLAG", True) is False


@pytest.mark.parametrize("default", [True, False])
def test_unset_gives_the_default(monkeypatch, default):
    monkeypatch.delenv("GSOPS_TEST_FLAG", raising=False)
    assert flags.env_flag("GSOPS_TEST_FLAG", default) is default


@pytest.mark.parametrize("value", BAD)
def test_any_other_value_names_the_variable_and_the_accepted_values(monkeypatch, value):
    monkeypatch.setenv("GSOPS_TEST_FLAG", value)
    with pytest.raises(ValueError, match=f"GSOPS_TEST_FLAG='{value}' must be 1, true, yes or on .*0, false, no, off"):
        flags.env_flag("GSOPS_TEST_FLAG", False)


def test_env_choice(monkeypatch):
    choices = ("auto", "torch", "triton")
    monkeypatch.delenv("GSOPS_TEST_CHOICE", raising=False)
    assert flags.env_choice("GSOPS_TEST_CHOICE", choices, "auto") == "auto"
    monkeypatch.setenv("GSOPS_TEST_CHOICE", "")
    assert flags.env_choice("GSOPS_TEST_CHOICE", choices, "auto") == "auto"
    monkeypatch.setenv("GSOPS_TEST_CHOICE", " Triton ")
    assert flags.env_choice("GSOPS_TEST_CHOICE", choices, "auto") == "triton"
    monkeypatch.setenv("GSOPS_TEST_CHOICE", "cuda")
    with pytest.raises(ValueError, match="GSOPS_TEST_CHOICE='cuda' must be one of auto, torch, triton"):
        flags.env_choice("GSOPS_TEST_CHOICE", choices, "auto")
    with pytest.raises(ValueError, match="default='cuda' must be one of"):
        flags.env_choice("GSOPS_TEST_CHOICE", choices, "cuda")


def test_the_check_switches_follow_the_rule(monkeypatch):
    import importlib

    import gsops.checks

    try:
        monkeypatch.setenv("GSOPS_CHECK_FINITE", "off")
        monkeypatch.setenv("GSOPS_CHECK_INPUTS", "Yes")
        importlib.reload(gsops.checks)
        assert not gsops.checks.check_finite_enabled() and gsops.checks.check_inputs_enabled()
        monkeypatch.setenv("GSOPS_CHECK_INPUTS", "maybe")
        with pytest.raises(ValueError, match="GSOPS_CHECK_INPUTS='maybe'"):
            importlib.reload(gsops.checks)
    finally:
        monkeypatch.delenv("GSOPS_CHECK_FINITE")
        monkeypatch.delenv("GSOPS_CHECK_INPUTS")
        importlib.reload(gsops.checks)
    assert gsops.checks.check_finite_enabled() and not gsops.checks.check_inputs_enabled()


def _setup_version(skip_cuda: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GSOPS_FORCE_CUDA"}
    env["GSOPS_SKIP_CUDA"] = skip_cuda
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("value, on", [("YES", True), ("off", False), ("maybe", None)])
def test_setup_reads_its_flags_by_the_same_rule(value, on):
    """setup.py cannot import gsops at build time; its GSOPS_SKIP_CUDA agrees with gsops.flags."""
    res = _setup_version(value)
    if on is None:
        assert res.returncode != 0
        assert "GSOPS_SKIP_CUDA='maybe' must be 1, true, yes or on" in res.stderr, res.stderr[-2000:]
        with pytest.raises(ValueError):
            flags.parse_flag("GSOPS_SKIP_CUDA", value)
        return
    assert res.returncode == 0, res.stderr[-2000:]
    assert flags.parse_flag("GSOPS_SKIP_CUDA", value) is on
    assert ("skipping the CUDA extension: GSOPS_SKIP_CUDA=1" in res.stderr) is on, res.stderr[-2000:]


def test_setup_takes_the_version_from_the_package():
    import gsops

    res = _setup_version("1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == gsops.__version__
