"""transformers Trainer callbacks for sspeft adapters (imported on first use of ``sspeft.KeepFP32Callback``, so the
torch-only library never imports transformers)."""

from __future__ import annotations

from transformers import TrainerCallback

from .model import restore_fp32


class KeepFP32Callback(TrainerCallback):
    """Restores the adapter coefficients to exact fp32 once the trainer is built (``on_init_end``), undoing the bf16
    cast TRL's SFTTrainer applies to trainable parameters of 4-bit models, before any optimizer state exists:

        SFTTrainer(model=..., peft_config=sspeft.peft_config(cfg), callbacks=[sspeft.KeepFP32Callback()])

    Pass it when building the trainer; added later, call ``sspeft.restore_fp32(trainer.model)`` instead. Under
    DeepSpeed the engine owns the parameters and nothing is changed."""

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            restore_fp32(model)
        return control
