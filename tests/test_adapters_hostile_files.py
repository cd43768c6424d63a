"""Hostile adapter files: every one is refused with a clear message and the model stays bit-for-bit unchanged.

Each case builds a tampered copy of a folder written by gsops.save_adapter and loads it into (a) a
bare model (load_adapter applies the file's config first) and (b) a model that already has the same
adapters; the state dict, module types and requires_grad flags are hashed before and after.
A last test walks the package's syntax trees: no torch.load without weights_only=True, no pickle.
"""
import ast
import copy
import hashlib
import json
import os
import pathlib
import pickle
import shutil
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import gsops
from gsops.adapters import io as adapter_io

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALL = [nn.Linear, nn.Conv2d]
MARKER = "gsops_pickle_marker"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        x = torch.tanh(self.conv(x))
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def model_hash(model):
    """sha256 over every state-dict tensor's raw bytes (any dtype), module names/types and requires_grad."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for n, m in model.named_modules():
        h.update(f"{n}:{type(m).__name__}".encode())
    for n, p in model.named_parameters():
        h.update(f"{n}:{p.requires_grad}".encode())
    return h.hexdigest()


def _config(method):
    if method in ("sorsa", "loldu"):
        return gsops.AdapterConfig(method=method, rank=2, target_modules=ALL)
    return gsops.AdapterConfig(method=method, block_size=4, target_modules=ALL)


@pytest.fixture(scope="module", params=["gsoft", "sorsa"])
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    base = Net()
    model = gsops.apply_(copy.deepcopy(base), _config(request.param), verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gsops.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    folder = tmp_path_factory.mktemp(f"good_{request.param}")
    gsops.save_adapter(model, folder)
    return request.param, base, folder


def _targets(method, base):
    bare = copy.deepcopy(base)
    adapted = gsops.apply_(copy.deepcopy(base), _config(method), verbose=False)
    return {"bare": bare, "adapted": adapted}


def _copy(good, tmp_path, name="bad"):
    bad = tmp_path / name
    shutil.copytree(good, bad)
    return bad


def _meta(folder):
    return json.loads((folder / adapter_io.CONFIG_FILE).read_text())


def _write_meta(folder, meta):
    (folder / adapter_io.CONFIG_FILE).write_text(json.dumps(meta))


def _tensor_path(folder):
    return folder / adapter_io.TENSOR_FILE


def _refused(method, base, folder, match, exc=ValueError):
    for kind, model in _targets(method, base).items():
        before = model_hash(model)
        with pytest.raises(exc, match=match):
            gsops.load_adapter(model, folder)
        assert model_hash(model) == before, f"{kind} model changed by a refused load of {folder}"


# ------------------------------------------------------------------ the good file loads (sanity)
def test_good_file_loads(saved, tmp_path):
    method, base, good = saved
    for model in _targets(method, base).values():
        gsops.load_adapter(model, good)
        want = load_file(str(_tensor_path(good)))
        got = dict(gsops.adapters.adapter_parameters(model))
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k].detach(), want[k])
    # a folder whose files are symlinks to regular files (the Hugging Face cache layout) is accepted
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in (adapter_io.CONFIG_FILE, adapter_io.TENSOR_FILE):
        os.symlink(good / name, linked / name)
    gsops.load_adapter(copy.deepcopy(base), linked)


def test_save_refuses_nonfinite_and_writes_nothing(saved, tmp_path):
    method, base, good = saved
    model = gsops.load_adapter(copy.deepcopy(base), good)
    p = gsops.trainable_parameters(model)[0]
    with torch.no_grad():
        p[(0,) * p.dim()] = float("nan")
    with pytest.raises(ValueError, match="contain NaN or inf; refusing to save"):
        gsops.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------ tensor file
@pytest.mark.parametrize("where", ["4 bytes", "mid header", "mid data", "last byte"])
def test_truncated_tensor_file(saved, tmp_path, where):
    method, base, good = saved
    bad = _copy(good, tmp_path)
    raw = _tensor_path(good).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    cut = {"4 bytes": 4, "mid header": 8 + n // 2, "mid data": 8 + n + (len(raw) - 8 - n) // 2,
           "last byte": len(raw) - 1}[where]
    _tensor_path(bad).write_bytes(raw[:cut])
    _refused(method, base, bad, "truncated|too short|exceeds")


def _rewrite_tensors(good, bad, edit):
    t = load_file(str(_tensor_path(good)))
    meta = _meta(good)
    edit(t, meta)
    save_file(t, str(_tensor_path(bad)))
    _write_meta(bad, meta)


def _first_key(t):
    return sorted(t)[0]


# Each edit changes the good file's tensors (and maybe its config) given the first tensor's name ``k``;
# the match may name that tensor as {key}.
def _to_int32(t, meta, k):
    t[k] = t[k].round().to(torch.int32)
    meta["tensors"][k]["dtype"] = "int32"


def _to_float64(t, meta, k):
    t[k] = t[k].double()  # the config still says float32


def _add_listed_tensor(t, meta, k):
    t["fc1.evil"] = torch.zeros(3)
    meta["tensors"]["fc1.evil"] = {"shape": [3], "dtype": "float32"}


def _add_unlisted_tensor(t, meta, k):
    t["fc1.evil"] = torch.zeros(3)


def _drop_tensor(t, meta, k):
    del t[k]
    del meta["tensors"][k]


def _grow_tensor(t, meta, k):
    t[k] = torch.zeros(t[k].numel() + 1)
    meta["tensors"][k]["shape"] = [t[k].numel()]


def _nan_in_tensor(t, meta, k):
    t[k].view(-1)[0] = float("nan")


TENSOR_EDITS = [
    pytest.param(_to_int32, "dtype 'I32'", id="integer_dtype_refused"),
    pytest.param(_to_float64, "F64 .* in the tensor file but float32", id="dtype_differs_from_config"),
    pytest.param(_add_listed_tensor, "unexpected in the file: \\['fc1.evil'\\]", id="extra_tensor_in_file_and_config"),
    pytest.param(_add_unlisted_tensor, "unlisted: \\['fc1.evil'\\]", id="unlisted_tensor_in_file"),
    pytest.param(_drop_tensor, "missing from the file", id="missing_tensor"),
    pytest.param(_grow_tensor, "tensor {key} has shape", id="shape_mismatch"),
    pytest.param(_nan_in_tensor, "NaN or inf", id="nan_tensor"),
]


@pytest.mark.parametrize("edit, match", TENSOR_EDITS)
def test_tampered_tensors_refused(saved, tmp_path, edit, match):
    method, base, good = saved
    bad = _copy(good, tmp_path)
    key = _first_key(load_file(str(_tensor_path(good))))
    _rewrite_tensors(good, bad, lambda t, meta: edit(t, meta, key))
    _refused(method, base, bad, match.format(key=key))


def test_offsets_out_of_bounds(saved, tmp_path):
    method, base, good = saved
    bad = _copy(good, tmp_path)
    raw = _tensor_path(good).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    k = sorted(k for k in header if k != "__metadata__")[0]
    header[k]["data_offsets"][1] += 10 ** 9  # points far past the end
    new = json.dumps(header).encode()
    _tensor_path(bad).write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    _refused(method, base, bad, "data_offsets")


@pytest.mark.parametrize("length", ["huge", "over limit"])
def test_oversized_header(saved, tmp_path, length):
    method, base, good = saved
    bad = _copy(good, tmp_path)
    p = _tensor_path(bad)
    if length == "huge":
        p.write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
    else:  # a header just over the limit that is really there (a sparse file, cheap to write)
        n = adapter_io.MAX_HEADER_BYTES + 1
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", n) + b"{")
            f.truncate(8 + n + 16)
    _refused(method, base, bad, "header length .* exceeds")


class _Evil:
    def __reduce__(self):
        return (open, (os.path.join(os.environ.get("GSOPS_TEST_TMP", "/tmp"), MARKER), "w"))


@pytest.mark.parametrize("kind", ["torch.save", "raw pickle", "evil pickle"])
def test_pickle_renamed_to_safetensors(saved, tmp_path, kind, monkeypatch):
    method, base, good = saved
    monkeypatch.setenv("GSOPS_TEST_TMP", str(tmp_path))
    bad = _copy(good, tmp_path)
    p = _tensor_path(bad)
    if kind == "torch.save":
        torch.save(load_file(str(_tensor_path(good))), p)
    elif kind == "raw pickle":
        p.write_bytes(pickle.dumps(load_file(str(_tensor_path(good))), protocol=2))
    else:
        p.write_bytes(pickle.dumps(_Evil(), protocol=4))
    _refused(method, base, bad, "not a safetensors file|too short|exceeds|not valid")
    assert not (tmp_path / MARKER).exists(), "a pickle inside the file was executed"


# ------------------------------------------------------------------ config file
def test_config_names_another_method(saved, tmp_path):
    method, base, good = saved
    bad = _copy(good, tmp_path)
    meta = _meta(good)
    other = "oft" if method == "gsoft" else "loldu"
    meta["config"]["method"] = other
    _write_meta(bad, meta)
    # bare: the file's own layers say another adapter type / the tensors do not fit; adapted: config differs
    _refused(method, base, bad, "config differs|tensors differ|in the file but|has shape")


def test_config_names_another_block_size_or_rank(saved, tmp_path):
    method, base, good = saved
    bad = _copy(good, tmp_path)
    meta = _meta(good)
    if method == "gsoft":  # the per-layer block size recorded in the file is what a load builds
        for info in meta["layers"].values():
            info["block_size"] = 8
    else:
        meta["config"]["rank"] = 3  # sorsa: apply_ rewrites base weights before the shapes disagree
    _write_meta(bad, meta)
    _refused(method, base, bad, "config differs|has shape|in the file but|does not fit the model: conv: block_size=8 must divide")


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("\xff\xfe garbage", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "not valid JSON|not a gsops adapter config"),
    ("[1, 2, 3]", "not a gsops adapter config"),
    ('{"format": "gsops-adapter", "format_version": 99}', "format_version=99"),
])
def test_non_json_or_wrong_json_config(saved, tmp_path, text, match):
    method, base, good = saved
    bad = _copy(good, tmp_path)
    (bad / adapter_io.CONFIG_FILE).write_bytes(text.encode("utf-8", "surrogateescape") if "\xff" not in text
                                               else b"\xff\xfe garbage")
    _refused(method, base, bad, match)


@pytest.mark.parametrize("field, value, match", [
    ("config", [1], "'config' must be an object"),
    ("layers", {"fc1": "Linear"}, "layers\\['fc1'\\] must be"),
    ("tensors", {"x": {"shape": "big", "dtype": "float32"}}, "tensors\\['x'\\] must be"),
    ("config.block_size", "4", "invalid adapter config: block_size must be an int"),
    ("config.method", "lora", "invalid adapter config: method='lora'"),
    ("config.unknown", 1, "unknown AdapterConfig field"),
    ("config.target_modules", 7, "target_modules must be a string or a list"),
    ("config.target_modules", ["type:antigravity.Thing"], "not imported"),
    ("config.target_modules", ["type:os.system"], "invalid adapter config"),
])
def test_malformed_config_fields(saved, tmp_path, field, value, match):
    method, base, good = saved
    bad = _copy(good, tmp_path)
    meta = _meta(good)
    if field.startswith("config."):
        meta["config"][field.split(".", 1)[1]] = value
    else:
        meta[field] = value
    _write_meta(bad, meta)
    had = "antigravity" in sys.modules
    _refused(method, base, bad, match)
    assert ("antigravity" in sys.modules) == had, "a config imported a module"


def test_huge_config_refused_before_parsing(saved, tmp_path):
    method, base, good = saved
    bad = _copy(good, tmp_path)
    with open(bad / adapter_io.CONFIG_FILE, "r+b") as f:  # valid JSON start, then a sparse tail over the limit
        f.truncate(adapter_io.MAX_CONFIG_BYTES + 1)
    _refused(method, base, bad, "over MAX_CONFIG_BYTES")


# ------------------------------------------------------------------ paths that are not files
@pytest.mark.parametrize("case", ["dir instead of file", "link to /dev/zero", "fifo", "dangling link",
                                  "path is a file", "missing folder"])
def test_paths_that_are_not_files(saved, tmp_path, case):
    method, base, good = saved
    bad = _copy(good, tmp_path)
    p = _tensor_path(bad)
    exc, match = ValueError, "not a regular file"
    if case == "dir instead of file":
        p.unlink()
        p.mkdir()
    elif case == "link to /dev/zero":
        if not os.path.exists("/dev/zero"):
            pytest.skip("no /dev/zero on this system")
        p.unlink()
        os.symlink("/dev/zero", p)
    elif case == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this system")
        p.unlink()
        os.mkfifo(p)  # opening it for reading would block forever
    elif case == "dangling link":
        p.unlink()
        os.symlink(tmp_path / "nowhere", p)
        exc, match = FileNotFoundError, "does not exist"
    elif case == "path is a file":
        bad = p
        match = "is not a folder"
    else:
        bad = tmp_path / "missing"
        exc, match = FileNotFoundError, "does not exist"
    _refused(method, base, bad, match, exc)


# ------------------------------------------------------------------ no unpickling anywhere in the package
def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _unsafe(tree, f) -> list:
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib") for n in names):
                offenders.append(f"{f}:{node.lineno}: imports an unpickler")
    for call in _calls(tree):
        name = _dotted(call.func)
        kw = {k.arg: k.value for k in call.keywords}
        if name.endswith("torch.load") or name == "torch.serialization.load":
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                offenders.append(f"{f}:{call.lineno}: {name}(...) without weights_only=True")
        if name.endswith(("np.load", "numpy.load")):
            ap = kw.get("allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                offenders.append(f"{f}:{call.lineno}: {name}(allow_pickle=...)")
        if name.split(".")[-1] in ("loads", "load", "Unpickler") and name.split(".")[0] in ("pickle", "dill"):
            offenders.append(f"{f}:{call.lineno}: {name}")
    return offenders


def test_no_unsafe_deserialisation_in_package():
    files = sorted((ROOT / "gsops").rglob("*.py")) + sorted((ROOT / "triton_kernels").rglob("*.py"))
    assert len(files) > 10
    offenders = []
    for f in files:
        offenders += _unsafe(ast.parse(f.read_text(), str(f)), f)
    assert not offenders, offenders


def test_unsafe_deserialisation_detector_can_fail():
    # the scanner must flag each of these (a check that cannot fail proves nothing)
    src = ("import pickle\nimport torch\nx = torch.load('f')\ny = torch.load('f', weights_only=False)\n"
           "pickle.loads(b'')\nz = torch.load('f', weights_only=True)\nimport numpy as np\n"
           "np.load('f', allow_pickle=True)\n")
    found = _unsafe(ast.parse(src), "src")
    assert [int(o.split(":")[1]) for o in found] == [1, 3, 4, 5, 8], found
