"""Everything qllava prints with rich: training progress, summary tables.

The CLI's edge; nothing imports it but cli.py."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

LINE_SECONDS = 10.0
"""Progress written as plain lines (a log, a notebook): one line at most this often."""

console = Console(highlight=False)
if not console.is_terminal:  # logs and notebooks: wide enough for the summary tables, no live bar
    console.width = max(console.width, 140)


@contextmanager
def tables_to_stderr(wanted: bool = True):
    """Within it (when `wanted`), everything printed goes to stderr: a command's --json leaves stdout to its one
    JSON object."""
    global console
    kept = console
    if wanted:
        console = Console(highlight=False, stderr=True, width=None if kept.is_terminal else kept.width)
    try:
        yield
    finally:
        console = kept


def say(message: str) -> None:
    console.print(message, soft_wrap=True, markup=False)  # messages quote sample ids and "[INST]"-like text


class TrainingProgress:
    """A progress bar per stage: step, loss, lr, tokens/s (all and trained), pad fraction, memory, ETA."""

    def __init__(self, stage: str):
        self.stage = stage
        self.progress = None
        self.task = None
        self.first_step = 0
        """The step training began at: 0, or a resumed checkpoint's (the steps before it took no time now)."""

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "begin":
            self.first_step = event["step"]
        if kind == "begin" and console.is_terminal:
            self.progress = Progress(
                TextColumn(f"[bold]{self.stage}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.stage, total=event["max_steps"], completed=event["step"], stats="")
            _LIVE.append(self)
        elif kind == "log":
            stats = (
                f"loss {event['loss']:.4f}  lr {event['lr']:.2e}  {event['tokens_per_s']:,.0f} tok/s "
                f"({event['label_tokens_per_s']:,.0f} trained)  pad {event['pad_fraction']:.1%}  "
                f"mem {event['memory_gib']:.1f} GiB"
            )
            done_now = max(1, event["step"] - self.first_step)
            eta = event["elapsed_s"] / done_now * (event["max_steps"] - event["step"])
            console.print(f"{self.stage} step {event['step']}/{event['max_steps']}  {stats}  ETA {eta:.0f}s")
            if self.progress:
                self.progress.update(self.task, completed=event["step"], stats=stats)
        elif kind == "end" and self.progress:
            self.progress.update(self.task, completed=event["step"])
            self.stop()

    def stop(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None
        if self in _LIVE:
            _LIVE.remove(self)


_LIVE: list[TrainingProgress] = []
"""Progress bars on screen, stopped by stop_progress when a run is interrupted."""


def stop_progress() -> None:
    """Take any live progress bar off the screen, so the next line starts clean (Ctrl-C)."""
    for bar in list(_LIVE):
        bar.stop()


def stage_table(metrics: dict) -> Table:
    table = Table(title="training summary")
    for column in (
        "stage",
        "steps",
        "loss first -> last",
        "time",
        "tokens/s",
        "trained tok/s",
        "pad",
        "samples",
        "skipped",
        "attention",
        "peak mem",
    ):
        table.add_column(column, justify="right" if column not in ("stage", "attention") else "left")
    for name in ("stage1", "stage2"):
        m = metrics.get(name)
        if not m:
            continue
        data = m["data"]
        loss = f"{m['first_loss']:.3f} -> {m['final_loss']:.3f}" if m["first_loss"] is not None else "-"
        table.add_row(
            name,
            str(m["steps"]),
            loss,
            f"{m['train_seconds']:.0f}s",
            f"{m['tokens_per_s']:,.0f}",
            f"{m['label_tokens_per_s']:,.0f}",
            f"{m['pad_fraction']:.1%}",
            f"{data['used']:,}",
            f"{sum(data['skipped'].values()):,}",
            m["attn_implementation"],
            f"{m['peak_memory_gib']:.2f} GiB",
        )
    return table


def accuracy_table(metrics: dict) -> Table | None:
    points = [p for p in ("before", "stage1", "stage2", "blank_images") if f"accuracy_{p}" in metrics]
    if not points:
        return None
    categories = sorted({c for p in points for c in metrics.get(f"by_category_{p}", {})})
    table = Table(title="held-out accuracy")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    for c in categories:
        table.add_column(c, justify="right")
    labels = {
        "before": "before training",
        "stage1": "after stage 1",
        "stage2": "after stage 2",
        "blank_images": "after stage 2, blank images",
    }
    for p in points:
        by = metrics.get(f"by_category_{p}", {})
        table.add_row(labels[p], f"{metrics[f'accuracy_{p}']:.3f}", *(f"{by.get(c, 0):.3f}" for c in categories))
    if "chance" in metrics:
        table.add_row("chance", f"{metrics['chance']:.3f}", *("" for _ in categories))
    return table


def print_stats(stats: dict) -> None:
    """`qllava data stats` for one stage: summary, skip reasons, a length histogram, padded vs packed padding."""
    table = Table(title=f"{stats['stage']}: data at max_seq_len {stats['max_seq_len']}", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    skipped = sum(stats["skipped"].values())
    for label, value in (
        ("samples used", f"{stats['samples']:,} ({stats['with_image']:,} with an image)"),
        ("samples skipped", f"{skipped:,}"),
        ("tokens (trained)", f"{stats['tokens']:,} ({stats['label_tokens']:,})"),
        ("image tokens per image, min / mean / max", image_token_range(stats["image_tokens"])),
        ("images turned upright by their EXIF orientation", f"{stats['oriented_images']:,}"),
        ("length min / mean / max", f"{stats['length_min']} / {stats['length_mean']:.0f} / {stats['length_max']}"),
        (
            f"padding, padded batches of {stats['per_device_train_batch_size']} samples",
            f"{stats['padded_pad_fraction']:.1%}",
        ),
        (
            f"padding, packed batches of {stats['per_device_train_batch_size']} rows",
            f"{stats['packed_pad_fraction']:.1%} ({stats['packed_rows']:,} rows, "
            f"{stats['samples_per_row']:.1f} samples per row)",
        ),
    ):
        table.add_row(label, value)
    console.print(table)
    for reason, n in sorted(stats["skipped"].items(), key=lambda kv: -kv[1]):
        console.print(
            f"  skipped {n:,}: {reason} (e.g. {', '.join(stats['examples'][reason])})", soft_wrap=True, markup=False
        )
    for reason, n in sorted(stats["left_out"].items(), key=lambda kv: -kv[1]):
        console.print(
            f"  used {n:,} with a {reason} (e.g. {', '.join(stats['examples'][reason])})", soft_wrap=True, markup=False
        )
    for key, what in (
        ("oriented_images", "with an EXIF orientation, used upright as a viewer shows them"),
        (
            "large_images",
            "over PIL.Image.MAX_IMAGE_PIXELS (89 megapixels), used: each takes seconds and "
            "hundreds of MB to decode in every batch that holds it; shrink them",
        ),
    ):
        if stats[key]:
            console.print(
                f"  {stats[key]:,} images {what} (e.g. {', '.join(stats[key + '_examples'])})",
                soft_wrap=True,
                markup=False,
            )
    peak = max(c for _, _, c in stats["histogram"]) or 1
    histogram = Table(title="sample lengths (tokens, image tokens included)")
    histogram.add_column("tokens", justify="right")
    histogram.add_column("samples", justify="right")
    histogram.add_column("")
    for low, high, count in stats["histogram"]:
        histogram.add_row(f"{low}-{high}", f"{count:,}", "█" * round(40 * count / peak))
    console.print(histogram)
    console.print(preparation_line(stats["preparation"], stats["cached"]), markup=False)


def image_token_range(tokens: dict | None) -> str:
    if tokens is None:
        return "no images"
    return f"{tokens['min']:,} / {tokens['mean']:,.1f} / {tokens['max']:,}"


def print_image_check(stage: str, check: dict) -> None:
    """`data stats --check-images`: how many images were decoded, and each one that training could not use."""
    console.print(
        f"{stage}: {check['images']:,} images decoded in {check['seconds']:.1f} s, "
        f"{len(check['problems']):,} cannot be used",
        soft_wrap=True,
        markup=False,
    )
    for problem in check["problems"]:
        console.print(f"  {problem}", soft_wrap=True, markup=False)


def preparation_line(prep: dict, cached: bool) -> str:
    """What preparing a stage's data cost: time and peak memory of the preparing process and of its helpers."""
    helpers = (
        f" + {prep['processes']} tokenizing processes of at most {prep['peak_worker_rss_gb']:.2f} GB each"
        if prep["processes"] > 1
        else ""
    )
    line = (
        f"data prepared in {prep['seconds']:.1f} s; peak memory (RSS) {prep['peak_rss_gb']:.2f} GB in the "
        f"preparing process{helpers}"
    )
    return f"{line} (read from the cache now)" if cached else line


@contextmanager
def counting(label: str, unit: str = "questions"):
    """A progress bar fed with (done, total) calls; plain lines when not on a terminal, at most one every
    LINE_SECONDS (and the last), so a long job does not fill a log."""
    if not console.is_terminal:
        last = [float("-inf")]

        def line(done: int, total: int) -> None:
            if done == total or time.monotonic() - last[0] >= LINE_SECONDS:
                last[0] = time.monotonic()
                console.print(f"{label}: {done}/{total} {unit}", markup=False)

        yield line
        return
    with Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def print_eval(result: dict) -> None:
    """What was evaluated, on a line of its own (a table title would wrap at the narrow table's width, in the middle
    of a path), then the metrics."""
    model = result["model"]
    say(
        f"{result['benchmark']} on {result['data']}: {model.get('name')} ({model.get('backbone', '?')}, "
        f"{model.get('template', '?')})"
    )
    console.print(eval_table(result))


def eval_table(result: dict) -> Table:
    table = Table(title=result["benchmark"])
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("questions", str(result["questions"]))
    return table


def compare_table(report: dict) -> Table:
    from .compare import cell, metric_rows

    runs = report["runs"]
    table = Table(title="qllava compare")
    table.add_column("")
    for run in runs:
        table.add_column(run["label"], justify="right")
    for key in ("backbone", "template", "recipe", "data", "steps"):
        table.add_row(key, *(cell(r.get(key)) for r in runs))
    for name, cells in metric_rows(report):
        table.add_row(name, *cells)
    for column, (label, d) in enumerate(report["difference_vs_first"].items(), start=1):
        cells = [""] * len(runs)
        cells[column] = (
            f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] 95% CI, n={d['questions']}"
            if d["paired"]
            else f"not paired: {d['reason']}"
        )
        table.add_row(f"{label} - {runs[0]['label']}", *cells)
    return table


PLAN_PARTS = {
    "decoder_4bit": "decoder linears, NF4",
    "decoder_linear": "decoder linears",
    "frozen_base": "vision tower, embeddings, lm_head, norms",
    "trainable_weights_grads": "trainable weights + grads (fp32)",
    "optimizer_states": "optimizer states",
    "activations": "saved activations",
    "layer_recompute": "one layer's recompute",
    "logits": "LM head tile + hidden-state gradient",
    "vision_forward": "vision tower forward",
}


TRACE_PARTS = {
    "quantized_weights": "quantized weights (NF4 + statistics)",
    "frozen_weights": "other frozen weights",
    "trainable_weights": "trainable weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "batch": "the micro-batch",
    "saved_activations": "activations kept for backward",
    "transient_at_peak": "transient buffers at the peak",
}


def print_trace(traced: dict, gpu_memory_gib: float) -> None:
    """`qllava plan --trace`: per stage, the traced peak and what it holds, the allowances, the room left, FLOPs."""
    table = Table(title=f"traced training step (two optimizer steps on fake tensors) on a {gpu_memory_gib:g} GiB card")
    table.add_column("")
    for name, t in traced.items():
        table.add_column(f"{name} ({t['tokens_per_micro_batch']:,} tokens/micro-batch)", justify="right")
    for key, label in TRACE_PARTS.items():
        table.add_row(label, *(f"{t['breakdown'][key] / 2**30:.2f} GiB" for t in traced.values()))
    table.add_row("[bold]traced peak", *(f"[bold]{t['traced_peak_bytes'] / 2**30:.2f} GiB" for t in traced.values()))
    table.add_row(
        "operator at the peak", *(f"{t['op_at_peak']['op']} ({t['op_at_peak']['phase']})" for t in traced.values())
    )
    keys = sorted({k for t in traced.values() for k in t["allowances_bytes"]})
    for key in keys:
        table.add_row(
            f"+ {key.replace('_', ' ')}",
            *(f"{t['allowances_bytes'].get(key, 0) / 2**30:.2f} GiB" for t in traced.values()),
        )
    table.add_row(
        "[bold]with allowances", *(f"[bold]{t['peak_with_allowances_bytes'] / 2**30:.2f} GiB" for t in traced.values())
    )
    table.add_row(
        "free on the card",
        *(
            (("[green]" if t["free_bytes"] >= 2 * 2**30 else "[red]") + f"{t['free_bytes'] / 2**30:+.2f} GiB")
            for t in traced.values()
        ),
    )
    table.add_row(
        "GFLOP per token: forward / backward / recompute",
        *(
            " / ".join(f"{t['flops_per_token'][k] / 1e9:.1f}" for k in ("forward", "backward", "recompute"))
            for t in traced.values()
        ),
    )
    table.add_row("tokens per optimizer step", *(f"{t['tokens_per_step']:,}" for t in traced.values()))
    table.add_row("trace time", *(f"{t['trace_seconds']:.0f} s" for t in traced.values()))
    console.print(table)
    for name, t in traced.items():
        epoch = t["epoch"]
        say(
            f"{name}, one epoch ({epoch['tokens']:,} tokens: {epoch['tokens_source']}), {epoch['label']}: "
            + ", ".join(f"{card} {_duration(h)}" for card, h in epoch["hours"].items())
        )
    sources = {k: v for t in traced.values() for k, v in t["allowance_sources"].items()}
    for key in keys:
        say(f"{key.replace('_', ' ')}: {sources[key]}")


def _duration(hours: float) -> str:
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def print_plan(result: dict) -> None:
    counts = result["counts"]
    table = Table(title=f"parameters of {result['recipe']}")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    for label, key in (
        ("vision tower", "vision_tower"),
        ("projector", "projector"),
        ("decoder linears (quantized)", "decoder_linear"),
        ("embeddings + lm_head", "embeddings"),
        ("decoder norms", "decoder_other"),
        ("LoRA (stage 2)", "lora"),
        ("modules_to_save (stage 2)", "modules_to_save"),
    ):
        table.add_row(label, f"{counts[key]:,}")
    console.print(table)
    stages = result["stages"]
    table = Table(title=f"peak memory per training step on a {result['gpu_memory_gib']:g} GiB card")
    table.add_column("")
    for name, est in stages.items():
        table.add_column(f"{name} ({est['tokens_per_micro_batch']:,} tokens/micro-batch)", justify="right")
    for key, label in PLAN_PARTS.items():
        if any(key in est["parts"] for est in stages.values()):
            table.add_row(label, *(f"{est['parts'].get(key, 0) / 2**30:.2f} GiB" for est in stages.values()))
    table.add_row("[bold]peak allocated", *(f"[bold]{est['peak_gib']:.2f} GiB" for est in stages.values()))
    table.add_row(
        "+ CUDA context, cuBLAS, fragmentation",
        *(f"{est['with_allowances_gib']:.2f} GiB" for est in stages.values()),
    )
    table.add_row(
        "verdict",
        *(
            ("[green]fits" if est["fits"] else "[red]does not fit") + f" ({est['headroom_gib']:+.1f} GiB)"
            for est in stages.values()
        ),
    )
    table.add_row(
        "largest micro-batch that fits", *(f"{est['max_tokens_per_micro_batch']:,} tokens" for est in stages.values())
    )
    table.add_row(
        "largest image",
        *(
            f"{est['largest_image_tokens']:,} tokens" + ("" if est["largest_image_fits"] else " [red](> max_seq_len)")
            for est in stages.values()
        ),
    )
    console.print(table)
    for name, est in stages.items():
        if not est["largest_image_fits"]:
            say(
                f"{name}.max_seq_len cannot hold the largest image ({est['largest_image_tokens']:,} tokens): raise "
                "it, or samples with such images are skipped"
            )
