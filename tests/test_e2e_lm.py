"""A Hugging Face Llama built from a config, adapted on every attention/MLP Linear: step-0 loss == base loss.

Uses the helpers of ``examples/lm_stdlib.py`` (byte-level data from the standard library's own sources).
"""
import importlib.util
import os

import pytest
import torch

import gsops

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("lm_stdlib", os.path.join(ROOT, "examples", "lm_stdlib.py"))
lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lm)

N_TARGETS = 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def setup():
    data = lm.read_bytes(lm.stdlib_files("*.py")[:3], 50_000)
    base = lm.tiny_llama(hidden=16, layers=2, heads=2, intermediate=32, seq=17, seed=0, dtype=torch.float64)
    lm.pretrain(base, data, steps=3, batch=4, seq=16, lr=1e-2, seed=0)  # leaves the weights frozen
    g = torch.Generator().manual_seed(0)
    tokens = lm.batch_at(data, g, 4, 16)
    base.eval()
    with torch.no_grad():
        return base, data, tokens, lm.lm_loss(base, tokens).item()


def test_corpus_is_python_source():
    files = lm.stdlib_files("*.py")
    assert any(f.endswith(os.sep + "os.py") for f in files)
    data = lm.read_bytes(files[:2], 10_000)
    assert data.dtype == torch.long and 0 <= int(data.min()) and int(data.max()) < 256


@pytest.mark.parametrize("method", ["gsops gsoft", "gsops double_gsoft", "gsops oft", "gsops boft",
                                    "gsops sorsa", "gsops loldu"])
def test_adapted_llama_step0_loss_equals_base(setup, method):
    base, data, tokens, base_loss = setup
    model = lm.adapt(base, method, block_size=4, rank=2)
    names = [n for n, _ in gsops.adapters.adapter_layers(model)]
    assert len(names) == N_TARGETS and all(n.rsplit(".", 1)[-1].endswith("_proj") for n in names)
    model.eval()
    with torch.no_grad():
        step0 = lm.lm_loss(model, tokens).item()
    assert abs(step0 - base_loss) <= 1e-10 * max(1.0, abs(base_loss))
    # one training step moves the loss: the adapters are live (the equality above is not vacuous)
    params = gsops.trainable_parameters(model)
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    lm.lm_loss(model, tokens).backward()
    assert all(p.grad is not None for p in params)
    opt.step()
    model.eval()
    with torch.no_grad():
        assert abs(lm.lm_loss(model, tokens).item() - base_loss) > 1e-6
