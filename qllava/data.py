"""Reading LLaVA JSON and Hugging Face datasets, tokenizing conversations into input_ids + labels, images.

A sample becomes {"id", "input_ids", "labels", "length", "source", "image", "image_tokens"}. input_ids hold ONE
placeholder (the image token id) per image and image_tokens says, per image, how many tokens it becomes: the
collator expands each placeholder to that many image tokens. "length" counts tokens after that expansion (what
packing and max_seq_len measure); labels are -100 everywhere but the assistant text and its end token. Samples
that cannot be trained on are skipped and counted by reason (never silently: LLaVA's "tokenization mismatch
(ignored)" is the anti-example), and a file-level problem is an error naming the file.

A stage's data are prepared once and cached: the data files are read as streams (a JSON list sample by sample,
a Hugging Face dataset batch by batch), tokenized in `num_proc` processes and written batch by batch into one
Arrow file, which training then memory-maps. Memory stays bounded whatever the size of the data. Images are
only decoded when a batch is built (packing.py).
"""

from __future__ import annotations

import gc
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import resource
import shutil
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import datasets
import ijson
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from . import templates
from .errors import DataError
from .templates import IMAGE_TAG, TemplateError
from .tokenizer import IMAGE_TOKEN, ids_and_offsets
from .vision import NOT_FOUND, AnyresGeometry, ImageGeometry, ImageHeader, VisionError, image_header, open_image

CACHE_VERSION = 6  # 6: images upright by their EXIF orientation (anyres counts of the upright size); image stamps
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SAMPLES_FILE = "samples.arrow"
IMAGES_FILE = "images.json"
FEATURES = datasets.Features({
    "id": datasets.Value("string"), "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")), "length": datasets.Value("int32"),
    "source": datasets.Value("int32"), "image": datasets.Value("string"),
    "image_tokens": datasets.List(datasets.Value("int32")), "image_file": datasets.Value("string"),
    "image_stamp": datasets.Value("int64")})
SAVED_DATASET_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")
ORIENTED = "image with an EXIF orientation"
LARGE = "image over PIL.Image.MAX_IMAGE_PIXELS"
"""Keys of DataReport.examples for images that are used but worth naming."""
SEVERAL_IMAGES = "more than one image (one image per sample)"
"""Why a sample with several images is skipped, in both formats: LLaVA-1.5 trains on one image per sample."""
JOB_SAMPLES = 1000
"""Samples per tokenizing job: enough to make handing a job to a process cheap, few enough to bound memory."""


