"""PEFT OFT / BOFT folders on gsops and back: load_peft_adapter, save_peft_adapter, against the real peft package."""
import copy
import json
import os
import shutil
import warnings

import pytest
import torch

import gsops
from perf import peft_boft
from gsops.reference.peft_cayley import peft_cayley_neumann
from hf_tiny import assert_refused_unchanged, ids, outputs, peft_or_skip, state_hash, tiny_bert, tiny_llama

ATOL = 1e-5  # float32, PEFT's outputs vs gsops's
BERT_QV = ["query", "value"]
LLAMA = ["q_proj", "v_proj", "down_proj"]


def _close(a, b):
    assert (a - b).abs().max().item() <= ATOL, (a - b).abs().max().item()


def _peft_model(base, cfg, factors=1):
    peft = peft_or_skip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if factors > 1:
            with peft_boft.cpu_fbd():
                pm = peft.get_peft_model(copy.deepcopy(base), cfg)
            peft_boft.check_boft_factors(pm, factors)  # PEFT really built the factors asked for
        else:
            pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    return pm.eval()


def _randomise_peft_(pm, std):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "oft_R" in n or "boft_R" in n:
                p.copy_(std * torch.randn(p.shape, generator=g))
            elif "boft_s" in n:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _peft_outputs(pm, x, factors=1):
    if factors > 1:
        with peft_boft.cpu_fbd():
            return outputs(pm, x)
    return outputs(pm, x)


# ------------------------------------------------------------------ PEFT's Cayley-Neumann series
@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 6, 8])
def test_peft_cayley_neumann_is_peft_series_transposed(terms):
    peft = peft_or_skip()
    from peft.tuners.oft.layer import OFTRotationModule

    b, r = 6, 3
    mod = OFTRotationModule(r, b * (b - 1) // 2, b, r * b, use_cayley_neumann=True, num_cayley_neumann_terms=terms)
    v = 0.2 * torch.randn(r, b * (b - 1) // 2, dtype=torch.float64)
    theirs = mod._cayley_batch(v, b, True, terms)                       # PEFT multiplies row vectors by this
    ours = peft_cayley_neumann(gsops.skew(-v, b), terms)                 # gsops applies it to column vectors
    torch.testing.assert_close(ours, theirs.transpose(-1, -2), rtol=0, atol=1e-13)
    # an independent float64 evaluation of the series (I + 2K + ... + 2K^p + K^(p+1))
    K = gsops.skew(-v, b)
    want = torch.eye(b, dtype=torch.float64).expand(r, b, b).clone()
    if terms >= 2:
        want = want + 2 * K
    if terms >= 3:
        p = max(2, terms - 2)
        want = want + sum(2 * torch.linalg.matrix_power(K, j) for j in range(2, p + 1))
        want = want + torch.linalg.matrix_power(K, p + 1)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-13)


# ------------------------------------------------------------------ load_peft_adapter
@pytest.mark.parametrize("neumann,terms", [(False, 5), (True, 5), (True, 3), (True, 7)])
def test_load_peft_oft_equals_peft(neumann, terms, tmp_path):
    peft = peft_or_skip()
    base = tiny_bert()
    cfg = peft.OFTConfig(oft_block_size=8, r=0, target_modules=BERT_QV + ["intermediate.dense"],
                         use_cayley_neumann=neumann, num_cayley_neumann_terms=terms, modules_to_save=["classifier"])
    pm = _peft_model(base, cfg)
    _randomise_peft_(pm, 0.1)
    x = ids()
    want = outputs(pm, x)
    assert (want - outputs(base, x)).abs().max() > 5e-3  # the adapter really changes the function
    pm.save_pretrained(tmp_path)
    ours = gsops.load_peft_adapter(copy.deepcopy(base), tmp_path)
    s = gsops.adapter_summary(ours)
    assert s.method == "oft" and len(s.layers) == 3
    cfg_gs = ours.bert.encoder.layer[0].attention.self.query.gsops_config
    assert cfg_gs.cayley == ("peft_neumann" if neumann else "exact") and cfg_gs.scale is False
    assert ours.classifier.weight.requires_grad
    _close(outputs(ours, x), want)


def test_load_peft_seq_cls_task_type(tmp_path):
    """task_type="SEQ_CLS": PEFT adds "classifier" and "score" to modules_to_save and ignores the one that is absent."""
    peft = peft_or_skip()
    base = tiny_bert()
    pm = _peft_model(base, peft.OFTConfig(task_type="SEQ_CLS", oft_block_size=8, r=0, target_modules=BERT_QV))
    _randomise_peft_(pm, 0.1)
    x = ids()
    want = outputs(pm, x)
    pm.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "adapter_config.json"))["modules_to_save"] == ["classifier", "score"]
    ours = gsops.load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert ours.bert.encoder.layer[0].attention.self.query.gsops_config.modules_to_save == ["classifier"]
    assert not torch.equal(ours.classifier.weight, base.classifier.weight)
    _close(outputs(ours, x), want)


