"""`qllava finetune`: LLaVA's two stages, each = build model + data + TRL SFTTrainer, train, save.

Stage 1 (alignment) trains only the projector; stage 2 (visual instruction tuning) trains LoRA adapters on
the decoder's linear layers and the projector, at its own learning rate. qllava owns tokenization, label
masking, packing and the collator and hands TRL a pre-tokenized dataset of rows (TRL refuses packing for
vision data and its VLM collator trains on image tokens). Outputs: RUN/stage1 (projector, recipe, metrics),
RUN/stage2 (adapter, projector, processor, recipe, metrics, loss plot), RUN/metrics.json (held-out scores).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import PrinterCallback, TrainerCallback, set_seed
from trl import SFTConfig

from . import model as modeling
from . import synthetic
from .card import stage_card
from .data import available_cores, stage_dataset
from .evaluate import HeldOut
from .packing import Collator, Rows, TokenCounts
from .preflight import check_inputs
from .recipe import Recipe, check_report_to
from .resume import check_recipe, resume_points, store_recipe
from .run import RunFolder
from .trainer import QllavaTrainer

# The held-out points each stage's model is scored at ("before": the first stage's starting model).
POINTS = {"stage1": ("stage1",), "stage2": ("stage2", "blank_images")}


@dataclass
class StageResult:
    name: str
    out_dir: Path
    metrics: dict
    model: object


def finetune(
    recipe: Recipe, stages=None, overwrite: bool = False, resume: bool = False, progress=None, say=print
) -> dict:
    """Run the stages the recipe describes; return the run's metrics (also written to RUN/metrics.json).

    `progress(stage_name)` returns a function that receives progress events (dicts) during training.
    With `resume`, finished stages are kept and an unfinished one continues from its latest complete
    checkpoint, with the recipe it started with. Under torchrun / accelerate launch, every process trains and only
    the main one writes and prints.
    """
    stages = stages or recipe.stages()
    check_report_to(recipe, stages)
    # On CPU, as the trainer runs (use_cpu): without cpu=True, accelerate sees no process group under torchrun before
    # the trainer sets one up, and every process took itself for the main one (each claimed the run folder).
    state = PartialState(cpu=not torch.cuda.is_available())
    say = say if state.is_main_process else _silent
    run = RunFolder(recipe.run_dir)
    run.check_claim(stages, overwrite, resume)
    to_run = [name for name in stages if not (resume and run.complete(name))]
    # Before anything is written: the checkpoints a resume continues from, and that the recipe is the one the stages
    # continued or built on were trained with.
    points = resume_points(recipe, run, to_run, say) if resume else {}
    check_recipe(recipe, run, to_run, points, say)
    with state.main_process_first():
        if state.is_main_process and recipe.synthetic:
            synthetic.prepare(
                recipe.synthetic, recipe.model.vision_tower, recipe.model.decoder, say=say, llava=recipe.model.llava
            )
    # Before any model is loaded: every input named, then the data of every stage about to run (a typo or a wrong
    # image folder in stage 2 stops the run now, not after stage 1 has trained; the prepared data are cached).
    check_inputs(recipe, to_run)
    _check_projector_source(recipe, to_run)
    metrics = _read_json(run.metrics_file)
    if not resume:  # what the stages about to run will measure again must not survive from an older run
        redone = [ending for name in stages for ending in _redone(recipe, name)]
        metrics = {k: v for k, v in metrics.items() if not k.endswith(tuple(redone))}
    heldout = HeldOut(recipe, say, done=metrics) if recipe.eval.at else None
    if heldout:
        _say_unscorable(heldout, run, to_run, say)
    prepare_data(recipe, to_run)
    with state.main_process_first():
        if state.is_main_process:
            run.claim(stages, overwrite, resume)
    for name in stages:
        if name in to_run:
            if name in points:
                say(f"{name}: resuming from {points[name]}")
            metrics[name] = run_stage(recipe, name, progress, say, heldout, points.get(name)).metrics
        else:
            say(f"{name}: already complete in {run.stage(name)}, kept")
            metrics[name] = _read_json(run.stage(name) / "metrics.json")
        if heldout:
            metrics.update(heldout.scores)
        if state.is_main_process:
            _write_json(run.metrics_file, metrics)
    if heldout and state.is_main_process and any(heldout.unscored(p) for p in recipe.eval.at):
        score_saved_stages(recipe, heldout)
        metrics.update(heldout.scores)
        _write_json(run.metrics_file, metrics)
    return metrics


def first_stage(recipe: Recipe) -> str:
    """The stage a run starts with, whose starting model is the "before" point."""
    return "stage1" if recipe.stage1.enabled else "stage2"


def prepare_data(recipe: Recipe, names) -> None:
    """The data of the stages `names` prepared (or found in the cache) and checked, from the tokenizer and the
    configs alone: their skips and errors come before any model is loaded."""
    if not names:
        return
    processor, geometry = modeling.processor_and_geometry(recipe.model)
    for name in names:
        with PartialState().main_process_first():
            stage_dataset(recipe, name, processor.tokenizer, geometry)


def score_saved_stages(recipe: Recipe, heldout: HeldOut) -> None:
    """Held-out points the stages trained now did not score, scored on the stages as saved: a kept stage (a run
    that failed while scoring, then resumed), a stage trained by an earlier command (`--stage 2` after
    `--stage 1`), and "before" on the first stage's starting model, rebuilt from its seed."""
    run = RunFolder(recipe.run_dir)
    if heldout.unscored("before"):
        build_stage_model(recipe, first_stage(recipe), heldout)
    for name, points in POINTS.items():
        missing = [point for point in points if heldout.unscored(point)]
        if missing and run.complete(name):
            model, processor, _ = modeling.load_stage(run.stage(name))
            for point in missing:
                heldout.score(point, model, processor, blank_images=point == "blank_images")


