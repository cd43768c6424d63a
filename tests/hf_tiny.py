"""Tiny Hugging Face models built from configs (no download) and state checks shared by the PEFT-workflow tests."""
import hashlib
import warnings

import pytest
import torch


def transformers_or_skip():
    try:
        import transformers
    except Exception as e:  # pragma: no cover
        pytest.skip(f"transformers cannot be imported: {e}")
    return transformers


def peft_or_skip():
    try:
        import peft
    except Exception as e:  # pragma: no cover
        pytest.skip(f"peft cannot be imported: {e}")
    return peft


def tiny_bert(num_labels=3, seed=0):
    tr = transformers_or_skip()
    cfg = tr.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=num_labels)
    torch.manual_seed(seed)
    return tr.BertForSequenceClassification(cfg).eval()


def tiny_llama(seed=0):
    tr = transformers_or_skip()
    cfg = tr.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return tr.LlamaForCausalLM(cfg).eval()


def ids(batch=2, seq=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (batch, seq), generator=g)


def logits(model, x):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=x).logits


def perturb_(params, std=0.2, seed=1):
    """Random non-zero values added to ``params`` (an adapter starts at the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def state_hash(model):
    """State, module types and requires_grad flags: equal hashes mean an unchanged model."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for n, m in model.named_modules():
        h.update(f"{n}:{type(m).__name__}".encode())
    for p in model.parameters():
        h.update(str(p.requires_grad).encode())
    return h.hexdigest()


def assert_refused_unchanged(model, call, match, exc=ValueError):
    """``call()`` raises ``exc`` matching ``match`` and leaves ``model`` (state, module types, flags) unchanged."""
    before = state_hash(model)
    with pytest.raises(exc, match=match):
        call()
    assert state_hash(model) == before


def outputs(model, x):
    """Logits and the last hidden state, flattened: a wrong adapter shows in the hidden state even where the
    (small, untrained) head hides it."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(input_ids=x, output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])