@pytest.mark.parametrize("factors", [1, 2])
def test_load_peft_boft_equals_peft(factors, tmp_path):
    peft = peft_or_skip()
    base = tiny_llama()
    cfg = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=factors, target_modules=LLAMA, boft_dropout=0.0)
    pm = _peft_model(base, cfg, factors)
    _randomise_peft_(pm, 0.3)
    x = ids()
    want = _peft_outputs(pm, x, factors)
    pm.save_pretrained(tmp_path)
    ours = gsops.load_peft_adapter(copy.deepcopy(base), tmp_path)
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.gsops_config.method == "boft" and layer.gsops_config.n_factors == factors
    _close(outputs(ours, x), want)


def test_load_peft_boft_trained_without_fbd_loads_its_one_factor(tmp_path):
    peft = peft_or_skip()
    base = tiny_bert()
    cfg = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=BERT_QV)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()  # no fbd: PEFT silently builds one factor
    peft_boft.check_boft_factors(pm, 1)
    _randomise_peft_(pm, 0.3)
    x = ids()
    want = outputs(pm, x)
    pm.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="holds one factor"):
        ours = gsops.load_peft_adapter(copy.deepcopy(base), tmp_path)
    _close(outputs(ours, x), want)


# ------------------------------------------------------------------ save_peft_adapter
def _gs(base, **kw):
    model = gsops.apply_(copy.deepcopy(base), gsops.AdapterConfig(**kw), verbose=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in gsops.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("kw", [
    dict(method="oft", scale=False, packed=True),
    dict(method="oft", scale=False, packed=False),
    dict(method="boft", n_factors=1, packed=True),
    dict(method="boft", n_factors=2, packed=False),
    dict(method="boft", n_factors=2, packed=True, scale=False),
])
def test_save_peft_adapter_loads_in_peft_to_the_same_outputs(kw, tmp_path):
    peft = peft_or_skip()
    base = tiny_bert()
    ours = _gs(base, block_size=8, target_modules=["query", "value", "output.dense"],
               modules_to_save=["classifier"], **kw)
    x = ids()
    want = outputs(ours, x)
    gsops.save_peft_adapter(ours, tmp_path)
    factors = kw.get("n_factors", 1) if kw["method"] == "boft" else 1
    with warnings.catch_warnings(), peft_boft.cpu_fbd():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    if kw["method"] == "boft":
        peft_boft.check_boft_factors(pm, factors)
    _close(_peft_outputs(pm, x, 2), want)
    # and back: the PEFT folder loads into gsops to the same function
    back = gsops.load_peft_adapter(copy.deepcopy(base), tmp_path)
    _close(outputs(back, x), want)


def test_peft_neumann_round_trip_through_gsops(tmp_path):
    peft = peft_or_skip()
    base = tiny_bert()
    pm = _peft_model(base, peft.OFTConfig(oft_block_size=8, r=0, target_modules=BERT_QV, use_cayley_neumann=True))
    _randomise_peft_(pm, 0.1)
    x = ids()
    want = outputs(pm, x)
    pm.save_pretrained(tmp_path / "a")
    ours = gsops.load_peft_adapter(copy.deepcopy(base), tmp_path / "a")
    gsops.save_peft_adapter(ours, tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b").eval()
    assert torch.equal(outputs(again, x), want)  # the same numbers come back: bit-for-bit
    # gsops's own format keeps peft_neumann too
    gsops.save_adapter(ours, tmp_path / "c")
    reloaded = gsops.load_adapter(copy.deepcopy(base), tmp_path / "c")
    assert torch.equal(outputs(reloaded, x), outputs(ours, x))


def test_save_peft_adapter_refusals(tmp_path):
    base = tiny_bert()
    for kw, match in [(dict(method="gsoft"), "PEFT has OFT and BOFT, no GSOFT"),
                      (dict(method="double_gsoft"), "no PEFT equivalent"),
                      (dict(method="oft"), "scale=True"),
                      (dict(method="oft", scale=False, cayley="neumann"), "OFTv2"),
                      (dict(method="boft", cayley="neumann"), "exact Cayley")]:
        model = _gs(base, block_size=8, target_modules=["query"], **kw)
        with pytest.raises(ValueError, match=match):
            gsops.save_peft_adapter(model, tmp_path / "x")
        assert not os.path.exists(tmp_path / "x")
    with pytest.raises(ValueError, match="no gsops adapters"):
        gsops.save_peft_adapter(base, tmp_path / "x")


# ------------------------------------------------------------------ hostile / mismatched folders
@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory):
    peft = peft_or_skip()
    base = tiny_bert()
    pm = _peft_model(base, peft.OFTConfig(oft_block_size=8, r=0, target_modules=BERT_QV,
                                          modules_to_save=["classifier"]))
    _randomise_peft_(pm, 0.1)
    path = tmp_path_factory.mktemp("peft") / "oft"
    pm.save_pretrained(path)
    return path


def _edited(src, dst, config=None, tensors=None):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.load(open(dst / "adapter_config.json"))
        config(cfg)
        json.dump(cfg, open(dst / "adapter_config.json", "w"))
    if tensors is not None:
        t = load_file(dst / "adapter_model.safetensors")
        tensors(t)
        save_file({k: v.contiguous() for k, v in t.items()}, dst / "adapter_model.safetensors")
    return dst


Q = "base_model.model.bert.encoder.layer.0.attention.self.query.oft_R.weight"


@pytest.mark.parametrize("name,config,tensors,match", [
    ("lora", lambda c: c.update(peft_type="LORA"), None, "peft_type='LORA' is not supported"),
    ("coft", lambda c: c.update(coft=True), None, "coft=True is not supported"),
    ("share", lambda c: c.update(block_share=True), None, "block_share=True"),
    ("bias", lambda c: c.update(bias="all"), None, "bias='all'"),
    ("dropout", lambda c: c.update(module_dropout=0.1), None, "module_dropout=0.1"),
    ("fanin", lambda c: c.update(fan_in_fan_out=True), None, "fan_in_fan_out=True"),
    ("unknown", lambda c: c.update(new_knob=1), None, r"unknown OFT config field\(s\) \['new_knob'\]"),
    ("rb", lambda c: c.update(r=4), None, "exactly one of r=4 and oft_block_size=8"),
    ("terms", lambda c: c.update(num_cayley_neumann_terms=0), None, "num_cayley_neumann_terms=0"),
    ("shape", None, lambda t: t.update({Q: t[Q][:, :15]}), r"oft_R.weight has shape \(4, 15\)"),
    ("rows", None, lambda t: t.update({Q: t[Q][:2]}), "in_features=32"),
    ("blocks", None, lambda t: t.update({Q: torch.zeros(8, 6)}), "different"),
    ("layer", None, lambda t: t.update({Q.replace("layer.0", "layer.7"): t.pop(Q)}), "layer.7.attention.self.query"),
    ("prefix", None, lambda t: t.update({"x." + Q: t.pop(Q)}), "does not start with"),
    ("nan", None, lambda t: t[Q].__setitem__((0, 0), float("nan")), "not a finite floating-point"),
    ("int", None, lambda t: t.update({Q: t[Q].to(torch.int32)}), "dtype 'I32'"),
    ("extra", None, lambda t: t.update({"base_model.model.bert.pooler.dense.weight": torch.zeros(32, 32)}),
     "modules_to_save state differs"),
    ("head", None, lambda t: t.update({"base_model.model.classifier.weight": torch.zeros(5, 32)}),
     r"classifier.weight has shape \(5, 32\)"),
    ("mts", lambda c: c.update(modules_to_save=None), None, "neither OFT layers nor modules_to_save"),
])
def test_hostile_peft_folders_are_refused_model_unchanged(peft_folder, tmp_path, name, config, tensors, match):
    path = _edited(peft_folder, tmp_path / name, config, tensors)
    model = tiny_bert()
    assert_refused_unchanged(model, lambda: gsops.load_peft_adapter(model, path), match)


def test_other_refusals(peft_folder, tmp_path):
    model = tiny_bert()
    # a pickle renamed to .safetensors
    bad = _edited(peft_folder, tmp_path / "pickle")
    torch.save({"x": torch.zeros(3)}, bad / "adapter_model.safetensors")
    assert_refused_unchanged(model, lambda: gsops.load_peft_adapter(model, bad), "safetensors")
    # a gsops folder
    gs = gsops.apply_(tiny_bert(), gsops.AdapterConfig(block_size=8, target_modules=["query"]), verbose=False)
    gsops.save_adapter(gs, tmp_path / "gs")
    assert_refused_unchanged(model, lambda: gsops.load_peft_adapter(model, tmp_path / "gs"), "gsops.load_adapter")
    # another base model (different width)
    wide = tiny_llama()
    assert_refused_unchanged(wide, lambda: gsops.load_peft_adapter(wide, peft_folder), "not a module of the model")
    # an already adapted model, a PEFT model
    assert_refused_unchanged(gs, lambda: gsops.load_peft_adapter(gs, peft_folder), "already has gsops adapters")
    peft = peft_or_skip()
    pm = peft.PeftModel.from_pretrained(tiny_bert(), peft_folder)
    with pytest.raises(ValueError, match="is a PEFT model"):
        gsops.load_peft_adapter(pm, peft_folder)
    with pytest.raises(FileNotFoundError):
        gsops.load_peft_adapter(model, tmp_path / "missing")
    assert state_hash(model) == state_hash(tiny_bert())


# ------------------------------------------------------------------ the GS paper's reference code's convention
@pytest.mark.parametrize("packed", [True, False])
def test_from_gs_reference_state_matches_the_papers_formula(packed):
    """Paper: Q = P^T L P R, Cayley blocks (I + K)(I - K)^{-1}; its code: K = 0.5 (A - A^T). Oracle: tests/dense.py."""
    import numpy as np
    from torch import nn
    import dense
    from gsops.adapters import convert

    r, b, d_out = 4, 4, 6
    lin = nn.Linear(r * b, d_out).double()
    model = gsops.apply_(nn.Sequential(lin), gsops.AdapterConfig(block_size=b, packed=packed), verbose=False)
    g = torch.Generator().manual_seed(9)
    A_R, A_L = (0.4 * torch.randn(r, b, b, generator=g, dtype=torch.float64) for _ in range(2))
    s = 1 + 0.1 * torch.randn(d_out, generator=g, dtype=torch.float64)
    before = state_hash(model)
    with pytest.raises(ValueError, match="shape"):
        convert.from_gs_reference_state(model, {"0": {"R": A_R[:2], "L": A_L}})
    assert state_hash(model) == before
    convert.from_gs_reference_state(model, {"0": {"R": A_R, "L": A_L, "scale": s}})
    K = lambda A: 0.5 * (A.detach().numpy() - np.swapaxes(A.detach().numpy(), -1, -2))
    Q = dense.gsoft_matrix(dense.cayley(K(A_L)), dense.cayley(K(A_R)))
    W = lin.weight.detach().numpy()
    x = torch.randn(3, r * b, generator=g, dtype=torch.float64)
    want = (x.numpy() @ Q.T @ W.T) * s.numpy() + lin.bias.detach().numpy()
    np.testing.assert_allclose(model(x).detach().numpy(), want, atol=1e-12)
    # and back: the reference blocks give the same K (A itself up to its symmetric part)
    back = convert.to_reference_blocks(model[0].rotation.factors.params[0], b, packed=packed)
    np.testing.assert_allclose(K(back), K(A_R), atol=1e-15)


def test_peft_neumann_adapter_merges_unmerges_and_disables(tmp_path):
    """PEFT's series is not orthogonal: unmerge divides by Q (Q^{-1}), not Q^T, and gets W back."""
    peft = peft_or_skip()
    base = tiny_bert()
    pm = _peft_model(base, peft.OFTConfig(oft_block_size=8, r=0, target_modules=BERT_QV, use_cayley_neumann=True))
    _randomise_peft_(pm, 0.1)
    pm.save_pretrained(tmp_path)
    ours = gsops.load_peft_adapter(copy.deepcopy(base), tmp_path)
    q = ours.bert.encoder.layer[0].attention.self.query
    W0 = q.base_layer.weight.detach().clone()
    x = ids()
    want = outputs(pm, x)
    Q = q.rotation.dense(torch.float64)
    assert (Q.T @ Q - torch.eye(32, dtype=torch.float64)).abs().max() > 1e-4  # really not orthogonal
    with gsops.disable_adapters(ours):
        assert torch.equal(outputs(ours, x), outputs(base, x))
    gsops.merge_(ours)
    _close(outputs(ours, x), want)
    gsops.unmerge_(ours)
    assert (q.base_layer.weight - W0).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="needs method='oft'"):
        gsops.AdapterConfig(method="gsoft", cayley="peft_neumann")


