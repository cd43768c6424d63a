"""Model-level verbs: AdapterConfig, apply_, merge_/unmerge_/revert_, save/load, training, HF models."""
import copy
import json
import os
import warnings

import pytest
import torch
from torch import nn

import gsops
from gsops.tolerances import tol

import hf_tiny
from hf_tiny import assert_refused_unchanged

METHODS = ["gsoft", "double_gsoft", "oft", "boft", "sorsa", "loldu"]


def config_for(method, **kw):
    if method in ("sorsa", "loldu"):
        kw.setdefault("rank", 2)
    else:
        kw.setdefault("block_size", 4)
    return gsops.AdapterConfig(method=method, **kw)


class Net(nn.Module):
    """Conv 3x3 -> conv 1x3 (stride 2) -> linear -> linear; every dimension divisible by 8."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, (1, 3), stride=2, padding=(0, 1))
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


ALL = [nn.Linear, nn.Conv2d]


def perturb_(model, std=0.2):
    hf_tiny.perturb_(gsops.trainable_parameters(model), std=std)


# ------------------------------------------------------------------ config
def test_config_validation_messages():
    with pytest.raises(ValueError, match="method='lora' must be one of"):
        gsops.AdapterConfig(method="lora")
    with pytest.raises(TypeError, match="block_size must be an int"):
        gsops.AdapterConfig(block_size=4.0)
    with pytest.raises(ValueError, match="block_size=0 must be >= 1"):
        gsops.AdapterConfig(block_size=0)
    with pytest.raises(ValueError, match="needs rank=<int>"):
        gsops.AdapterConfig(method="sorsa")
    with pytest.raises(ValueError, match="rank=4 is only used by"):
        gsops.AdapterConfig(method="gsoft", rank=4)
    with pytest.raises(ValueError, match="n_factors=3: method='gsoft' has exactly 2 factors"):
        gsops.AdapterConfig(method="gsoft", n_factors=3)
    with pytest.raises(ValueError, match="cayley='cholesky'"):
        gsops.AdapterConfig(cayley="cholesky")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        gsops.AdapterConfig(target_modules=["fc("])
    with pytest.raises(ValueError, match="type Conv1d is not supported"):
        gsops.AdapterConfig(target_modules=[nn.Conv1d])
    with pytest.raises(TypeError, match="scale must be a bool"):
        gsops.AdapterConfig(scale=1)
    with pytest.raises(ValueError, match="block_size=3 must be even for boft"):
        gsops.AdapterConfig(method="boft", block_size=3, n_factors=2)
    cfg = gsops.AdapterConfig(method="boft", block_size=4, n_factors=3, target_modules=["fc", nn.Conv2d])
    assert gsops.adapters.AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_apply_error_names_layer_and_leaves_model_unchanged():
    model = Net()
    # conv1 has in_channels*kh*kw = 8*3*3 = 72, which block_size=32 does not divide
    for kw, match in ((dict(block_size=32, target_modules=ALL, strict=True),
                       r"conv1: block_size=32 must divide in_channels\*kh\*kw=72"),
                      (dict(method="loldu", rank=9), r"fc2: rank=9 must be <= min\(out, in\)=8"),
                      (dict(target_modules=["nothing_here"]), "no nn.Linear, nn.Conv2d or transformers' Conv1D layer")):
        assert_refused_unchanged(model, lambda: gsops.apply_(model, gsops.AdapterConfig(**kw), verbose=False), match)


# ------------------------------------------------------------------ apply_ / revert_
def test_apply_targets_freezes_and_summarises(caplog):
    model = Net()
    with caplog.at_level("INFO", logger="gsops"):
        gsops.apply_(model, gsops.AdapterConfig(block_size=8))
    assert any("2 layer(s) wrapped" in r.getMessage() for r in caplog.records)  # default: every nn.Linear only
    assert isinstance(model.conv1, nn.Conv2d) and not isinstance(model.fc1, nn.Linear)
    s = gsops.adapter_summary(model)
    expected = 2 * 16 * 28 + 32 + 2 * 4 * 28 + 8  # packed blocks of 8: 28 numbers each, + scales
    assert s.trainable == expected == sum(p.numel() for p in gsops.trainable_parameters(model))
    assert s.base == sum(p.numel() for p in Net().parameters())
    assert abs(s.percent - 100 * expected / s.base) < 1e-9
    assert not model.conv1.weight.requires_grad and not model.fc1.base_layer.weight.requires_grad
    gsops.revert_(model)
    model2 = gsops.apply_(Net(), gsops.AdapterConfig(block_size=8, target_modules=["conv1", "conv2", nn.Linear]), verbose=False)
    assert len(gsops.adapter_summary(model2).layers) == 4


def test_apply_twice_refused_and_skips_reported():
    model = gsops.apply_(Net(), gsops.AdapterConfig(block_size=8), verbose=False)
    with pytest.raises(ValueError, match="already has gsops adapters"):
        gsops.apply_(model, gsops.AdapterConfig(block_size=8), verbose=False)
    seq = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), nn.Conv2d(4, 8, 1))  # grouped convolutions are wrapped too
    gsops.apply_(seq, gsops.AdapterConfig(block_size=2, target_modules=[nn.Conv2d]), verbose=False)
    assert not isinstance(seq[0], nn.Conv2d) and not isinstance(seq[1], nn.Conv2d)
    mha = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        gsops.apply_(mha, gsops.AdapterConfig(block_size=4), verbose=False)
    assert isinstance(mha[0].out_proj, nn.Linear) and not isinstance(mha[1], nn.Linear)


@pytest.mark.parametrize("method", METHODS)
def test_init_merge_unmerge_revert_model(method):
    model = Net().double()
    x = torch.randn(3, 8, 8, 8, dtype=torch.float64)
    y_base = model(x)
    frozen_before = {n: p.requires_grad for n, p in model.named_parameters()}
    gsops.apply_(model, config_for(method, target_modules=ALL), verbose=False)
    torch.testing.assert_close(model(x), y_base, **tol(torch.float64))  # exactly the base model at init
    perturb_(model)
    y = model(x)
    assert (y - y_base).abs().max() > 1e-3
    gsops.merge_(model)
    torch.testing.assert_close(model(x), y, **tol(torch.float64))
    with pytest.warns(UserWarning, match="already merged"):
        gsops.merge_(model)
    torch.testing.assert_close(model(x), y, **tol(torch.float64))
    gsops.unmerge_(model)
    torch.testing.assert_close(model(x), y, **tol(torch.float64))
    with pytest.warns(UserWarning, match="were not merged"):
        gsops.unmerge_(model)
    gsops.merge_(model)
    torch.testing.assert_close(model(x), y, **tol(torch.float64))
    gsops.revert_(model)
    assert all(type(m) in (Net, nn.Conv2d, nn.Linear) for m in model.modules())
    torch.testing.assert_close(model(x), y_base, **tol(torch.float64))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == frozen_before


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("method", METHODS)
def test_save_load_fresh_model(method, tmp_path):
    torch.manual_seed(3)
    base = Net()
    x = torch.randn(2, 8, 8, 8)
    model = gsops.apply_(copy.deepcopy(base), config_for(method, target_modules=ALL), verbose=False)
    perturb_(model)
    y = model(x)
    gsops.save_adapter(model, tmp_path / "ad")
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = gsops.apply_(copy.deepcopy(base), config_for(method, target_modules=ALL), verbose=False)
    gsops.load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh(x), y)
    bare = copy.deepcopy(base)  # a model without adapters gets the file's config applied
    gsops.load_adapter(bare, tmp_path / "ad")
    assert torch.equal(bare(x), y)


def test_load_mismatch_raises_and_leaves_model_unchanged(tmp_path):
    base = Net()
    model = gsops.apply_(copy.deepcopy(base), gsops.AdapterConfig(block_size=4, target_modules=ALL), verbose=False)
    perturb_(model)
    gsops.save_adapter(model, tmp_path / "good")

    other = gsops.apply_(copy.deepcopy(base), gsops.AdapterConfig(block_size=8, target_modules=ALL), verbose=False)
    assert_refused_unchanged(other, lambda: gsops.load_adapter(other, tmp_path / "good"), "config differs")

    # same config, a layer of another shape
    wide = copy.deepcopy(base)
    wide.fc2 = nn.Linear(32, 16)
    wide = gsops.apply_(wide, gsops.AdapterConfig(block_size=4, target_modules=ALL), verbose=False)
    assert_refused_unchanged(wide, lambda: gsops.load_adapter(wide, tmp_path / "good"), "fc2")

    # bare model of another shape: refused before anything is applied
    bare = copy.deepcopy(base)
    bare.fc2 = nn.Linear(32, 16)
    assert_refused_unchanged(bare, lambda: gsops.load_adapter(bare, tmp_path / "good"), "fc2")

    # a tampered tensor file (a tensor of the wrong shape)
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    t = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))
    key = next(k for k in t if k.endswith("scale"))
    t[key] = torch.ones(t[key].numel() + 1)
    save_file(t, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    target = gsops.apply_(copy.deepcopy(base), gsops.AdapterConfig(block_size=4, target_modules=ALL), verbose=False)
    assert_refused_unchanged(target, lambda: gsops.load_adapter(target, bad), f"{key}")

    # a merged model is refused
    gsops.merge_(target)
    assert_refused_unchanged(target, lambda: gsops.load_adapter(target, tmp_path / "good"), "unmerge_")

    with pytest.raises(FileNotFoundError):
        gsops.load_adapter(target, tmp_path / "missing")
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        gsops.load_adapter(target, bad)


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("method", METHODS)
def test_training_reduces_loss(method):
    torch.manual_seed(0)
    base = Net()
    teacher = copy.deepcopy(base)
    with torch.no_grad():  # a nearby target: rotate and rescale the base weights a little
        for m in teacher.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                W = m.weight.reshape(m.weight.shape[0], -1)
                Q, _ = torch.linalg.qr(torch.eye(W.shape[1]) + 0.3 * torch.randn(W.shape[1], W.shape[1]))
                m.weight.copy_((1.2 * W @ Q).reshape(m.weight.shape))
    x = torch.randn(64, 8, 8, 8)
    target = teacher(x).detach()
    student = copy.deepcopy(base)
    gsops.apply_(student, config_for(method, target_modules=ALL), verbose=False)
    opt = torch.optim.Adam(gsops.trainable_parameters(student), lr=1e-2)

    def loss_fn():
        loss = (student(x) - target).pow(2).mean()
        if method == "sorsa":
            loss = loss + 1e-3 * gsops.sorsa_regularizer(student)
        return loss

    first = loss_fn().item()
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    last = loss_fn().item()
    assert last < 0.95 * first, (first, last)


def test_sorsa_regularizer():
    model = gsops.apply_(Net(), gsops.AdapterConfig(method="sorsa", rank=3), verbose=False)
    reg = gsops.sorsa_regularizer(model)
    assert reg.item() < 1e-5
    reg.backward()
    assert all(torch.isfinite(p.grad).all() for p in gsops.trainable_parameters(model) if p.grad is not None)
    perturb_(model, 0.1)
    U, Vh = model.fc1.U.detach().double(), model.fc1.Vh.detach().double()
    want = 0.0
    for m in (model.fc1, model.fc2):
        U, Vh = m.U.detach().double(), m.Vh.detach().double()
        want += torch.linalg.norm(U.T @ U - torch.eye(3, dtype=torch.float64)).item()
        want += torch.linalg.norm(Vh @ Vh.T - torch.eye(3, dtype=torch.float64)).item()
    assert abs(gsops.sorsa_regularizer(model).item() - want) < 1e-4 * want
    with pytest.raises(ValueError, match="no SORSA layer"):
        gsops.sorsa_regularizer(Net())


# ------------------------------------------------------------------ Hugging Face / torchvision
def _tiny_roberta():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=40, num_labels=2)
    return transformers.RobertaForSequenceClassification(cfg).eval()


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=40)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", METHODS)
def test_hf_roberta_one_step(method):
    torch.manual_seed(0)
    model = _tiny_roberta()
    ids = torch.randint(3, 50, (2, 7))
    labels = torch.tensor([0, 1])
    base_logits = model(input_ids=ids).logits
    targets = r".*(attention.*|intermediate\.dense|output\.dense)"  # one regex, matched on the full name
    gsops.apply_(model, config_for(method, target_modules=targets), verbose=False)
    torch.testing.assert_close(model(input_ids=ids).logits, base_logits, **tol(torch.float32))
    opt = torch.optim.SGD(gsops.trainable_parameters(model), lr=0.5)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = [p.grad for p in gsops.trainable_parameters(model)]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    opt.step()
    assert not torch.allclose(model(input_ids=ids).logits, base_logits)
    assert model.roberta.embeddings.word_embeddings.weight.grad is None


def test_hf_llama_one_step_and_merge():
    torch.manual_seed(0)
    model = _tiny_llama()
    ids = torch.randint(0, 50, (2, 9))
    base_logits = model(input_ids=ids).logits
    gsops.apply_(model, gsops.AdapterConfig(method="gsoft", block_size=8, target_modules=r".*layers\.\d+\..*"),
                 verbose=False)
    torch.testing.assert_close(model(input_ids=ids).logits, base_logits, **tol(torch.float32))
    opt = torch.optim.Adam(gsops.trainable_parameters(model), lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    y = model(input_ids=ids).logits.detach()
    gsops.merge_(model)
    torch.testing.assert_close(model(input_ids=ids).logits, y, rtol=1e-4, atol=1e-4)


def test_roberta_base_gsoft_unpacked_count():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.RobertaModel(transformers.RobertaConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsops.apply_(model, gsops.AdapterConfig(method="gsoft", block_size=8, packed=False, scale=True),
                     verbose=False)
    summary = gsops.adapter_summary(model)
    assert len(summary.layers) == 12 * 6 + 1  # q, k, v, attn out, intermediate, output per layer; pooler
    assert summary.trainable == 1_423_104


def test_torchvision_resnet_one_step():
    try:
        import torchvision
    except Exception as e:  # torchvision cannot be imported beside torch 2.13 here
        pytest.skip(f"torchvision cannot be imported: {type(e).__name__}: {e}")
    model = torchvision.models.resnet18(num_classes=4)
    gsops.apply_(model, gsops.AdapterConfig(block_size=4, target_modules=[r"layer\d\.\d\.conv\d", "fc"]),
                 verbose=False)
    x = torch.randn(2, 3, 32, 32)
    loss = model(x).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None for p in gsops.trainable_parameters(model))


def test_shared_module_and_tied_weights():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    x = torch.randn(4, 8)
    y0 = model(x)
    gsops.apply_(model, gsops.AdapterConfig(method="sorsa", rank=2), verbose=False)
    assert model[0] is model[2] and len(gsops.adapter_summary(model).layers) == 1
    perturb_(model)
    gsops.revert_(model)
    assert model[0] is shared and model[2] is shared
    torch.testing.assert_close(model(x), y0, **tol(torch.float32))

    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight  # tied, as in language models
    tied = nn.ModuleDict({"emb": emb, "head": head})
    for method in METHODS:  # targeted by name: refused at apply_ time, for every method
        assert_refused_unchanged(
            tied, lambda: gsops.apply_(tied, config_for(method, target_modules=["head"]), verbose=False),
            "head: its weight is shared")
    # matched only by the default "all-linear": skipped (here nothing is left, so apply_ says why)
    assert_refused_unchanged(tied, lambda: gsops.apply_(tied, gsops.AdapterConfig(block_size=4), verbose=False),
                             r"matched but skipped: head: its weight is shared")
    torch.testing.assert_close(tied["emb"].weight, emb.weight)