def _say_unscorable(heldout: HeldOut, run: RunFolder, to_run, say) -> None:
    """Name the held-out points the recipe asks for that this command cannot score: their stage is neither trained
    now nor complete in the run folder."""
    for name, points in POINTS.items():
        missing = [point for point in points if heldout.unscored(point)]
        if missing and name not in to_run and not run.complete(name):
            say(
                f"eval.at: {', '.join(missing)} not scored: {run.stage(name)} is not complete and {name} is not among "
                "the stages run now"
            )


def _redone(recipe: Recipe, name: str) -> tuple[str, ...]:
    """Endings of the run-level metrics a stage measures again: its summary and the held-out points of its model
    (and "before" for the first stage)."""
    return (name, *(f"_{point}" for point in POINTS[name])) + (("_before",) if name == first_stage(recipe) else ())


def run_stage(
    recipe: Recipe, name: str, progress=None, say=print, heldout: HeldOut | None = None, resume_from: Path | None = None
) -> StageResult:
    """One stage: store its recipe (unless it continues from a checkpoint: the recipe it started with stays), build
    its model, build its data, train, save; held-out points scored around it."""
    state = PartialState()
    if state.is_main_process and resume_from is None:
        store_recipe(recipe, RunFolder(recipe.run_dir).stage(name))
    model, processor = build_stage_model(recipe, name, heldout)
    rows, collator, report = build_stage_data(recipe, name, model, processor, say)
    trainer, seconds = train_stage(recipe, name, model, processor, rows, collator, progress, resume_from)
    metrics = _stage_metrics(trainer, report, trainer.token_counter.counts, seconds, name, model)
    metrics["steps_per_rank"] = gather_object([trainer.state.global_step])
    out_dir = RunFolder(recipe.run_dir).stage(name)
    if state.is_main_process:
        _save_stage(model, processor, recipe, out_dir, metrics, trainer.state.log_history, name)
    if heldout:
        for point in POINTS[name]:
            heldout.score(point, model, processor, blank_images=point == "blank_images")
    state.wait_for_everyone()
    return StageResult(name, out_dir, metrics, model)


def build_stage_model(recipe: Recipe, name: str, heldout: HeldOut | None = None):
    """(model, processor) of a stage, ready to train: the frozen base, its projector where the stage starts from
    (trainable), and for stage 2 the LoRA adapter. The "before" point is scored on the first stage's untrained
    model (before the adapter, which starts as the identity)."""
    set_seed(getattr(recipe, name).seed)  # the fresh projector and LoRA weights are drawn from it: a rerun is identical
    processor = modeling.build_processor(recipe.model)
    model = modeling.load_base_model(recipe, processor)
    _start_projector(model, recipe, name)
    if name == first_stage(recipe) and heldout:
        heldout.score("before", model, processor)
    if name == "stage2":
        model = modeling.attach_lora(model, recipe.lora)
    for parameter in modeling.projector_parameters(model).values():
        parameter.requires_grad_(True)
    _trainable_to_float32(model)
    return model, processor


def build_stage_data(recipe: Recipe, name: str, model, processor, say=print) -> tuple[Rows, Collator, object]:
    """(rows, collator, data report) of a stage: its data prepared (or read from the cache) and counted."""
    cfg = getattr(recipe, name)
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids(modeling.IMAGE_TOKEN)
    geometry = modeling.image_geometry(model.config, processor.image_processor)
    with PartialState().main_process_first():  # the main process tokenizes and caches; the others read the cache
        dataset, images, report = stage_dataset(recipe, name, tokenizer, geometry)
    say(
        f"{name}: {report.used} samples, {report.tokens:,} tokens ({report.label_tokens:,} trained)"
        + "".join(
            f"; skipped {n}: {reason} (e.g. {', '.join(report.examples[reason])})"
            for reason, n in report.skipped.most_common()
        )
        + "".join(
            f"; used {n} with a {reason} (e.g. {', '.join(report.examples[reason])})"
            for reason, n in report.left_out.most_common()
        )
    )
    rows = Rows(dataset, cfg.max_seq_len, cfg.packing, cfg.seed)
    collator = Collator(
        images,
        processor.image_processor,
        cfg.image_aspect_ratio,
        tokenizer.pad_token_id,
        image_token_id,
        packing=cfg.packing,
        flatten=model.config._attn_implementation == "flash_attention_2",
    )
    return rows, collator, report