@pytest.mark.parametrize("neumann", [False, True])
def test_loaded_peft_oft_trains_like_peft(neumann, tmp_path):
    """The same loss and the same gradients (negated with PEFT's Cayley-Neumann) as PEFT: training continues as in PEFT."""
    peft = peft_or_skip()
    base = tiny_bert()
    pm = _peft_model(base, peft.OFTConfig(oft_block_size=8, r=0, target_modules=BERT_QV, use_cayley_neumann=neumann,
                                          modules_to_save=["classifier"]))
    _randomise_peft_(pm, 0.1)
    pm.save_pretrained(tmp_path)
    ours = gsops.load_peft_adapter(copy.deepcopy(base), tmp_path)
    x, y = ids(), torch.tensor([1, 2])
    pm(input_ids=x, labels=y).loss.backward()
    ours(input_ids=x, labels=y).loss.backward()
    sign = -1.0 if neumann else 1.0
    for name in ("query", "value"):
        theirs = getattr(pm.base_model.model.bert.encoder.layer[0].attention.self, name).oft_R["default"].weight.grad
        mine = getattr(ours.bert.encoder.layer[0].attention.self, name).rotation.factors.params.grad[0]
        torch.testing.assert_close(mine, sign * theirs, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.classifier.weight.grad,
                               pm.base_model.model.classifier.modules_to_save["default"].weight.grad,
                               rtol=1e-4, atol=1e-6)