@dataclass
class Conversation:
    id: str
    turns: list[tuple[str, str]]
    image: str = ""
    """"" for text-only; a file path, or "row:N" for an image stored in a Hugging Face dataset."""
    source: int = 0
    """Index of the data file it came from (an ImageStore resolves images per file)."""
    image_header: ImageHeader | None = None
    """What the image's header says (upright size, EXIF orientation); None for text-only."""
    image_file: str = ""
    """The image's file, when its token count depends on its size (LLaVA-NeXT) and it is a file of its own: the
    prepared data are checked against it (image_stamp) every time they are read."""
    image_stamp: int = 0
    extra: dict = field(default_factory=dict)
    """Fields qllava does not interpret (category, options, ...), kept for evaluation."""
    system: str | None = None
    """The sample's own system message (Hugging Face datasets), which replaces the template's system prompt."""

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(width, height) of the image as the model gets it (upright), from its header."""
        return self.image_header.size if self.image_header else None


@dataclass
class DataReport:
    """What a stage's data turned into: samples used, skipped by reason (with example ids), tokens, and what
    preparing them cost."""

    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    tokens: int = 0
    label_tokens: int = 0
    with_image: int = 0
    left_out: Counter = field(default_factory=Counter)
    """Samples used without a part of them, by what was left out and why (a system message the template has no
    place for)."""
    named_images: int = 0
    """Samples that name an image file (LLaVA JSON), usable or not: what the share of missing images is of."""
    unusable_images: int = 0
    """Of those, samples skipped because their image file is missing or unreadable."""
    oriented_images: int = 0
    """Images of the samples used whose EXIF orientation turns (or mirrors) the stored pixels: used upright."""
    large_images: int = 0
    """Images of the samples used over PIL's decompression-bomb warning size (PIL.Image.MAX_IMAGE_PIXELS)."""
    preparation: dict = field(default_factory=dict)
    """seconds, processes, peak_rss_gb (the preparing process), peak_worker_rss_gb (its largest helper)."""
    cached: bool = False
    """Read from the cache (preparation then describes the run that wrote it)."""

    def skip(self, sample_id: str, reason: str) -> None:
        self.skipped[reason] += 1
        self._example(sample_id, reason)

    def leave_out(self, sample_id: str, reason: str) -> None:
        self.left_out[reason] += 1
        self._example(sample_id, reason)

    def count_image(self, sample_id: str, header: ImageHeader) -> None:
        """Count what is worth saying about the image of a sample used: turned upright, over PIL's warning size."""
        if header.orientation != 1:
            self.oriented_images += 1
            self._example(sample_id, ORIENTED)
        if header.large:
            self.large_images += 1
            self._example(sample_id, LARGE)

    def _example(self, sample_id: str, reason: str) -> None:
        kept = self.examples.setdefault(reason, [])
        if len(kept) < 3:
            kept.append(sample_id)

    def add(self, other: "DataReport") -> None:
        """Counts of a later part of the data (a tokenizing job) added to these; examples stay the first ones."""
        self.used += other.used
        self.tokens += other.tokens
        self.label_tokens += other.label_tokens
        self.with_image += other.with_image
        self.named_images += other.named_images
        self.unusable_images += other.unusable_images
        self.oriented_images += other.oriented_images
        self.large_images += other.large_images
        self.skipped.update(other.skipped)
        self.left_out.update(other.left_out)
        for reason, ids in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept += ids[:3 - len(kept)]

    def to_dict(self) -> dict:
        return {"used": self.used, "skipped": dict(self.skipped), "examples": self.examples,
                "tokens": self.tokens, "label_tokens": self.label_tokens, "with_image": self.with_image,
                "left_out": dict(self.left_out), "named_images": self.named_images,
                "unusable_images": self.unusable_images, "oriented_images": self.oriented_images,
                "large_images": self.large_images, "preparation": self.preparation, "cached": self.cached}

    @classmethod
    def from_dict(cls, d: dict) -> "DataReport":
        return cls(d["used"], Counter(d["skipped"]), d["examples"], d["tokens"], d["label_tokens"], d["with_image"],
                   Counter(d["left_out"]), d["named_images"], d["unusable_images"], d["oriented_images"],
                   d["large_images"], d["preparation"], d.get("cached", False))


class ImageStore:
    """Opens a sample's image: a file under its data file's image folder, or a row of a Hugging Face dataset, upright
    as every path of qllava opens images (vision.open_image). With the geometry the samples were prepared for, each
    image opened for a sample is checked against the token count stored with it."""

    def __init__(self, sources: list, geometry: ImageGeometry | AnyresGeometry | None = None, paths: list = ()):
        self.sources = sources  # per data file: an image folder (str) or a datasets.Dataset
        self.geometry = geometry
        self.paths = list(paths) or ["dataset"] * len(sources)  # the data files, to name a dataset's images
        # The datasets library would decode a dataset's images itself (and turn them by its own rules): the stored
        # bytes are read and opened here, like files.
        self.stored = [_stored_images(where) if not isinstance(where, str) else None for where in sources]

    def open(self, source: int, image: str) -> Image.Image:
        where = self.sources[source]
        if isinstance(where, str):
            return open_image(os.path.join(where, image))
        return open_image(_first_stored(self.stored[source][int(image[4:])]["images"][0]), self.name(source, image))

    def name(self, source: int, image: str) -> str:
        """The image as a user finds it: its file, or DATASET[row]."""
        where = self.sources[source]
        return os.path.join(where, image) if isinstance(where, str) else f"{self.paths[source]}[{image[4:]}]"

    def open_sample(self, sample: dict) -> Image.Image:
        """The image of a prepared sample, as training uses it (checked_image), or an error naming the file and saying
        what to do (`qllava data stats --check-images` finds every such file before training)."""
        try:
            return self.checked_image(sample)
        except ImageChanged as e:
            raise DataError(f"{e}: run the same command again with --resume: the data are prepared again from the "
                            "images as they are now") from None
        except VisionError as e:
            raise DataError(f"{e}: remove or fix the file, then run the same command with --resume (a sample whose "
                            "image is missing is skipped and counted)") from None

    def checked_image(self, sample: dict) -> Image.Image:
        """The image of a prepared sample, decoded; with the geometry the samples were prepared for, checked against
        the token count stored with the sample (ImageChanged: an image that changed after preparation would
        otherwise stop the model with a mismatch of image features and image tokens)."""
        try:
            image = self.open(sample["source"], sample["image"])
        except VisionError as e:
            raise VisionError(f"{e}, the image of sample {sample['id']}") from None
        if self.geometry is not None:
            tokens = self.geometry.tokens_of(image.size)
            if list(sample["image_tokens"]) != [tokens]:
                raise ImageChanged(
                    f"image {self.name(sample['source'], sample['image'])}: its {image.size[0]}x{image.size[1]} "
                    f"pixels (upright) make {tokens} image tokens, but sample {sample['id']} was prepared for "
                    f"{', '.join(map(str, sample['image_tokens']))}: the file changed after the data were prepared")
        return image


