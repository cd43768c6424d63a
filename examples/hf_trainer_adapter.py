"""Fine-tune a small BERT classifier with a gsops adapter under the Hugging Face ``Trainer``.

The model is built from a config (no download) and the data are random token
ids with a learnable rule (label = first token mod 3), so the example runs
anywhere in seconds. It shows the PEFT-style workflow on gsops:

1. ``gsops.apply_`` with ``modules_to_save=["classifier"]`` (the new head is trained in full);
2. ``gsops.print_trainable_parameters``;
3. ``Trainer`` with ``gsops.training.AdapterCheckpointCallback``: every
   ``checkpoint-<step>`` holds only the adapter and the head (kilobytes, not the model);
4. an interrupted run resumed from a checkpoint ends exactly where the uninterrupted run ends;
5. ``gsops.disable_adapters`` for the base model's outputs, ``gsops.save_adapter`` and
   ``gsops.merge_and_unload`` + ``save_pretrained`` for a plain model.

    .venv/bin/python examples/hf_trainer_adapter.py --out /tmp/gsops_trainer
"""
from __future__ import annotations

import argparse
import os

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import gsops


class RuleData(torch.utils.data.Dataset):
    def __init__(self, n=96, seq=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 120, (n, seq), generator=g)
        self.y = self.x[:, 0] % 3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def build():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32, num_labels=3)
    base = BertForSequenceClassification(cfg)
    config = gsops.AdapterConfig(method="gsoft", block_size=16, target_modules=["query", "value"],
                                 modules_to_save=["classifier"])
    return gsops.apply_(base, config, verbose=False)


def train(out, steps, resume=None):
    model = build()
    args = TrainingArguments(out, max_steps=steps, save_steps=steps // 2, per_device_train_batch_size=8,
                             learning_rate=5e-3, seed=0, report_to=[], logging_steps=steps, use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=RuleData(),
                      callbacks=[gsops.training.AdapterCheckpointCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/gsops_trainer")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    gsops.print_trainable_parameters(build())
    full = train(os.path.join(a.out, "full"), a.steps)
    ckpt = os.path.join(a.out, "full", f"checkpoint-{a.steps // 2}")
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if "safetensors" in f)
    print(f"{ckpt}: {sorted(os.listdir(ckpt))}, weight files {size / 1024:.1f} KiB")
    resumed = train(os.path.join(a.out, "resumed"), a.steps, resume=ckpt)
    diff = max((p - q).abs().max().item() for p, q in zip(gsops.trainable_parameters(full),
                                                          gsops.trainable_parameters(resumed)))
    print(f"resumed run vs uninterrupted run: max |difference| of the trained parameters = {diff:.3g}")
    data = RuleData(n=48, seed=1)
    full.eval()
    with torch.no_grad():
        acc = (full(input_ids=data.x).logits.argmax(-1) == data.y).float().mean().item()
        with gsops.disable_adapters(full):
            base_acc = (full(input_ids=data.x).logits.argmax(-1) == data.y).float().mean().item()
    print(f"held-out accuracy: adapted {acc:.3f}, base model (adapters disabled) {base_acc:.3f}")
    gsops.save_adapter(full, os.path.join(a.out, "adapter"))
    gsops.merge_and_unload(full).save_pretrained(os.path.join(a.out, "merged"))
    print(f"adapter in {a.out}/adapter, plain merged model in {a.out}/merged")


if __name__ == "__main__":
    main()
