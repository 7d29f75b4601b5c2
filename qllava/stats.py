"""`qllava data stats`: what a stage's data look like at the recipe's settings, before any training.

Samples, a length histogram, image tokens per image, images used upright by their EXIF orientation, what was
dropped and why, the share of padding a padded trainer would process against qllava's packed rows, and what
preparing the data cost (time, memory). Reads only tokenizer and config files, no model weights. With
check_images, every image the samples use is decoded as training will decode it, so a file cut short (which its
header does not show) is found before training, not after hours of it.
"""

from __future__ import annotations

import multiprocessing
import time

import pyarrow.compute as pc

from . import model as modeling
from .data import LARGE, ORIENTED, ImageStore, default_num_proc, stage_dataset
from .errors import DataError
from .packing import Rows, SimilarLengthSampler, pad_fraction, padded_batches
from .preflight import check_inputs
from .recipe import Recipe
from .vision import VisionError

CHECK_CHUNK = 64
"""Images per piece of --check-images work: small enough for a steady progress bar, large enough to be cheap to
hand to a process."""


def stage_data(recipe: Recipe, name: str) -> tuple:
    """(samples, image store, report) of a stage, prepared as training prepares them (and cached for it)."""
    check_inputs(recipe, (name,), weights=False)
    processor, geometry = modeling.processor_and_geometry(recipe.model)
    return stage_dataset(recipe, name, processor.tokenizer, geometry)


def stage_stats(recipe: Recipe, name: str, data: tuple | None = None, bins: int = 12) -> dict:
    """A stage's data figures (of `data`, its stage_data, when given)."""
    cfg = getattr(recipe, name)
    dataset, _, report = data or stage_data(recipe, name)
    lengths = list(dataset["length"])
    rows = Rows(dataset, cfg.max_seq_len, packing=True, seed=cfg.seed)
    batch = cfg.per_device_train_batch_size
    return {
        "stage": name,
        "samples": report.used,
        "skipped": dict(report.skipped),
        "examples": report.examples,
        "left_out": dict(report.left_out),
        "tokens": report.tokens,
        "label_tokens": report.label_tokens,
        "image_tokens": image_token_range(dataset),
        "oriented_images": report.oriented_images,
        "oriented_images_examples": report.examples.get(ORIENTED, []),
        "large_images": report.large_images,
        "large_images_examples": report.examples.get(LARGE, []),
        "with_image": report.with_image,
        "max_seq_len": cfg.max_seq_len,
        "length_min": min(lengths),
        "length_mean": sum(lengths) / len(lengths),
        "length_max": max(lengths),
        "histogram": histogram(lengths, cfg.max_seq_len, bins),
        "padded_pad_fraction": pad_fraction(padded_batches(lengths, batch, cfg.seed)),
        "packed_rows": len(rows),
        "samples_per_row": len(lengths) / len(rows),
        "packed_pad_fraction": pad_fraction(packed_batches(rows.row_lengths(), batch, cfg.seed)),
        "per_device_train_batch_size": batch,
        "preparation": report.preparation,
        "cached": report.cached,
    }


def image_token_range(dataset) -> dict | None:
    """{"min", "mean", "max"} image tokens over the images of the samples (LLaVA-NeXT: they depend on each image's
    size), None without images."""
    tokens = pc.list_flatten(dataset.data.column("image_tokens"))
    if len(tokens) == 0:
        return None
    low_high = pc.min_max(tokens).as_py()
    return {"min": low_high["min"], "mean": pc.mean(tokens).as_py(), "max": low_high["max"]}


def check_images(recipe: Recipe, data: tuple, progress=None) -> dict:
    """Every image a stage's samples use (`data`: its stage_data), decoded once as training decodes it
    (ImageStore.checked_image: upright, its token count against its sample's), in [data] num_proc processes;
    `progress(done, total)` as it goes. {"images", "seconds", "problems"}, each problem naming the file and the
    sample."""
    dataset, images, _ = data
    num_proc = recipe.data.num_proc or default_num_proc()
    started = time.perf_counter()
    firsts = first_sample_per_image(dataset)
    chunks = [firsts[at : at + CHECK_CHUNK] for at in range(0, len(firsts), CHECK_CHUNK)]
    problems, done = [], 0
    for found, n in _checked_chunks(chunks, images, num_proc):
        problems += found
        done += n
        if progress:
            progress(done, len(firsts))
    return {"images": len(firsts), "seconds": round(time.perf_counter() - started, 2), "problems": problems}


def first_sample_per_image(dataset) -> list[dict]:
    """The first sample of each distinct image ({"id", "source", "image", "image_tokens"}), in sample order."""
    columns = dataset.select_columns(["id", "source", "image", "image_tokens"]).with_format("arrow")[:]
    firsts = {}
    for sample in columns.filter(pc.not_equal(columns["image"], "")).to_pylist():
        firsts.setdefault((sample["source"], sample["image"]), sample)
    return list(firsts.values())


def image_problems(samples: list[dict], images: ImageStore) -> tuple[list[str], int]:
    """(what is wrong with the images of these samples, how many were checked)."""
    problems = []
    for sample in samples:
        try:
            images.checked_image(sample)
        except (VisionError, DataError) as e:
            problems.append(str(e))
    return problems, len(samples)


def _checked_chunks(chunks: list[list[dict]], images: ImageStore, num_proc: int):
    if num_proc <= 1 or len(chunks) < 2:
        yield from (image_problems(chunk, images) for chunk in chunks)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(min(num_proc, len(chunks)), initializer=_start_worker, initargs=(images,)) as pool:
        yield from pool.imap(_worker_chunk, chunks)


_WORKER_IMAGES: ImageStore | None = None


def _start_worker(images: ImageStore) -> None:
    global _WORKER_IMAGES
    _WORKER_IMAGES = images


def _worker_chunk(samples: list[dict]) -> tuple[list[str], int]:
    return image_problems(samples, _WORKER_IMAGES)


def packed_batches(row_lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Row lengths in the micro-batches training draws (rows of similar length together)."""
    order = list(SimilarLengthSampler(row_lengths, batch_size, seed))
    return [[row_lengths[i] for i in order[at : at + batch_size]] for at in range(0, len(order), batch_size)]


def histogram(lengths: list[int], top: int, bins: int) -> list[tuple[int, int, int]]:
    """(low, high, count) over [0, top] in equal-width bins."""
    width = max(1, -(-top // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(n // width, bins - 1)] += 1
    return [(i * width, min((i + 1) * width, top), c) for i, c in enumerate(counts)]
