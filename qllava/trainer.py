"""The SFTTrainer qllava trains with: packed rows of similar length per micro-batch, token counts taken from the
batches it trains on, and checkpoints that hold what a resumed run needs and nothing more.

A checkpoint (RUN/stageN/checkpoints/checkpoint-STEP) holds the trainable weights only (LoRA adapter and
projector; never the frozen 4-bit base, which is gigabytes), the optimizer, the scheduler, the RNG states
and the trainer state (step, epoch: with the seeded row sampler, the data position). A marker file written
after everything else makes it complete: a crash while writing leaves an unmarked folder that resume
skips, so the previous checkpoint stays the one used.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import SFTTrainer

from . import model as modeling
from .packing import REAL_TOKENS, Rows, SimilarLengthSampler, TokenCounts

COMPLETE = "qllava_complete.json"


class TokenCounter(TrainerCallback):
    """Counts the tokens of every batch trained on (the trainer hands it each batch) and adds the rates to the logs
    that the callbacks after it receive: tokens_per_s, label_tokens_per_s, pad_fraction."""

    def __init__(self):
        self.counts = TokenCounts()
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            elapsed = time.perf_counter() - self.started
            logs.update(tokens_per_s=self.counts.tokens / elapsed, label_tokens_per_s=self.counts.label_tokens / elapsed,
                        pad_fraction=self.counts.pad_fraction)


class QllavaTrainer(SFTTrainer):
    """Trains on `rows` (a packing.Rows): its DataLoader draws rows of samples and the collator, a pure function of
    them, builds the batches, in worker processes when dataloader_num_workers > 0. TRL's constructor insists on a
    datasets.Dataset: it gets the rows' numbers and lengths, which have the same size."""

    def __init__(self, *args, rows: Rows, **kwargs):
        super().__init__(*args, train_dataset=rows.as_dataset(), **kwargs)
        self.rows = rows
        self.token_counter = TokenCounter()
        self.callback_handler.callbacks.insert(0, self.token_counter)  # first: the others see its rates

    def get_train_dataloader(self):
        return self._get_dataloader(dataset=self.rows, description="Training", batch_size=self._train_batch_size,
                                    sampler_fn=self._get_train_sampler, is_training=True)

    def _get_train_sampler(self, train_dataset=None):
        # Packed rows are not all full: drawing rows of similar length into a micro-batch keeps the padding
        # between them near zero. FlashAttention batches are one concatenated row: nothing to pad.
        if not self.rows.packing or self.data_collator.flatten:
            return super()._get_train_sampler(train_dataset)
        return SimilarLengthSampler(self.rows.row_lengths(), self.args.per_device_train_batch_size, self.args.seed)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.token_counter.counts.add(inputs)
        inputs = {k: v for k, v in inputs.items() if k != REAL_TOKENS}
        return super().training_step(model, inputs, num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """What Trainer saves as "the model" of a checkpoint: the adapter (with modules_to_save) and the projector."""
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config"):
            model.save_pretrained(output_dir)
        modeling.save_projector(model, Path(output_dir))

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            (folder / COMPLETE).write_text(json.dumps({"step": self.state.global_step}))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        folder = Path(resume_from_checkpoint)
        modeling.load_projector(model, folder / modeling.PROJECTOR_FILE)
        if hasattr(model, "peft_config"):
            from peft import set_peft_model_state_dict
            result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
            if result.unexpected_keys:
                raise ValueError(f"{folder}: adapter weights that this model has no place for: "
                                 f"{result.unexpected_keys[:3]}")


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint-STEP in a stage's checkpoints folder, or None."""
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / COMPLETE).exists()]
    return max(steps)[1] if steps else None
