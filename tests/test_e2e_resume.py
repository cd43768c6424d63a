"""Checkpoint/resume: an interrupted fine-tune restarted from its last checkpoint ends where an uninterrupted one does."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gsops
from gsops.training import load_checkpoint, save_checkpoint

STEPS, SAVE_EVERY, CRASH_AT = 12, 5, 8  # last checkpoint before the crash: step 5 (steps 5..7 are redone)


def _base():
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _adapted(method):
    m = _base()
    cfg = gsops.AdapterConfig(method=method, rank=2) if method in ("sorsa", "loldu") else \
        gsops.AdapterConfig(method=method, block_size=4, n_factors=2)
    gsops.apply_(m, cfg, verbose=False)
    m[3].base_layer.bias.requires_grad_(True)  # a trainable non-adapter parameter rides along
    return m


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 16, generator=g), torch.randint(0, 3, (64,), generator=g)


def _optim(m):
    opt = torch.optim.AdamW(gsops.trainable_parameters(m), lr=5e-2, weight_decay=1e-2)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)


def _run(model, opt, sched, start, stop, ckpt=None, crash_at=None):
    X, y = _data()
    for step in range(start, stop):
        if crash_at is not None and step == crash_at:
            raise KeyboardInterrupt
        idx = torch.randperm(64)[:16]  # data order and dropout use the global RNG: the checkpoint restores it
        loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if ckpt is not None and (step + 1) % SAVE_EVERY == 0:
            save_checkpoint(model, opt, ckpt, step=step + 1, scheduler=sched, extra={"loss": float(loss)})


def _params(m):
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["gsoft", "boft", "sorsa"])
def test_interrupted_finetune_resumes_to_the_same_parameters(tmp_path, method):
    torch.manual_seed(123)
    ref = _adapted(method)
    opt, sched = _optim(ref)
    _run(ref, opt, sched, 0, STEPS)
    want = _params(ref)

    torch.manual_seed(123)
    m = _adapted(method)
    opt, sched = _optim(m)
    with pytest.raises(KeyboardInterrupt):
        _run(m, opt, sched, 0, STEPS, ckpt=tmp_path / "ckpt", crash_at=CRASH_AT)
    del m, opt, sched
    torch.manual_seed(999)  # a fresh process: different RNG state until the checkpoint restores it

    m = _adapted(method)  # as the user's script does: rebuild the adapted model, then load
    opt, sched = _optim(m)
    info = load_checkpoint(m, opt, tmp_path / "ckpt", scheduler=sched)
    assert info["step"] == SAVE_EVERY
    _run(m, opt, sched, info["step"], STEPS, ckpt=tmp_path / "ckpt")
    got = _params(m)
    assert set(got) == set(want)
    moved = max(float((want[n] - p0).abs().max()) for n, p0 in _params(_adapted(method)).items())
    assert moved > 1e-2  # training changed the parameters, so equality is not vacuous
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6, msg=lambda s: f"{n}: {s}")


def test_resume_without_restoring_state_would_differ(tmp_path):
    """Control: dropping the optimizer state on resume changes the result (the equality above is not luck)."""
    torch.manual_seed(123)
    ref = _adapted("gsoft")
    opt, sched = _optim(ref)
    _run(ref, opt, sched, 0, STEPS)
    torch.manual_seed(123)
    m = _adapted("gsoft")
    opt, sched = _optim(m)
    _run(m, opt, sched, 0, SAVE_EVERY, ckpt=tmp_path / "ckpt")
    m = _adapted("gsoft")
    opt, sched = _optim(m)
    info = load_checkpoint(m, None, tmp_path / "ckpt", scheduler=None)  # fresh Adam moments, fresh LR
    _run(m, opt, sched, info["step"], STEPS)
    diff = max(float((a - b).abs().max()) for a, b in zip(_params(m).values(), _params(ref).values()))
    assert diff > 1e-4


def test_load_checkpoint_into_bare_model_and_bad_input(tmp_path):
    torch.manual_seed(0)
    m = _adapted("gsoft")
    opt, _ = _optim(m)
    _run(m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 0, 3)
    save_checkpoint(m, opt, tmp_path / "c", step=3)
    bare = _base()  # load_checkpoint applies the saved config and re-enables the trained bias
    info = load_checkpoint(bare, None, tmp_path / "c")
    assert info["step"] == 3
    x = torch.randn(4, 16)
    m.eval(), bare.eval()
    torch.testing.assert_close(bare(x), m(x), rtol=0, atol=0)
    assert [n for n, p in bare.named_parameters() if p.requires_grad] == \
        [n for n, p in m.named_parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(m, opt, tmp_path / "d", step=-1)
    with pytest.raises(TypeError, match="optimizer"):
        save_checkpoint(m, None, tmp_path / "d", step=0)
    with pytest.raises(FileNotFoundError, match="checkpoint.json"):
        load_checkpoint(m, opt, tmp_path / "missing")
    with pytest.raises(ValueError, match="scheduler"):
        load_checkpoint(m, opt, tmp_path / "c", scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