class ImageChanged(DataError):
    """A sample's image makes another number of tokens than the sample was prepared with."""


def image_source(path: str, image_folder: str):
    """Where a data file's images live: the image folder (LLaVA JSON) or the dataset itself (memory-mapped)."""
    return image_folder if is_llava_json(path) else _load_hf_dataset(path)


def read_conversations(path: str, where, source: int, report: DataReport, limit: int | None = None
                       ) -> list[Conversation]:
    """The usable conversations of one data file, all or the first `limit` (for small files: evaluation; merge
    checks); unusable samples are counted in `report`. Training reads through build_stage_dataset, which never
    holds them all."""
    file = _DataFile(path, source, where if isinstance(where, str) else "")
    out = []
    for records in file.records(where):
        out += [conv for record in records if (conv := file.conversation(record, report, _ImageFiles()))]
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def encode(rendered: templates.Rendered, tokenizer, image_token_id: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of a rendered conversation, tokenized the way LLaVA's tokenizer_image_token does.

    The text around each <image> is tokenized on its own (so the tokens next to an image are LLaVA's, e.g.
    "▁" + "<0x0A>" after it), only the first chunk keeps its BOS, and the tag becomes one placeholder
    (image_token_id, never a label) that expand_images later widens to the image's tokens.
    A token is a label when its characters overlap a trained span of the template.
    """
    ids, labels, offset = [], [], 0
    for i, chunk in enumerate(rendered.text.split(IMAGE_TAG)):
        if i > 0:
            ids.append(image_token_id)
            labels.append(-100)
            offset += len(IMAGE_TAG)
        chunk_ids, spans = ids_and_offsets(tokenizer, chunk)
        if i > 0 and chunk_ids and chunk_ids[0] == tokenizer.bos_token_id:
            chunk_ids, spans = chunk_ids[1:], spans[1:]
        for token, (start, end) in zip(chunk_ids, spans):
            ids.append(token)
            trained = end > start and any(start + offset < b and end + offset > a for a, b in rendered.trained)
            labels.append(token if trained else -100)
        offset += len(chunk)
    return ids, labels


def tokenize_conversation(turns: list[tuple[str, str]], template: str, tokenizer, image_token_id: int,
                          system: str | None = None) -> tuple[list[int], list[int]]:
    """input_ids (one placeholder per image) and labels of one conversation to train on, as official LLaVA's
    preprocessing makes them (TemplateError for one LLaVA would not train on: see templates.render). `system`
    replaces the template's system prompt."""
    rendered = templates.render(template, turns, tokenizer.bos_token or "", tokenizer.eos_token,
                                special_tokens=tuple(tokenizer.all_special_tokens), system=system)
    return encode(rendered, tokenizer, image_token_id)


def expand_images(ids, image_token_id: int, image_tokens: list[int], values=None):
    """`values` (the ids themselves by default, or labels aligned with them) as a tensor in which each image
    placeholder of `ids` is repeated as many times as its image has tokens (image_tokens, in order). The one
    place that widens placeholders, for training batches and generation prompts alike."""
    ids = torch.as_tensor(ids)
    values = ids if values is None else torch.as_tensor(values)
    if not image_tokens:
        return values
    repeats = torch.ones_like(ids)
    repeats[ids == image_token_id] = torch.tensor(image_tokens, dtype=repeats.dtype)
    return values.repeat_interleave(repeats)


def expand_sample(sample: dict, image_token_id: int):
    """A cached sample's input_ids and labels as tensors, every image placeholder widened to its image's tokens."""
    ids = torch.tensor(sample["input_ids"])
    placeholders = int((ids == image_token_id).sum())
    if placeholders != len(sample["image_tokens"]):
        raise DataError(f"sample {sample['id']}: {placeholders} image placeholders for {len(sample['image_tokens'])} "
                        "images (prepared with another tokenizer?): delete its folder in the tokenized-data cache")
    wide = expand_images(ids, image_token_id, sample["image_tokens"])
    if len(wide) != sample["length"]:
        raise DataError(f"sample {sample['id']}: {len(wide)} tokens once its images are widened, its length says "
                        f"{sample['length']}: delete its folder in the tokenized-data cache")
    return wide, expand_images(ids, image_token_id, sample["image_tokens"], values=sample["labels"])


@dataclass
class Tokenization:
    """What turns conversations into samples; handed to every tokenizing process."""

    tokenizer: object
    template: str
    image_token_id: int
    geometry: ImageGeometry | AnyresGeometry
    """How many tokens each image becomes: stored with each image (the collator widens by the stored count)."""
    max_seq_len: int


def tokenize_dataset(conversations: list[Conversation], template: str, tokenizer, image_token_id: int,
                     geometry: ImageGeometry | AnyresGeometry, max_seq_len: int, report: DataReport) -> datasets.Dataset:
    """Samples of a few conversations, in memory (evaluation, merge checks, tests)."""
    how = Tokenization(tokenizer, template, image_token_id, geometry, max_seq_len)
    return datasets.Dataset.from_dict(_sample_columns(conversations, how, report), features=FEATURES)


def _sample_columns(conversations: list[Conversation], how: Tokenization, report: DataReport) -> dict:
    columns = {name: [] for name in FEATURES}
    tokenizer = how.tokenizer
    has_system = bool(templates.template_spec(how.template).system)
    for conv in conversations:
        system = conv.system if has_system else None
        try:
            ids, labels = tokenize_conversation(conv.turns, how.template, tokenizer, how.image_token_id, system)
        except TemplateError as e:
            report.skip(conv.id, str(e))
            continue
        image_tokens = [how.geometry.tokens_of(conv.image_size) for _ in range(ids.count(how.image_token_id))]
        length = len(ids) - len(image_tokens) + sum(image_tokens)
        if length > how.max_seq_len:
            report.skip(conv.id, f"longer than max_seq_len ({how.max_seq_len} tokens, image tokens included)")
            continue
        n_labels = sum(label != -100 for label in labels)
        if n_labels == 0:
            report.skip(conv.id, "no token left to train on (empty assistant text)")
            continue
        if conv.system is not None and not has_system:
            report.leave_out(conv.id, f"system message left out: the {how.template} template has no system prompt")
        report.used += 1
        report.with_image += bool(image_tokens)
        report.tokens += length
        report.label_tokens += n_labels
        if conv.image_header:
            report.count_image(conv.id, conv.image_header)
        for key, value in (("id", conv.id), ("input_ids", ids), ("labels", labels), ("length", length),
                           ("source", conv.source), ("image", conv.image), ("image_tokens", image_tokens),
                           ("image_file", conv.image_file), ("image_stamp", conv.image_stamp)):
            columns[key].append(value)
    return columns


def stage_dataset(recipe, name: str, tokenizer, geometry: ImageGeometry | AnyresGeometry
                  ) -> tuple[datasets.Dataset, ImageStore, DataReport]:
    """Stage `name`'s samples at the recipe's settings (build_stage_dataset)."""
    aspect_ratio = getattr(recipe, name).image_aspect_ratio
    if geometry.varies != (aspect_ratio == "anyres"):
        raise DataError(f"{name}.image_aspect_ratio: {aspect_ratio!r} with a "
                        f"{'LLaVA-NeXT' if geometry.varies else 'LLaVA-1.5'} model: set "
                        f"{'anyres (it tiles each image by its size)' if geometry.varies else 'pad or crop'}")
    return build_stage_dataset(getattr(recipe, name), tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                               geometry, recipe.data.cache_dir, name, recipe.data.num_proc,
                               recipe.data.max_missing_image_fraction)


def build_stage_dataset(stage, tokenizer, image_token_id: int, geometry: ImageGeometry | AnyresGeometry,
                        cache_dir: str, stage_name: str, num_proc: int | None = None,
                        max_missing_image_fraction: float = 1.0) -> tuple[datasets.Dataset, ImageStore, DataReport]:
    """A stage's samples, prepared with its template (once: cached), filtered and counted, memory-mapped. More
    missing or unreadable images than `max_missing_image_fraction` of the samples that name one is an error: a
    wrong image folder must not become a silently tiny run."""
    if stage.max_seq_len < geometry.tokens_of() + 2:
        raise DataError(f"{stage_name}.max_seq_len: {stage.max_seq_len} is shorter than one image's "
                        f"{geometry.tokens_of()} tokens plus text; raise it (LLaVA-1.5 uses 2048)")
    sources = [image_source(path, stage.image_folder) for path in stage.data]
    key = _cache_key(stage, sources, tokenizer, image_token_id, geometry)
    folder = Path(cache_dir or Path.home() / ".cache" / "qllava") / "tokenized" / key
    how = Tokenization(tokenizer, stage.template, image_token_id, geometry, stage.max_seq_len)
    cached = _cache_still_true(folder, sources)
    if not cached:
        files = [_DataFile(path, i, stage.image_folder if is_llava_json(path) else "", image_stamps=geometry.varies)
                 for i, path in enumerate(stage.data)]
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
    reasons = "; ".join(f"{n:,} {reason} (e.g. {', '.join(report.examples[reason])})"
                        for reason, n in report.skipped.most_common() if reason.startswith("image "))
    return (f"{stage_name}: the images of {report.unusable_images:,} of the {report.named_images:,} samples that name "
            f"one are missing or unreadable ({report.unusable_images / report.named_images:.1%}, more than "
            f"data.max_missing_image_fraction = {limit:g}): {reasons}. Check {stage_name}.image_folder and the "
            "images, or raise data.max_missing_image_fraction to train without them")


def default_num_proc() -> int:
    """Tokenizing processes when [data] num_proc is unset: one per core, at most 8."""
    return min(8, available_cores())


def available_cores() -> int:
    """CPU cores this process may run on (a container's or taskset's share, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _prepare(folder: Path, files: list["_DataFile"], sources: list, how: Tokenization, num_proc: int) -> None:
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
    for batch, part, part_images, processes in _tokenized_jobs(jobs, how, num_proc):
        if batch.num_rows:
            writer.write_table(pa.Table.from_batches([batch]))
        report.add(part)
        images.add(part_images)
    writer.finalize()
    report.preparation = {"seconds": round(time.perf_counter() - started, 2), "processes": processes,
                          "peak_rss_gb": _peak_rss_gb(resource.RUSAGE_SELF),
                          "peak_worker_rss_gb": _peak_rss_gb(resource.RUSAGE_CHILDREN) if processes > 1 else 0.0}
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


@dataclass
class _DataFile:
    """One data file of a stage: how its raw samples are read (as a stream) and turned into conversations."""

    path: str
    source: int
    image_folder: str
    """LLaVA JSON: the folder its image paths are relative to."""
    image_stamps: bool = False
    """Stamp each image file (LLaVA-NeXT: an image's token count depends on its size, which the prepared data must
    follow). A saved Hugging Face dataset holds its images' bytes (save_to_disk embeds them): its own identity
    covers them."""

    def records(self, where) -> Iterator[list]:
        """The file's raw samples in batches of JOB_SAMPLES: (index, sample) for LLaVA JSON, (row, messages,
        number of images, first image's header) for a Hugging Face dataset (images are counted and their headers
        read, never decoded)."""
        if is_llava_json(self.path):
            yield from _batched(enumerate(_json_samples(Path(self.path))), JOB_SAMPLES)
            return
        messages = where.select_columns(["messages"])
        for start in range(0, len(where), JOB_SAMPLES):
            end = min(start + JOB_SAMPLES, len(where))
            yield list(zip(range(start, end), messages[start:end]["messages"], _image_counts(where, start, end),
                           _first_images(where, start, end)))

    def conversation(self, record, report: DataReport, images: _ImageFiles) -> Conversation | None:
        """The record as a conversation, or None (counted in report; its image file noted in `images`)."""
        if is_llava_json(self.path):
            return self._llava_conversation(*record, report, images)
        return self._hf_conversation(*record, report)

    def _llava_conversation(self, i: int, sample, report: DataReport, images: _ImageFiles) -> Conversation | None:
        name = Path(self.path).name
        sample_id = str(sample.get("id", f"{name}[{i}]")) if isinstance(sample, dict) else f"{name}[{i}]"
        problem = _llava_sample_problem(sample)
        header, file, stamp = None, "", 0
        if not problem and isinstance(sample.get("image"), str):
            image = os.path.join(self.image_folder, sample["image"])
            if self.image_stamps:
                file, stamp = os.path.abspath(image), image_stamp(image)
            header = _image_header(image, self.image_folder)
            problem = header.problem
            report.named_images += 1
            images.folders.add(os.path.dirname(os.path.abspath(image)))
            if problem:
                report.unusable_images += 1
                images.unusable.append(os.path.abspath(image))
        if problem:
            report.skip(sample_id, problem)
            return None
        turns = [(ROLES[t["from"]], t["value"]) for t in sample["conversations"]]
        conv = _conversation(sample_id, turns, sample.get("image", ""), self.source, report)
        if conv:
            conv.extra = {k: v for k, v in sample.items() if k not in ("id", "image", "conversations")}
            conv.image_header, conv.image_file, conv.image_stamp = header, file, stamp
        return conv

    def _hf_conversation(self, row: int, messages, n_images: int, header: ImageHeader | None, report: DataReport
                         ) -> Conversation | None:
        sample_id = f"{Path(self.path).name}[{row}]"
        try:
            turns = [(m["role"], _content_text(m["content"])) for m in messages]
        except (KeyError, TypeError):
            report.skip(sample_id, 'a message is not {"role", "content"}')
            return None
        if any(role not in ROLES and role != "system" for role, _ in turns):
            report.skip(sample_id, "a role is not user/assistant/system")
            return None
        if n_images > 1:
            report.skip(sample_id, SEVERAL_IMAGES)
            return None
        if n_images and (header is None or header.problem):
            report.skip(sample_id, header.problem if header else "an empty image in the dataset")
            return None
        turns = [(ROLES.get(role, role), text) for role, text in turns]
        conv = _conversation(sample_id, turns, f"row:{row}" if n_images else "", self.source, report)
        if conv and n_images:
            conv.image_header = header
        return conv


def _batched(items, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _json_samples(path: Path) -> Iterator:
    """The items of a JSON list (.json) or the lines of a .jsonl file, read as a stream: memory holds a buffer of
    the file and one sample, never the whole file or all of its samples."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if path.suffix.lower() != ".jsonl":
        with path.open("rb") as f:
            yield from _json_list_items(f, path)
        return
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError as e:
                        raise DataError(f"{path}: not valid JSON (line {n}: {e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


_JSON_KINDS = {b"{": "dict", b'"': "str", b"t": "bool", b"f": "bool", b"n": "NoneType"}


def _json_list_items(f, path: Path) -> Iterator:
    """The items of the JSON list that binary file `f` holds, one at a time, parsed by ijson's C backend (yajl);
    a file that is not a list, or not valid JSON, is an error naming the file and the sample."""
    first = _first_json_byte(f)
    if first != b"[":
        kind = _JSON_KINDS.get(first) or ("float" if first and first in b"-0123456789" else None)
        if kind is None:
            raise DataError(f"{path}: not valid JSON (expected a list at its start)")
        raise DataError(f"{path}: expected a JSON list of LLaVA samples "
                        f'({{"id", "image", "conversations"}}), got a {kind}')
    n = 0
    try:
        for n, item in enumerate(ijson.items(f, "item", use_float=True), 1):
            yield item
    except ijson.JSONError as e:
        raise DataError(f"{path}: not valid JSON ({_json_problem(e, n)})") from None


def _first_json_byte(f) -> bytes:
    """The first byte of the file that is not JSON whitespace (b"" for none); the file is left at its start."""
    first = b""
    while chunk := f.read(1 << 16):
        if first := chunk.lstrip(b" \t\n\r")[:1]:
            break
    f.seek(0)
    return first


def _json_problem(error: Exception, samples: int) -> str:
    """Where yajl found the file not valid JSON and why, after `samples` complete samples: in the next sample (its
    index is `samples`), between two samples, or at the file's end."""
    message = error.args[0] if error.args else ""
    message = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    reason = message.split("\n")[0].removeprefix("parse error: ").removeprefix("lexical error: ").rstrip(".")
    if reason == "premature EOF":
        return f"the list is not closed: the file ends after {samples} complete samples"
    if reason.startswith("after array element"):
        return f"after sample {samples}: expected ',' or ']'"
    if reason == "trailing garbage":
        return "text after the end of the list"
    return f"sample {samples}: {reason}"


def _llava_sample_problem(sample) -> str | None:
    if not isinstance(sample, dict):
        return "not a JSON object"
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "no \"conversations\" list"
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            return 'a turn is not {"from": "human"|"gpt", "value": text}'
    image = sample.get("image")
    if isinstance(image, list) and len(image) > 1:  # LLaVA-NeXT-Interleave's and LLaVA-OneVision's multi-image samples
        return SEVERAL_IMAGES
    if image is not None and not isinstance(image, str):
        return "\"image\" is not one path (one image per sample)"
    return None


def _image_header(path: str, image_folder: str) -> ImageHeader:
    """The header of a LLaVA JSON sample's image; a missing file says which folder it was looked for in."""
    header = image_header(path)
    if header.problem == NOT_FOUND:
        return ImageHeader(f"{NOT_FOUND} under the image folder ({image_folder or '.'})")
    return header


def image_stamp(path: str) -> int:
    """What changes when an image file is written, replaced or set back to its old modification time: its size,
    modification and change times (the change time cannot be set back) and inode; 0 when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return hash((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)) or 1  # int hashes are the same in every run


def _conversation(sample_id: str, turns: list, image: str, source: int, report: DataReport) -> Conversation | None:
    """Checks shared by both formats; LLaVA's own rules for the image tag and a leading assistant turn. System
    messages before the first turn are the sample's system prompt (an empty one keeps the template's)."""
    leading = next((i for i, (role, _) in enumerate(turns) if role != "system"), len(turns))
    system = "\n".join(text for _, text in turns[:leading] if text) or None
    turns = turns[leading:]
    if any(role == "system" for role, _ in turns):
        report.skip(sample_id, "a system message after the conversation started")
        return None
    if system and IMAGE_TAG in system:
        report.skip(sample_id, "<image> in a system message")
        return None
    if turns and turns[0][0] == "assistant":
        turns = turns[1:]  # LLaVA drops one leading gpt turn
    # Exactly empty only: official LLaVA trains whitespace-only turns as they are.
    if any(not text for role, text in turns if role == "assistant"):
        report.skip(sample_id, "an assistant turn is empty")
        return None
    if any(not text for role, text in turns if role == "user"):
        report.skip(sample_id, "a user turn is empty")
        return None
    tags = sum(text.count(IMAGE_TAG) for _, text in turns)
    if any(IMAGE_TAG in text for role, text in turns if role == "assistant"):
        report.skip(sample_id, "<image> in an assistant turn")
        return None
    if tags > 1:
        report.skip(sample_id, "more than one <image> tag (one image per sample)")
        return None
    if image:
        at = next((i for i, (_, text) in enumerate(turns) if IMAGE_TAG in text), 0)
        turns = [(role, _image_first(text) if i == at else text) for i, (role, text) in enumerate(turns)]
    elif tags:
        report.skip(sample_id, "<image> tag but no image")
        return None
    return Conversation(sample_id, turns, image, source, system=system)


def _image_first(text: str) -> str:
    # LLaVA's preprocess_multimodal: drop the tag, strip, prefix "<image>\n", strip again.
    return (IMAGE_TAG + "\n" + text.replace(IMAGE_TAG, "").strip()).strip()


def _load_hf_dataset(path: str) -> datasets.Dataset:
    if Path(path).is_dir() and (Path(path) / "dataset_info.json").exists():
        dataset = datasets.load_from_disk(path)
    elif Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"{path}: not a LLaVA JSON file (.json/.jsonl) or a dataset saved with save_to_disk")
    else:
        dataset = datasets.load_dataset(path, split="train")
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"]
    missing = {"messages"} - set(dataset.column_names)
    if missing:
        raise DataError(f"{path}: a Hugging Face dataset needs a \"messages\" column (and \"images\"), "
                        f"has {dataset.column_names}")
    return dataset


def _stored_images(dataset: datasets.Dataset):
    """A dataset's "images" column as stored, read through Arrow (memory-mapped): nothing decoded, so no rule of the
    datasets library is applied to the pixels (nor is the column cast, which would copy it). None without one."""
    return dataset.select_columns(["images"]).with_format("arrow") if "images" in dataset.column_names else None


def _first_stored(row) -> io.BytesIO | str | None:
    """The first image of a row of the stored "images" column: its encoded bytes (one image copied), or the path
    stored in their place; None without an image."""
    first = row.values[0] if row.is_valid and len(row) else None
    if first is None or not first.is_valid:
        return None
    return io.BytesIO(first["bytes"].as_buffer()) if first["bytes"].is_valid else first["path"].as_py()


def _first_images(dataset: datasets.Dataset, start: int, end: int) -> list[ImageHeader | None]:
    """The header of the first image of each row of dataset[start:end] (None without one), read row by row from the
    stored bytes: a batch's images are never all copied at once, and never decoded."""
    stored = _stored_images(dataset)
    if stored is None:
        return [None] * (end - start)
    return [None if (first := _first_stored(row)) is None else image_header(first)
            for row in stored[start:end]["images"]]