class _ConvNet(torch.nn.Module):
    def __init__(self, dilation=1):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 2, padding=1, dilation=dilation)
        self.head = torch.nn.Linear(8 * 6 * 6 if dilation == 1 else 8 * 5 * 5, 16)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_boft_conv2d_both_ways(tmp_path):
    """PEFT's BOFT Conv2d layer rotates the weight's in_channels*k*k side as gsops does: same function both ways."""
    peft = peft_or_skip()
    net = _ConvNet().eval()
    z = torch.randn(2, 4, 5, 5)
    pm = _peft_model(net, peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["conv", "head"]),
                     factors=2)
    _randomise_peft_(pm, 0.3)
    with torch.no_grad(), peft_boft.cpu_fbd():
        want = pm(z)
    pm.save_pretrained(tmp_path / "p")
    ours = gsops.load_peft_adapter(copy.deepcopy(net), tmp_path / "p")
    with torch.no_grad():
        _close(ours(z), want)
    gsops.save_peft_adapter(ours, tmp_path / "back")
    with warnings.catch_warnings(), peft_boft.cpu_fbd():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "back").eval()
        with torch.no_grad():
            assert torch.equal(again(z), want)
    # a dilated convolution: PEFT's layer ignores the dilation, so the function would differ
    dil = _ConvNet(dilation=2)
    ours = gsops.apply_(copy.deepcopy(dil), gsops.AdapterConfig(method="boft", block_size=4, target_modules=["conv"]),
                        verbose=False)
    with pytest.raises(ValueError, match=r"dilation=\(2, 2\)"):
        gsops.save_peft_adapter(ours, tmp_path / "d")
    assert not os.path.exists(tmp_path / "d")


