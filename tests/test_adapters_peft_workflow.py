"""merge_and_unload, disable_adapters, modules_to_save and print_trainable_parameters on tiny HF models, against PEFT."""
import copy
import os
import logging

import pytest
import torch
from torch import nn

import gsops
from gsops.tolerances import tol
from hf_tiny import (
    assert_refused_unchanged, ids, logits, peft_or_skip, perturb_, state_hash, tiny_bert, tiny_llama,
)

QV = ["query", "value"]


def _adapted(base, **kw):
    kw.setdefault("method", "gsoft")
    kw.setdefault("block_size", 8)
    model = gsops.apply_(copy.deepcopy(base), gsops.AdapterConfig(**kw), verbose=False)
    perturb_(gsops.trainable_parameters(model))
    return model


# ------------------------------------------------------------------ merge_and_unload
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_merge_and_unload_round_trips_through_save_pretrained(arch, tmp_path):
    base = tiny_bert() if arch == "bert" else tiny_llama()
    targets = QV if arch == "bert" else ["q_proj", "down_proj"]
    kw = dict(modules_to_save=["classifier"]) if arch == "bert" else {}
    model = _adapted(base, target_modules=targets, **kw)
    x = ids()
    want = logits(model, x)
    assert not torch.allclose(want, logits(base, x), atol=1e-3)  # the adapter really changes the function
    out = gsops.merge_and_unload(model)
    assert out is model
    assert list(model.state_dict()) == list(base.state_dict())
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert not gsops.adapters.adapter_layers(model)
    assert all(p.requires_grad for p in model.parameters())  # as before apply_
    got = logits(model, x)
    torch.testing.assert_close(got, want, **tol(torch.float32))
    model.save_pretrained(tmp_path)
    reloaded = type(base).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, x), got)
    with pytest.raises(ValueError, match="no gsops adapters"):
        gsops.merge_and_unload(model)


def test_merge_and_unload_of_a_merged_model_and_refusals():
    base = tiny_bert()
    model = _adapted(base, target_modules=QV)
    x = ids()
    want = logits(model, x)
    gsops.merge_(model)
    gsops.merge_and_unload(model)  # already merged layers are unloaded as they are
    torch.testing.assert_close(logits(model, x), want, **tol(torch.float32))
    bad = _adapted(base, target_modules=QV)
    with torch.no_grad():
        bad.bert.encoder.layer[0].attention.self.value.scale[0] = float("nan")
    assert_refused_unchanged(bad, lambda: gsops.merge_and_unload(bad), "NaN or inf")


def test_merge_and_unload_restores_every_layer_when_a_merge_fails():
    """float16 overflow in the second layer: the first layer's merged weight is put back from a copy."""
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).half()
    model = gsops.apply_(net, gsops.AdapterConfig(block_size=4, target_modules=[nn.Linear]), verbose=False)
    with torch.no_grad():
        model[1].base_layer.weight.fill_(60000.0)
        model[1].scale.fill_(2.0)
    assert_refused_unchanged(model, lambda: gsops.merge_and_unload(model), "not finite")
    assert not model[0].merged and not model[1].merged


# ------------------------------------------------------------------ disable_adapters
def test_disable_adapters_runs_the_base_model_exactly():
    base = tiny_bert()
    model = _adapted(base, target_modules=QV, modules_to_save=["classifier"])
    with torch.no_grad():
        model.classifier.weight.add_(0.5)  # trained head
    x = ids()
    adapted = logits(model, x)
    with gsops.disable_adapters(model) as m:
        assert m is model
        assert torch.equal(logits(model, x), logits(base, x))
        with pytest.raises(ValueError, match="already disabled"):
            with gsops.disable_adapters(model):
                pass
    assert torch.equal(logits(model, x), adapted)
    with pytest.raises(RuntimeError, match="boom"):
        with gsops.disable_adapters(model):
            raise RuntimeError("boom")
    assert torch.equal(logits(model, x), adapted)
    assert gsops.adapter_summary(model).layers


