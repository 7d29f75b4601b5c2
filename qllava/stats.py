"""`qllava data stats`: what a stage's data look like at the recipe's settings, before any training.

Samples, a length histogram, what was dropped and why, the share of padding a padded trainer would process
against qllava's packed rows, and what preparing the data cost (time, memory). Reads only tokenizer and config
files, no model weights.
"""

from __future__ import annotations

from . import model as modeling
from .data import stage_dataset
from .preflight import check_inputs
from .packing import Rows, SimilarLengthSampler, pad_fraction, padded_batches
from .recipe import Recipe


def stage_stats(recipe: Recipe, name: str, bins: int = 12) -> dict:
    cfg = getattr(recipe, name)
    check_inputs(recipe, (name,), weights=False)
    processor, geometry = modeling.processor_and_geometry(recipe.model)
    dataset, _, report = stage_dataset(recipe, name, processor.tokenizer, geometry)
    lengths = list(dataset["length"])
    rows = Rows(dataset, cfg.max_seq_len, packing=True, seed=cfg.seed)
    batch = cfg.per_device_train_batch_size
    return {
        "stage": name, "samples": report.used, "skipped": dict(report.skipped), "examples": report.examples,
        "left_out": dict(report.left_out), "tokens": report.tokens, "label_tokens": report.label_tokens, "image_tokens_per_image": geometry.tokens_of(),
        "with_image": report.with_image, "max_seq_len": cfg.max_seq_len,
        "length_min": min(lengths), "length_mean": sum(lengths) / len(lengths), "length_max": max(lengths),
        "histogram": histogram(lengths, cfg.max_seq_len, bins),
        "padded_pad_fraction": pad_fraction(padded_batches(lengths, batch, cfg.seed)),
        "packed_rows": len(rows), "samples_per_row": len(lengths) / len(rows),
        "packed_pad_fraction": pad_fraction(packed_batches(rows.row_lengths(), batch, cfg.seed)),
        "per_device_train_batch_size": batch, "preparation": report.preparation, "cached": report.cached,
    }


def packed_batches(row_lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Row lengths in the micro-batches training draws (rows of similar length together)."""
    order = list(SimilarLengthSampler(row_lengths, batch_size, seed))
    return [[row_lengths[i] for i in order[at:at + batch_size]] for at in range(0, len(order), batch_size)]


def histogram(lengths: list[int], top: int, bins: int) -> list[tuple[int, int, int]]:
    """(low, high, count) over [0, top] in equal-width bins."""
    width = max(1, -(-top // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(n // width, bins - 1)] += 1
    return [(i * width, min((i + 1) * width, top), c) for i, c in enumerate(counts)]