def test_oft_conv2d_layers_are_refused_both_ways(tmp_path):
    peft = peft_or_skip()
    from torch import nn

    net = nn.Sequential(nn.Conv2d(4, 8, 2), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    pm = _peft_model(net, peft.OFTConfig(oft_block_size=4, r=0, target_modules=["0", "2"]))
    pm.save_pretrained(tmp_path / "p")
    fresh = copy.deepcopy(net)
    assert_refused_unchanged(fresh, lambda: gsops.load_peft_adapter(fresh, tmp_path / "p"),
                             "layer 0 is Conv2d; only nn.Linear layers")
    ours = gsops.apply_(copy.deepcopy(net), gsops.AdapterConfig(method="oft", scale=False, block_size=4,
                                                                target_modules=[nn.Conv2d]), verbose=False)
    with pytest.raises(ValueError, match="not nn.Linear"):
        gsops.save_peft_adapter(ours, tmp_path / "g")
    assert not os.path.exists(tmp_path / "g")


def test_old_peft_neumann_folder_warns_like_peft(peft_folder, tmp_path):
    path = _edited(peft_folder, tmp_path / "old", lambda c: c.update(peft_version="0.17.1"))
    with pytest.warns(UserWarning, match="older than 0.18"):
        gsops.load_peft_adapter(tiny_bert(), path)