def train_stage(
    recipe: Recipe,
    name: str,
    model,
    processor,
    rows: Rows,
    collator: Collator,
    progress=None,
    resume_from: Path | None = None,
) -> tuple[QllavaTrainer, float]:
    """(trainer, seconds) after training a stage's model on its rows (from a checkpoint when given)."""
    callbacks = [ProgressCallback(progress(name))] if progress else []
    trainer = _build_trainer(
        model,
        processor,
        rows,
        collator,
        getattr(recipe, name),
        RunFolder(recipe.run_dir).checkpoints(name),
        callbacks,
        dataloader_num_workers(recipe.data.dataloader_num_workers),
    )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer, time.perf_counter() - started


class LogAsRecipeSays(TrainerCallback):
    """The first and the last step are always logged (SFTConfig's logging_first_step logs the first): with fewer
    steps than logging_steps (a short try) the trainer would log one loss or none, and the summary would read
    "5.851 -> 5.851". A stage continued from a checkpoint logs and saves at the recipe's logging_steps and
    save_steps: transformers would keep those of the checkpoint's trainer state."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.logging_steps, state.save_steps = args.logging_steps, args.save_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


class ProgressCallback(TrainerCallback):
    """Hands the CLI's progress display what it shows: step, loss, lr, tokens/s, pad fraction, ETA (the token
    rates come in the logs, from the trainer's TokenCounter)."""

    def __init__(self, show):
        self.show = show
        self.started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        if state.is_world_process_zero:  # a resumed run begins at its checkpoint's step: the ETA counts from there
            self.show({"event": "begin", "step": state.global_step, "max_steps": state.max_steps})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.is_world_process_zero:
            elapsed = time.perf_counter() - self.started
            self.show(
                {
                    "event": "log",
                    "step": state.global_step,
                    "max_steps": state.max_steps,
                    "loss": logs["loss"],
                    "lr": logs.get("learning_rate", 0.0),
                    "elapsed_s": elapsed,
                    "tokens_per_s": logs["tokens_per_s"],
                    "label_tokens_per_s": logs["label_tokens_per_s"],
                    "pad_fraction": logs["pad_fraction"],
                    "memory_gib": peak_memory_gib(),
                }
            )

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.show({"event": "end", "step": state.global_step})


def peak_memory_gib() -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _build_trainer(
    model, processor, rows: Rows, collator: Collator, cfg, checkpoints: Path, callbacks, num_workers: int = 0
):
    """The trainer of a stage. With num_workers > 0, DataLoader worker processes build the batches (images decoded
    and preprocessed there). They are started anew each epoch (not persistent): each starts from the rows that
    _EpochRows has just drawn for its epoch."""
    cuda = torch.cuda.is_available()
    dtype = model.get_input_embeddings().weight.dtype
    args = SFTConfig(
        output_dir=str(checkpoints),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        use_cpu=not cuda,
        disable_tqdm=True,
        report_to=cfg.report_to or "none",
        remove_unused_columns=False,
        dataloader_num_workers=num_workers,
        dataloader_pin_memory=cuda,
        dataloader_persistent_workers=False,
        max_length=None,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        save_only_model=False,
    )
    optimizer = build_optimizer(model, cfg)
    trainer = QllavaTrainer(
        model=model,
        args=args,
        rows=rows,
        data_collator=collator,
        processing_class=processor,
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )
    _trainable_to_float32(model)  # TRL casts trainable weights of a 4-bit model to bf16; keep float32 masters
    trainer.add_callback(_EpochRows(rows))
    trainer.add_callback(LogAsRecipeSays())
    trainer.remove_callback(PrinterCallback)  # progress is the caller's (the CLI's rich display)
    return trainer


def dataloader_num_workers(setting: int | None) -> int:
    """[data] dataloader_num_workers, or its default: on CUDA up to 4 workers per training process (keeping a core
    for the process itself), on CPU none (workers would take cores from the training computation)."""
    if setting is not None:
        return setting
    if not torch.cuda.is_available():
        return 0
    per_process = available_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(4, per_process - 1))


