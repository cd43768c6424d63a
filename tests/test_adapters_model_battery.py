"""One contract battery over a table of model families x methods x precision modes.

Families are built from tiny configs (no downloads): BERT, RoBERTa, GPT-2
(transformers' Conv1D), Llama with a tied and an untied head, T5, ViT, torch's
nn.TransformerEncoder, and a CNN with plain, strided, grouped and depthwise
convolutions. Every family runs with every method in float32; bfloat16
autocast and float16 parameters run on a few families with every method.

Per row: identity at init, the loss decreases in a few AdamW steps, merge_
keeps the outputs, save_adapter -> load_adapter into a fresh copy of the base
gives the same outputs, revert_ restores the original outputs and weights, and
(where the family supports it) gradient checkpointing gives the same gradients.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

import gsops
from gsops.tolerances import tol

transformers = pytest.importorskip("transformers")

METHODS = gsops.adapters.METHODS
H = 32  # hidden size of every tiny transformer
V = 40  # vocabulary


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(method, **kw):
    if method in ("sorsa", "loldu"):
        return gsops.AdapterConfig(method=method, rank=2, **kw)
    if method == "boft":
        kw.setdefault("n_factors", 2)
    return gsops.AdapterConfig(method=method, block_size=kw.pop("block_size", 4), **kw)


# ------------------------------------------------------------------ families
def _ids(b=2, t=6):
    return torch.randint(3, V, (b, t))


def bert():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=2 * H, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(cfg)
    batch = dict(input_ids=_ids(), labels=torch.tensor([0, 2]))
    return model, batch, lambda out: out.logits, lambda out: out.loss, {}


def roberta():
    cfg = transformers.RobertaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=2 * H, max_position_embeddings=20, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1)
    model = transformers.RobertaForSequenceClassification(cfg)
    batch = dict(input_ids=_ids(), labels=torch.tensor([0, 1]))
    return model, batch, lambda out: out.logits, lambda out: out.loss, {}


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=H, n_layer=1, n_head=2, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = _ids()
    return model, dict(input_ids=ids, labels=ids), lambda out: out.logits, lambda out: out.loss, {}


def _llama(tied):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = _ids()
    return model, dict(input_ids=ids, labels=ids), lambda out: out.logits, lambda out: out.loss, {}


def llama_tied():
    return _llama(True)


def llama_untied():
    return _llama(False)


def t5():
    cfg = transformers.T5Config(vocab_size=V, d_model=H, d_kv=8, d_ff=2 * H, num_layers=1, num_heads=4,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(cfg)
    ids = _ids()
    return model, dict(input_ids=ids, labels=ids), lambda out: out.logits, lambda out: out.loss, {}


def vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=H, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=2 * H, num_labels=3,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.ViTForImageClassification(cfg)
    batch = dict(pixel_values=torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 2]))
    return model, batch, lambda out: out.logits, lambda out: out.loss, {}


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(H, 2, 2 * H, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(H, 3)

    def forward(self, x, labels):
        logits = self.head(self.enc(x).mean(1))
        return logits, nn.functional.cross_entropy(logits.float(), labels)


def torch_encoder():
    batch = dict(x=torch.randn(2, 5, H), labels=torch.tensor([0, 2]))
    # MultiheadAttention reads out_proj.weight itself, so only the feed-forward layers are targeted
    return _Encoder(), batch, lambda out: out[0], lambda out: out[1], dict(target_modules=["linear1", "linear2"])


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Conv2d(4, 8, 3, padding=1)                 # d = 4*3*3 = 36
        self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=1)     # d = 72
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)     # d = 4*3*3 = 36
        self.depthwise = nn.Conv2d(8, 8, 2, padding=1, groups=8)   # d = 1*2*2 = 4
        self.fc = nn.Linear(8, 3)

    def forward(self, x, labels):
        for conv in (self.plain, self.strided, self.grouped, self.depthwise):
            x = torch.tanh(conv(x))
        logits = self.fc(x.mean((2, 3)))
        return logits, nn.functional.cross_entropy(logits.float(), labels)


def cnn():
    batch = dict(x=torch.randn(2, 4, 8, 8), labels=torch.tensor([1, 2]))
    return _CNN(), batch, lambda out: out[0], lambda out: out[1], dict(target_modules=[nn.Conv2d, "fc"])


FAMILIES = {f.__name__: f for f in (bert, roberta, gpt2, llama_tied, llama_untied, t5, vit, torch_encoder, cnn)}
ROWS = ([(f, m, "fp32") for f in FAMILIES for m in METHODS]
        + [(f, m, "bf16-autocast") for f in ("bert", "gpt2", "cnn") for m in METHODS]
        + [(f, m, "fp16") for f in ("llama_untied", "gpt2") for m in METHODS])


def _targets_for(family, method, extra):
    extra = dict(extra)
    if family == "cnn" and method == "double_gsoft":
        # the output rotation mixes channels across groups, which a grouped conv cannot hold
        extra["target_modules"] = ["plain", "strided"]
    return extra


def _out_tol(precision):
    return {"fp32": tol(torch.float32), "bf16-autocast": tol(torch.bfloat16), "fp16": tol(torch.float16)}[precision]


@pytest.mark.parametrize("family, method, precision", ROWS, ids=["-".join(r) for r in ROWS])
def test_battery(family, method, precision, tmp_path):
    torch.manual_seed(0)
    base, batch, logits_of, loss_of, extra = FAMILIES[family]()
    if precision == "fp16":
        base = base.half()
        batch = {k: v.half() if v.is_floating_point() else v for k, v in batch.items()}
    base.eval()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-autocast" \
        else contextlib.nullcontext
    t = _out_tol(precision)

    def run(m, grad=False):
        with ctx(), torch.set_grad_enabled(grad):
            return m(**batch)

    pristine = copy.deepcopy(base)
    y0 = logits_of(run(base))
    config = _config(method, **_targets_for(family, method, extra))
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # block sizes adjusted to the convolutions (tested elsewhere)
        gsops.apply_(model, config, verbose=False)
    layers = gsops.adapter_summary(model).layers
    assert layers
    if family in ("gpt2", "llama_tied", "llama_untied", "t5"):
        assert not any("lm_head" in n for n in layers), "the output layer is not adapted by default"
    if precision != "fp32":
        for _, p in gsops.adapters.adapter_parameters(model):
            assert p.dtype == torch.float32  # float32 adapter parameters on half-precision models

    # identity at init; the output has the dtype the base alone gives
    y_init = logits_of(run(model))
    assert y_init.dtype == y0.dtype
    torch.testing.assert_close(y_init, y0, **t)

    # the loss decreases in a few steps
    opt = torch.optim.AdamW(gsops.trainable_parameters(model), lr=2e-2, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(4):
        opt.zero_grad()
        loss = loss_of(run(model, grad=True))
        loss.float().backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    assert all(torch.isfinite(p).all() for p in gsops.trainable_parameters(model))
    assert losses[-1] < losses[0], losses
    y_trained = logits_of(run(model))
    assert not torch.equal(y_trained, y0)

    # gradient checkpointing gives the same gradients
    if getattr(model, "supports_gradient_checkpointing", False):
        def grads(m):
            m.train()
            for p in gsops.trainable_parameters(m):
                p.grad = None
            loss_of(run(m, grad=True)).float().backward()
            m.eval()
            return [p.grad.clone() for p in gsops.trainable_parameters(m)]

        g_plain = grads(model)
        on = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        on()
        assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        g_ckpt = grads(model)
        off()
        assert len(g_plain) == len(g_ckpt)
        for a, b in zip(g_plain, g_ckpt):
            torch.testing.assert_close(b, a, **tol(torch.float32))

    # save -> load into a fresh copy of the base: same outputs
    gsops.save_adapter(model, tmp_path / "ad")
    fresh = copy.deepcopy(pristine)
    gsops.load_adapter(fresh, tmp_path / "ad")
    fresh.eval()
    torch.testing.assert_close(logits_of(run(fresh)), y_trained, rtol=0, atol=0)

    # merge_ keeps the outputs (merged weights are rounded once to the base dtype)
    gsops.merge_(model)
    torch.testing.assert_close(logits_of(run(model)), y_trained, **t)

    # revert_ restores the original outputs and weights: after a merge (unmerged first) up to the
    # rounding of the merge round trip; without one, bit for bit (orthogonal methods) or up to one
    # rounding of the float64-rebuilt weight (low-rank methods)
    ref = dict(pristine.named_parameters())
    w_tol = tol(next(pristine.parameters()).dtype)
    for m, exact in ((model, False), (fresh, method not in ("sorsa", "loldu"))):
        gsops.revert_(m)
        assert not gsops.adapters.adapter_layers(m)
        torch.testing.assert_close(logits_of(run(m)), y0, **t)
        for n, p in m.named_parameters():
            torch.testing.assert_close(p, ref[n], **(dict(rtol=0, atol=0) if exact else w_tol))
            assert p.requires_grad == ref[n].requires_grad
