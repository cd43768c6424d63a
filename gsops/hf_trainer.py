"""``AdapterCheckpointCallback``: Hugging Face ``Trainer`` checkpoints that hold only the adapter.

``Trainer`` writes the whole model into every ``checkpoint-<step>`` folder.
With this callback, once a checkpoint is written (``on_save``, on the main
process), the folder's full-model weight files (``model.safetensors``, its
shards and index, ``pytorch_model.bin``) and ``config.json`` are replaced by

* ``model.safetensors`` holding only the adapter parameters and the
  ``modules_to_save`` state, under the model's own ``state_dict`` keys: what
  ``Trainer.train(resume_from_checkpoint=...)`` reads back (it loads the file
  with ``strict=False`` and logs the frozen base weights as missing keys, which
  is expected: they come from the base model);
* the gsops adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
  :func:`gsops.save_adapter`), so ``gsops.load_adapter(base_model, checkpoint)``
  works on a checkpoint too.

``config.json`` is removed so that ``from_pretrained(checkpoint)`` fails loudly
instead of building a model whose base weights are random. The optimizer,
scheduler, RNG and trainer state files are Trainer's own and untouched, so a
resumed run continues exactly (same data order, same dropout, same steps).

To resume: build the base model, :func:`gsops.apply_` the same config, create
the ``Trainer`` with the same arguments and this callback, and call
``trainer.train(resume_from_checkpoint=...)``.
"""
from __future__ import annotations

import os

from torch import nn
from transformers import TrainerCallback

from .adapters.io import _saved_tensors, save_adapter
from .adapters.model import adapter_layers

FULL_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json", "config.json")
WEIGHTS_FILE = "model.safetensors"


def _unwrap(model):
    """The model under DDP / DataParallel / torch.compile wrappers (their state_dict keys carry a prefix)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class AdapterCheckpointCallback(TrainerCallback):
    """Replace each Trainer checkpoint's full model by the adapter and ``modules_to_save`` (see module docstring)."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return control
        if model is None:
            raise ValueError("AdapterCheckpointCallback: Trainer passed no model to on_save")
        model = _unwrap(model)
        if not adapter_layers(model):
            raise ValueError("AdapterCheckpointCallback: the Trainer's model has no gsops adapters "
                             "(call gsops.apply_ before creating the Trainer)")
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"AdapterCheckpointCallback: Trainer's checkpoint {folder} does not exist")
        from safetensors.torch import save_file

        tensors = {k: t.detach().to("cpu").contiguous() for k, t in _saved_tensors(model).items()}
        for name in os.listdir(folder):
            if name in FULL_MODEL_FILES or (name.startswith("model-") and name.endswith(".safetensors")) or \
                    (name.startswith("pytorch_model-") and name.endswith(".bin")):
                os.remove(os.path.join(folder, name))
        tmp = os.path.join(folder, WEIGHTS_FILE + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(folder, WEIGHTS_FILE))
        save_adapter(model, folder)
        return control


__all__ = ["AdapterCheckpointCallback"]