def test_disable_adapters_matches_peft_disable_adapter():
    """PEFT's own ``disable_adapter()`` and ours give the base model's outputs for the same OFT numbers."""
    peft = peft_or_skip()
    base = tiny_bert()
    cfg = peft.OFTConfig(oft_block_size=8, r=0, target_modules=["query", "value"], use_cayley_neumann=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    x = ids()
    with pm.disable_adapter():
        want = logits(pm, x)
    ours = _adapted(base, method="oft", scale=False, target_modules=QV)
    with gsops.disable_adapters(ours):
        assert torch.equal(logits(ours, x), want)


def test_disable_adapters_refusals():
    base = tiny_bert()
    model = _adapted(base, target_modules=QV)
    gsops.merge_(model)
    assert_refused_unchanged(model, lambda: gsops.disable_adapters(model).__enter__(), "merged")
    low = _adapted(base, method="sorsa", block_size=32, rank=2, target_modules=QV)
    assert_refused_unchanged(low, lambda: gsops.disable_adapters(low).__enter__(), "residual")
    with pytest.raises(ValueError, match="no gsops adapters"):
        gsops.disable_adapters(copy.deepcopy(base)).__enter__()


# ------------------------------------------------------------------ modules_to_save
def test_modules_to_save_selection_equals_peft():
    peft = peft_or_skip()
    base = tiny_bert()
    for entries in (["classifier"], ["dense"], ["output.dense", "pooler"]):
        cfg = peft.OFTConfig(oft_block_size=8, r=0, target_modules=["query"], modules_to_save=list(entries))
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        prefix = "base_model.model."
        theirs = sorted(n[len(prefix):] for n, m in pm.named_modules()
                        if type(m).__name__ == "ModulesToSaveWrapper")
        ours = sorted(gsops.adapters.saved_modules.select(base, entries))
        assert ours == theirs, entries


def test_modules_to_save_trained_saved_loaded_and_reverted(tmp_path):
    base = tiny_bert()
    original = copy.deepcopy(base)
    model = gsops.apply_(base, gsops.AdapterConfig(block_size=8, modules_to_save=["classifier"]), verbose=False)
    assert isinstance(model.classifier, nn.Linear)  # every nn.Linear is targeted, but not a saved module
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    assert not model.bert.pooler.dense.base_layer.weight.requires_grad
    x, y = ids(), torch.tensor([0, 2])
    opt = torch.optim.SGD(gsops.trainable_parameters(model), lr=0.5)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
    model.eval()
    assert not torch.equal(model.classifier.weight, original.classifier.weight)
    want = logits(model, x)
    gsops.save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(original)
    gsops.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh, x), want)
    assert fresh.classifier.weight.requires_grad
    gsops.revert_(model)
    assert state_hash(model) == state_hash(original)  # classifier restored to its values before apply_


def test_modules_to_save_refusals(tmp_path):
    base = tiny_bert()
    assert_refused_unchanged(
        base, lambda: gsops.apply_(base, gsops.AdapterConfig(block_size=8, modules_to_save=["nope"]), verbose=False),
        r"\['nope'\] select no module")
    tied = tiny_llama()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    assert_refused_unchanged(
        tied, lambda: gsops.apply_(tied, gsops.AdapterConfig(block_size=8, target_modules=["q_proj"],
                                                             modules_to_save=["lm_head"]), verbose=False),
        "tied weights")
    with pytest.raises(TypeError, match="modules_to_save"):
        gsops.AdapterConfig(modules_to_save=[3])
    # a file whose saved module does not fit the model is refused, the model unchanged
    model = _adapted(base, target_modules=QV, modules_to_save=["classifier"])
    gsops.save_adapter(model, tmp_path / "a")
    other = tiny_bert(num_labels=5)
    assert_refused_unchanged(other, lambda: gsops.load_adapter(other, tmp_path / "a"), "classifier.weight")


# ------------------------------------------------------------------ messages
def test_print_trainable_parameters_matches_peft(capsys):
    peft = peft_or_skip()
    base = tiny_bert()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(oft_block_size=8, r=0, target_modules=["query"]))
    pm.print_trainable_parameters()
    theirs = capsys.readouterr().out.strip()
    ours = gsops.apply_(copy.deepcopy(base), gsops.AdapterConfig(method="oft", block_size=8, scale=False,
                                                               target_modules=["query"]), verbose=False)
    t, a = gsops.print_trainable_parameters(ours)
    assert capsys.readouterr().out.strip() == theirs  # same parameter counts, same line
    assert t == sum(p.numel() for p in pm.parameters() if p.requires_grad)


def test_apply_logs_instead_of_printing(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="gsops"):
        gsops.apply_(tiny_bert(), gsops.AdapterConfig(block_size=8, target_modules=QV))
    assert capsys.readouterr().out == ""
    assert any("2 layer(s) wrapped" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ HF Trainer callback
class _Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randint(0, 96, (24, 7), generator=g), torch.randint(0, 3, (24,), generator=g)

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def _train(out, resume=None):
    from transformers import Trainer, TrainingArguments

    model = gsops.apply_(tiny_bert().train(), gsops.AdapterConfig(block_size=8, target_modules=QV,
                                                                  modules_to_save=["classifier"]), verbose=False)
    args = TrainingArguments(str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], logging_steps=100, use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Data(),
                      callbacks=[gsops.training.AdapterCheckpointCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return model


def test_trainer_callback_checkpoints_hold_only_the_adapter_and_resume_exactly(tmp_path):
    from safetensors.torch import load_file

    full = _train(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-2"
    names = set(os.listdir(ckpt))
    assert "config.json" not in names and not any(n.startswith("model-") for n in names)
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    assert set(load_file(ckpt / "model.safetensors")) == trainable  # no frozen base weight in the checkpoint
    assert any("classifier" in n for n in trainable) and any("rotation" in n for n in trainable)
    resumed = _train(tmp_path / "b", resume=str(ckpt))
    for (n, p), (m, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert n == m and torch.equal(p, q), n
    # the checkpoint is also a gsops adapter folder
    fresh = gsops.load_adapter(tiny_bert(), ckpt)
    assert fresh.classifier.weight.requires_grad


def test_messages_only_on_rank_zero(monkeypatch, capsys, caplog):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    with caplog.at_level(logging.INFO, logger="gsops"):
        model = gsops.apply_(tiny_bert(), gsops.AdapterConfig(block_size=8, target_modules=QV))
        counts = gsops.print_trainable_parameters(model)
    assert capsys.readouterr().out == "" and not caplog.records
    assert counts[0] == sum(p.numel() for p in gsops.trainable_parameters(model))