def build_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW with the projector in its own parameter group (LLaVA's mm_projector_lr); biases without decay."""
    proj = {id(p) for p in modeling.projector_parameters(model).values()}
    groups = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        is_proj = id(p) in proj
        lr = (cfg.projector_lr or cfg.learning_rate) if is_proj else cfg.learning_rate
        decay = 0.0 if p.ndim < 2 else cfg.weight_decay
        groups.setdefault(
            (is_proj, decay),
            {
                "params": [],
                "lr": lr,
                "weight_decay": decay,
                "name": ("projector" if is_proj else "adapter") + ("" if decay else "_no_decay"),
            },
        )
        groups[(is_proj, decay)]["params"].append(p)
    if cfg.optim == "adamw_torch":
        return torch.optim.AdamW(list(groups.values()), lr=cfg.learning_rate, fused=torch.cuda.is_available())
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if cfg.optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(list(groups.values()), lr=cfg.learning_rate)


class _EpochRows(TrainerCallback):
    """Re-draws packed rows at every epoch start (equal-length samples swap rows; row count stays fixed)."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.rows.set_epoch(int(state.epoch or 0))


def _start_projector(model, recipe: Recipe, name: str) -> None:
    """Stage 1 starts from a fresh projector; stage 2 from where its recipe says (stage 1's by default)."""
    path = _projector_source(recipe) if name == "stage2" else None
    if path is not None:
        _check_projector_source(recipe, ("stage2",))
        modeling.load_projector(model, path)


def _projector_source(recipe: Recipe) -> Path | None:
    """The projector file stage 2 starts from; None for a fresh one or the llava checkpoint's."""
    source = recipe.stage2.projector
    if source in ("fresh", "model"):
        return None
    return RunFolder(recipe.run_dir).stage("stage1") / modeling.PROJECTOR_FILE if source == "stage1" else Path(source)


def _check_projector_source(recipe: Recipe, names) -> None:
    """Stage 2 about to run without the projector it starts from (unless stage 1, about to run too, writes it)."""
    path = _projector_source(recipe)
    written_first = recipe.stage2.projector == "stage1" and "stage1" in names
    if "stage2" not in names or path is None or path.exists() or written_first:
        return
    raise FileNotFoundError(
        f"stage 2 starts from the stage-1 projector {path}, which does not exist: run stage 1 first "
        f'(qllava finetune RECIPE --stage 1), or set stage2.projector = "fresh" or a projector file'
    )


def _trainable_to_float32(model) -> None:
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _stage_metrics(trainer, report, counts: TokenCounts, seconds: float, name: str, model) -> dict:
    """A stage's figures. `seconds` and `counts` are those of the last training segment (the token rates are its);
    a resumed stage's time adds the segments before it (up to the checkpoint it continued from)."""
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "stage": name,
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_seconds": round(trainer.earlier.seconds + seconds, 2),
        "resumed_at": trainer.earlier.resumed_at,
        "tokens_per_s": counts.tokens / seconds,
        "label_tokens_per_s": counts.label_tokens / seconds,
        "pad_fraction": counts.pad_fraction,
        "trainable_params": trainable,
        "attn_implementation": model.config._attn_implementation,
        "peak_memory_gib": peak_memory_gib(),
        "data": report.to_dict(),
    }


def _save_stage(model, processor, recipe: Recipe, out_dir: Path, metrics: dict, log_history: list, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / modeling.BASE_FILE).write_text(json.dumps(modeling.base_fingerprint(recipe.model), indent=1))
    modeling.save_projector(model, out_dir)
    if name == "stage2":
        model.save_pretrained(out_dir)  # the PEFT adapter (and modules_to_save) only
    processor.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(stage_card(recipe, name, metrics))  # over PEFT's blank template
    store_recipe(recipe, out_dir)  # equal, in every value that changes what it learns, to the one it started with
    _write_json(out_dir / "log_history.json", log_history)
    _plot_loss(log_history, out_dir / "loss.png", name)
    _write_json(out_dir / "metrics.json", metrics)  # last: its presence means the stage is complete


def _plot_loss(log_history: list, path: Path, title: str) -> None:
    figure = loss_figure(log_history, title)
    if figure is not None:
        figure.savefig(path, dpi=100)


def loss_figure(log_history: list, title: str):
    """The logged training loss against the step, or None when none was logged. The y-axis starts at 0 and shows
    plain values: autoscaled, a loss flat to the third decimal filled the whole height (with an offset label) and
    looked steep."""
    # A bare Figure, not pyplot: no global backend switch in the caller's process (notebooks keep theirs).
    from matplotlib.figure import Figure

    points = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    if not points:
        return None
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(*zip(*points), marker="o" if len(points) < 20 else None)
    ax.set_ylim(0, max(loss for _, loss in points) * 1.05 or 1)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set(xlabel="optimizer step", ylabel="training loss", title=f"{title} loss")
    fig.tight_layout()
    return fig


def _silent(*_args, **_kwargs) -> None:
    pass


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
