"""The SFTTrainer qllava trains with: packed rows of similar length per micro-batch, token counts taken from the
batches it trains on, and checkpoints that hold what a resumed run needs and nothing more.

A checkpoint (RUN/stageN/checkpoints/checkpoint-STEP) holds the trainable weights only (LoRA adapter and
projector; never the frozen 4-bit base, which is gigabytes), the optimizer, the scheduler, the RNG states
and the trainer state (step, epoch: with the seeded row sampler, the data position). A marker file written
after everything else lists every file with its size, and the training time so far. A checkpoint is complete
only with its marker and every file a resume reads, at the size written: transformers would resume from one
without optimizer.pt or scheduler.pt with a fresh optimizer and a restarted warmup, and say nothing.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import SFTTrainer

from . import model as modeling
from .packing import REAL_TOKENS, Rows, SimilarLengthSampler, TokenCounts

COMPLETE = "qllava_complete.json"
# What a resume reads from a checkpoint, besides the adapter (stage 2), the RNG state of each process (rng_state.pth,
# or rng_state_N.pth under several processes) and fp16's gradient scaler (scaler.pt) where one was written.
RESUME_READS = ("trainer_state.json", "optimizer.pt", "scheduler.pt", modeling.PROJECTOR_FILE)
ADAPTER_FILE = "adapter_model.safetensors"


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
            logs.update(
                tokens_per_s=self.counts.tokens / elapsed,
                label_tokens_per_s=self.counts.label_tokens / elapsed,
                pad_fraction=self.counts.pad_fraction,
            )


class QllavaTrainer(SFTTrainer):
    """Trains on `rows` (a packing.Rows): its DataLoader draws rows of samples and the collator, a pure function of
    them, builds the batches, in worker processes when dataloader_num_workers > 0. TRL's constructor insists on a
    datasets.Dataset: it gets the rows' numbers and lengths, which have the same size."""

    def __init__(self, *args, rows: Rows, **kwargs):
        super().__init__(*args, train_dataset=rows.as_dataset(), **kwargs)
        self.rows = rows
        self.token_counter = TokenCounter()
        self.callback_handler.callbacks.insert(0, self.token_counter)  # first: the others see its rates
        self.earlier = Segments()
        self.segment_started = time.perf_counter()

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        """Train, from a checkpoint when given: the segments trained before it (time, resume steps) carry on."""
        self.earlier = Segments.of(Path(resume_from_checkpoint)) if resume_from_checkpoint else Segments()
        self.segment_started = time.perf_counter()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def train_seconds(self) -> float:
        """Training time of the stage so far, over every segment that led to this one."""
        return self.earlier.seconds + time.perf_counter() - self.segment_started

    def get_train_dataloader(self):
        return self._get_dataloader(
            dataset=self.rows,
            description="Training",
            batch_size=self._train_batch_size,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

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
        self.accelerator.wait_for_everyone()  # every process's RNG file is written before the marker lists them
        if self.args.should_save:
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
            marker = {
                "step": self.state.global_step,
                "files": files,
                "processes": self.args.world_size,
                "train_seconds": round(self.train_seconds(), 2),
                "resumed_at": self.earlier.resumed_at,
            }
            partial = folder / f"{COMPLETE}.partial"
            partial.write_text(json.dumps(marker))
            partial.replace(folder / COMPLETE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        folder = Path(resume_from_checkpoint)
        modeling.load_projector(model, folder / modeling.PROJECTOR_FILE)
        if hasattr(model, "peft_config"):
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_FILE)))
            if result.unexpected_keys:
                raise ValueError(
                    f"{folder}: adapter weights that this model has no place for: {result.unexpected_keys[:3]}"
                )


@dataclass(frozen=True)
class Segments:
    """What the training segments before a resume leave to the stage's record: their training time (up to the
    checkpoint; steps trained after it were lost and are trained again) and the steps it was resumed at."""

    seconds: float = 0.0
    resumed_at: list = field(default_factory=list)

    @classmethod
    def of(cls, checkpoint: Path) -> Segments:
        """The segments that led to a checkpoint, as the segment resuming from it will record them."""
        marker = json.loads((checkpoint / COMPLETE).read_text())
        return cls(marker.get("train_seconds", 0.0), marker.get("resumed_at", []) + [marker["step"]])


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint-STEP folders of a stage's checkpoints folder, newest first."""
    if not folder.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return [p for _, p in sorted(steps, reverse=True)]


def checkpoint_problem(checkpoint: Path, lora: bool) -> str | None:
    """What keeps a checkpoint from being resumed from (a file it lacks, or one cut short), or None when it holds
    every file a resume reads, as written. `lora`: the stage trains an adapter, which the checkpoint must hold
    (a marker written by an older qllava lists no files)."""
    marker_file = checkpoint / COMPLETE
    if not marker_file.exists():
        return f"it has no {COMPLETE} (writing it was cut short)"
    try:
        marker = json.loads(marker_file.read_text())
    except ValueError:
        return f"its {COMPLETE} is not valid JSON"
    written = marker.get("files", {})
    processes = marker.get("processes", 1)
    rng = ["rng_state.pth"] if processes == 1 else [f"rng_state_{i}.pth" for i in range(processes)]
    scaler = ["scaler.pt"] if "scaler.pt" in written else []  # fp16 training's gradient scaler
    for name in [*RESUME_READS, *([ADAPTER_FILE] if lora else []), *rng, *scaler]:
        if not (checkpoint / name).is_file():
            return f"it lacks {name}"
        if name in written and (checkpoint / name).stat().st_size != written[name]:
            return f"its {name} is {(checkpoint / name).stat().st_size:,} bytes, {written[name]:,} when written"
    return None


def latest_checkpoint(folder: Path, lora: bool) -> Path | None:
    """The newest complete checkpoint-STEP in a stage's checkpoints folder, or None."""
    return next((p for p in checkpoints(folder) if checkpoint_problem(p, lora) is None), None)
