"""Preparing a stage's data at scale, once: the data files read as streams (a JSON list sample by sample, a Hugging
Face dataset batch by batch), tokenized in `num_proc` processes and written batch by batch into one Arrow file,
which training then memory-maps; memory stays bounded whatever the size of the data. The result is cached under a
key of everything it depends on, and checked against the images it relied on every time it is read (freshness);
what preparing cost is recorded in the stage's DataReport.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import resource
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError
from ..tokenizer import IMAGE_TOKEN
from ..vision import AnyresGeometry, ImageGeometry, image_header
from .formats import DataReport, ImageStore, _DataFile, _ImageFiles, _mtime_ns, image_source, image_stamp, is_llava_json
from .samples import FEATURES, Tokenization, _sample_columns

CACHE_VERSION = 6  # 6: images upright by their EXIF orientation (anyres counts of the upright size); image stamps
SAMPLES_FILE = "samples.arrow"
IMAGES_FILE = "images.json"
SAVED_DATASET_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")


def stage_dataset(
    recipe, name: str, tokenizer, geometry: ImageGeometry | AnyresGeometry
) -> tuple[datasets.Dataset, ImageStore, DataReport]:
    """Stage `name`'s samples at the recipe's settings (build_stage_dataset)."""
    aspect_ratio = getattr(recipe, name).image_aspect_ratio
    if geometry.varies != (aspect_ratio == "anyres"):
        raise DataError(
            f"{name}.image_aspect_ratio: {aspect_ratio!r} with a "
            f"{'LLaVA-NeXT' if geometry.varies else 'LLaVA-1.5'} model: set "
            f"{'anyres (it tiles each image by its size)' if geometry.varies else 'pad or crop'}"
        )
    return build_stage_dataset(
        getattr(recipe, name),
        tokenizer,
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        geometry,
        recipe.data.cache_dir,
        name,
        recipe.data.num_proc,
        recipe.data.max_missing_image_fraction,
    )


def build_stage_dataset(
    stage,
    tokenizer,
    image_token_id: int,
    geometry: ImageGeometry | AnyresGeometry,
    cache_dir: str,
    stage_name: str,
    num_proc: int | None = None,
    max_missing_image_fraction: float = 1.0,
) -> tuple[datasets.Dataset, ImageStore, DataReport]:
    """A stage's samples, prepared with its template (once: cached), filtered and counted, memory-mapped. More
    missing or unreadable images than `max_missing_image_fraction` of the samples that name one is an error: a
    wrong image folder must not become a silently tiny run."""
    if stage.max_seq_len < geometry.tokens_of() + 2:
        raise DataError(
            f"{stage_name}.max_seq_len: {stage.max_seq_len} is shorter than one image's "
            f"{geometry.tokens_of()} tokens plus text; raise it (LLaVA-1.5 uses 2048)"
        )
    sources = [image_source(path, stage.image_folder) for path in stage.data]
    key = _cache_key(stage, sources, tokenizer, image_token_id, geometry)
    folder = Path(cache_dir or Path.home() / ".cache" / "qllava") / "tokenized" / key
    how = Tokenization(tokenizer, stage.template, image_token_id, geometry, stage.max_seq_len)
    cached = _cache_still_true(folder, sources)
    if not cached:
        files = [
            _DataFile(path, i, stage.image_folder if is_llava_json(path) else "", image_stamps=geometry.varies)
            for i, path in enumerate(stage.data)
        ]
        _prepare(folder, files, sources, how, num_proc or default_num_proc())
    report = DataReport.from_dict(json.loads((folder / "report.json").read_text()))
    report.cached = cached
    if report.unusable_images > max_missing_image_fraction * report.named_images:
        raise DataError(_missing_images_message(report, stage_name, max_missing_image_fraction))
    if report.used == 0:
        reasons = "; ".join(f"{n} {r}" for r, n in report.skipped.most_common()) or "the files hold no samples"
        raise DataError(f"{stage_name}: no trainable samples left in {', '.join(stage.data)} ({reasons})")
    return datasets.Dataset.from_file(str(folder / SAMPLES_FILE)), ImageStore(sources, geometry, stage.data), report


def _missing_images_message(report: DataReport, stage_name: str, limit: float) -> str:
    reasons = "; ".join(
        f"{n:,} {reason} (e.g. {', '.join(report.examples[reason])})"
        for reason, n in report.skipped.most_common()
        if reason.startswith("image ")
    )
    return (
        f"{stage_name}: the images of {report.unusable_images:,} of the {report.named_images:,} samples that name "
        f"one are missing or unreadable ({report.unusable_images / report.named_images:.1%}, more than "
        f"data.max_missing_image_fraction = {limit:g}): {reasons}. Check {stage_name}.image_folder and the "
        "images, or raise data.max_missing_image_fraction to train without them"
    )


def default_num_proc() -> int:
    """Tokenizing processes when [data] num_proc is unset: one per core, at most 8."""
    return min(8, available_cores())


def available_cores() -> int:
    """CPU cores this process may run on (a container's or taskset's share, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _prepare(folder: Path, files: list[_DataFile], sources: list, how: Tokenization, num_proc: int) -> None:
    """Tokenize every data file into folder/samples.arrow, batch by batch, then write the report; the folder
    appears whole or not at all (a crash leaves only a .partial folder, which the next run replaces)."""
    started = time.perf_counter()
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    report, images = DataReport(), _ImageFiles()
    jobs = ((file, records) for file, where in zip(files, sources) for records in file.records(where))
    writer = datasets.arrow_writer.ArrowWriter(features=FEATURES, path=str(partial / SAMPLES_FILE))
    processes = 1
    # processes outlives the loop: the report records how many worker processes ran
    for batch, part, part_images, processes in _tokenized_jobs(jobs, how, num_proc):  # noqa: B007
        if batch.num_rows:
            writer.write_table(pa.Table.from_batches([batch]))
        report.add(part)
        images.add(part_images)
    writer.finalize()
    report.preparation = {
        "seconds": round(time.perf_counter() - started, 2),
        "processes": processes,
        "peak_rss_gb": _peak_rss_gb(resource.RUSAGE_SELF),
        "peak_worker_rss_gb": _peak_rss_gb(resource.RUSAGE_CHILDREN) if processes > 1 else 0.0,
    }
    (partial / IMAGES_FILE).write_text(json.dumps(images.record()))
    (partial / "report.json").write_text(json.dumps(report.to_dict()))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def _tokenized_jobs(jobs: Iterator, how: Tokenization, num_proc: int) -> Iterator[tuple]:
    """(record batch, report, image files looked at, processes) per job, in the order of the jobs. One job is
    tokenized here; more go to a pool of num_proc processes, at most two jobs per process in flight, so memory
    holds a few jobs, never the data."""
    first_two = list(itertools.islice(jobs, 2))
    jobs = itertools.chain(first_two, jobs)
    if len(first_two) < 2 or num_proc <= 1:
        for job in jobs:
            yield *_tokenize_job(job, how), 1
        return
    # Forked processes inherit the tokenizer; a Rust tokenizer that used threads before a fork warns and
    # disables them, so say up front that it should not use them (one process per core does the work).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # Forked processes share this process's memory until they write to it, and the garbage collector's visits
    # write to every object it tracks: frozen, the inherited objects stay shared (no copy per process).
    gc.freeze()
    try:
        with context.Pool(num_proc, initializer=_start_worker, initargs=(how,)) as pool:
            pending = deque()
            for job in jobs:
                pending.append(pool.apply_async(_worker_job, (job,)))
                if len(pending) >= 2 * num_proc:
                    yield *pending.popleft().get(), num_proc
            while pending:
                yield *pending.popleft().get(), num_proc
    finally:
        gc.unfreeze()


_WORKER_TOKENIZATION: Tokenization | None = None


def _start_worker(how: Tokenization) -> None:
    global _WORKER_TOKENIZATION
    _WORKER_TOKENIZATION = how


def _worker_job(job) -> tuple:
    return _tokenize_job(job, _WORKER_TOKENIZATION)


def _tokenize_job(job, how: Tokenization) -> tuple[pa.RecordBatch, DataReport, _ImageFiles]:
    file, records = job
    report, images = DataReport(), _ImageFiles()
    conversations = [conv for record in records if (conv := file.conversation(record, report, images))]
    columns = _sample_columns(conversations, how, report)
    return pa.RecordBatch.from_pydict(columns, schema=FEATURES.arrow_schema), report, images


def _peak_rss_gb(who: int) -> float:
    return round(resource.getrusage(who).ru_maxrss * 1024 / 1e9, 3)  # ru_maxrss is in KiB on Linux


def _cache_key(stage, sources: list, tokenizer, image_token_id: int, geometry: ImageGeometry | AnyresGeometry) -> str:
    """What the prepared samples depend on: each data file's identity, the template, the tokenizer and the image
    geometry. Which images exist is checked apart (_cache_still_true): it changes without any file changing."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    key = {
        "version": CACHE_VERSION,
        "files": [_file_identity(path, where) for path, where in zip(stage.data, sources)],
        "image_folder": str(Path(stage.image_folder).resolve()),
        "template": stage.template,
        "max_seq_len": stage.max_seq_len,
        "image_token_id": image_token_id,
        "geometry": asdict(geometry),
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _file_identity(path: str, where) -> list:
    """A LLaVA JSON file: path, size and modification time. A Hugging Face dataset: its fingerprint, and for a
    saved one the size and modification time of every file of its folder (a dataset saved again in place)."""
    p = Path(path)
    if isinstance(where, str):
        stat = p.stat() if p.exists() else None
        return [str(p.resolve()), stat.st_size if stat else None, stat.st_mtime_ns if stat else None]
    saved = (
        [f for f in p.rglob("*") if f.name in SAVED_DATASET_FILES or re.fullmatch(r"data-.*\.arrow", f.name)]
        if p.is_dir()
        else []
    )  # what save_to_disk writes; not cache files that transforms may add beside them
    files = sorted((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in saved)
    return [str(p.resolve()) if p.exists() else path, where._fingerprint, files]


def _cache_still_true(folder: Path, sources: list) -> bool:
    """A prepared folder exists and the image files it relied on are as they were: no image it skipped as missing or
    unreadable has become usable (an image added after a skip is picked up), and where files were added to or
    removed from an image folder (its modification time changed), every image of a prepared sample is still there
    (one removed since is counted as missing, not a crash in training); and every image whose token count depends on
    its size is the very file it was counted from (_stamps_still_true)."""
    if not (folder / "report.json").exists():
        return False
    recorded = json.loads((folder / IMAGES_FILE).read_text())
    if any(image_header(path).problem is None for path in recorded["unusable"]):
        return False
    if not _stamps_still_true(folder):
        return False
    changed = {d for d, mtime in recorded["folders"].items() if _mtime_ns(d) != mtime}
    if not changed:
        return True
    samples = datasets.Dataset.from_file(str(folder / SAMPLES_FILE)).select_columns(["source", "image"])
    for start in range(0, len(samples), 100_000):
        batch = samples[start : start + 100_000]
        for source, image in zip(batch["source"], batch["image"]):
            if image and isinstance(sources[source], str):
                path = os.path.abspath(os.path.join(sources[source], image))
                if os.path.dirname(path) in changed and not os.path.isfile(path):
                    return False
    recorded["folders"] = {d: _mtime_ns(d) for d in recorded["folders"]}  # checked: the next run need not again
    (folder / IMAGES_FILE).write_text(json.dumps(recorded))
    return True


def _stamps_still_true(folder: Path) -> bool:
    """Every stamped image file (LLaVA-NeXT: its token count depends on its size) has its stamp still: none written,
    replaced, or touched back to its old modification time since the data were prepared."""
    table = datasets.Dataset.from_file(str(folder / SAMPLES_FILE)).select_columns(["image_file", "image_stamp"])
    table = table.with_format("arrow")[:]
    stamped = table.filter(pc.not_equal(table["image_stamp"], 0))
    return all(
        image_stamp(file) == stamp
        for file, stamp in zip(stamped["image_file"].to_pylist(), stamped["image_stamp"].to_pylist())
    )