def _image_counts(dataset: datasets.Dataset, start: int, end: int) -> list[int]:
    """Images per row of dataset[start:end], read from the Arrow column's list lengths: no image is decoded."""
    if "images" not in dataset.column_names:
        return [0] * (end - start)
    images = dataset.select_columns(["images"]).with_format("arrow")[start:end]["images"]
    return pc.fill_null(pc.list_value_length(images), 0).to_pylist()


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(IMAGE_TAG if part["type"] == "image" else part["text"] for part in content)


def is_llava_json(path: str) -> bool:
    return path.lower().endswith((".json", ".jsonl"))  # DATA.JSON too


def _cache_key(stage, sources: list, tokenizer, image_token_id: int, geometry: ImageGeometry | AnyresGeometry) -> str:
    """What the prepared samples depend on: each data file's identity, the template, the tokenizer and the image
    geometry. Which images exist is checked apart (_cache_still_true): it changes without any file changing."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    key = {"version": CACHE_VERSION, "files": [_file_identity(path, where) for path, where in zip(stage.data, sources)],
           "image_folder": str(Path(stage.image_folder).resolve()), "template": stage.template,
           "max_seq_len": stage.max_seq_len, "image_token_id": image_token_id, "geometry": asdict(geometry),
           "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(), "bos": tokenizer.bos_token,
           "eos": tokenizer.eos_token}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _file_identity(path: str, where) -> list:
    """A LLaVA JSON file: path, size and modification time. A Hugging Face dataset: its fingerprint, and for a
    saved one the size and modification time of every file of its folder (a dataset saved again in place)."""
    p = Path(path)
    if isinstance(where, str):
        stat = p.stat() if p.exists() else None
        return [str(p.resolve()), stat.st_size if stat else None, stat.st_mtime_ns if stat else None]
    saved = [f for f in p.rglob("*") if f.name in SAVED_DATASET_FILES or re.fullmatch(r"data-.*\.arrow", f.name)] \
        if p.is_dir() else []  # what save_to_disk writes; not cache files that transforms may add beside them
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
        batch = samples[start:start + 100_000]
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
    return all(image_stamp(file) == stamp for file, stamp in
               zip(stamped["image_file"].to_pylist(), stamped["image_stamp"].to_pylist()))


@dataclass
class _ImageFiles:
    """The image files a preparation looked at: those it could not use (rechecked by the next run: one may have been
    added or mended), and the folders that hold them all (a folder's modification time changes when a file is added
    to it or removed from it)."""

    unusable: list[str] = field(default_factory=list)
    folders: set[str] = field(default_factory=set)

    def add(self, other: _ImageFiles) -> None:
        self.unusable += other.unusable
        self.folders |= other.folders

    def record(self) -> dict:
        return {"unusable": self.unusable, "folders": {d: _mtime_ns(d) for d in sorted(self.folders)}}


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None
