"""Reading the data formats users have: LLaVA JSON (a list streamed sample by sample, or JSON lines) and Hugging Face
datasets (`messages` and `images` columns), turned into Conversations; the problems that make a sample unusable,
counted by reason in a DataReport (never silently: LLaVA's "tokenization mismatch (ignored)" is the anti-example);
and the ImageStore that opens a sample's image, upright, from its file or its dataset row.

A new data format is a reader here: its raw records in batches (_DataFile.records) and each record as a
Conversation (_DataFile.conversation), the shared rules applied by _conversation. A file-level problem is an error
naming the file; a sample-level one a skip naming the sample.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import ijson
import pyarrow.compute as pc
from PIL import Image

from ..errors import DataError
from ..templates import IMAGE_TAG
from ..vision import NOT_FOUND, AnyresGeometry, ImageGeometry, ImageHeader, VisionError, image_header, open_image

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
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

    def add(self, other: DataReport) -> None:
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
            kept += ids[: 3 - len(kept)]

    def to_dict(self) -> dict:
        return {
            "used": self.used,
            "skipped": dict(self.skipped),
            "examples": self.examples,
            "tokens": self.tokens,
            "label_tokens": self.label_tokens,
            "with_image": self.with_image,
            "left_out": dict(self.left_out),
            "named_images": self.named_images,
            "unusable_images": self.unusable_images,
            "oriented_images": self.oriented_images,
            "large_images": self.large_images,
            "preparation": self.preparation,
            "cached": self.cached,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DataReport:
        return cls(
            d["used"],
            Counter(d["skipped"]),
            d["examples"],
            d["tokens"],
            d["label_tokens"],
            d["with_image"],
            Counter(d["left_out"]),
            d["named_images"],
            d["unusable_images"],
            d["oriented_images"],
            d["large_images"],
            d["preparation"],
            d.get("cached", False),
        )


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
            raise DataError(
                f"{e}: run the same command again with --resume: the data are prepared again from the "
                "images as they are now"
            ) from None
        except VisionError as e:
            raise DataError(
                f"{e}: remove or fix the file, then run the same command with --resume (a sample whose "
                "image is missing is skipped and counted)"
            ) from None

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
                    f"{', '.join(map(str, sample['image_tokens']))}: the file changed after the data were prepared"
                )
        return image


class ImageChanged(DataError):
    """A sample's image makes another number of tokens than the sample was prepared with."""


def image_source(path: str, image_folder: str):
    """Where a data file's images live: the image folder (LLaVA JSON) or the dataset itself (memory-mapped)."""
    return image_folder if is_llava_json(path) else _load_hf_dataset(path)


def read_conversations(
    path: str, where, source: int, report: DataReport, limit: int | None = None
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
            yield list(
                zip(
                    range(start, end),
                    messages[start:end]["messages"],
                    _image_counts(where, start, end),
                    _first_images(where, start, end),
                )
            )

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

    def _hf_conversation(
        self, row: int, messages, n_images: int, header: ImageHeader | None, report: DataReport
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
        raise DataError(
            f'{path}: expected a JSON list of LLaVA samples ({{"id", "image", "conversations"}}), got a {kind}'
        )
    n = 0
    try:
        # n outlives the loop: an error names the last complete sample
        for n, item in enumerate(ijson.items(f, "item", use_float=True), 1):  # noqa: B007
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
        return f"the list is not closed: the file ends after {samples} complete sample{'s' * (samples != 1)}"
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
        return 'no "conversations" list'
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            return 'a turn is not {"from": "human"|"gpt", "value": text}'
    image = sample.get("image")
    if isinstance(image, list) and len(image) > 1:  # LLaVA-NeXT-Interleave's and LLaVA-OneVision's multi-image samples
        return SEVERAL_IMAGES
    if image is not None and not isinstance(image, str):
        return '"image" is not one path (one image per sample)'
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
        raise DataError(
            f'{path}: a Hugging Face dataset needs a "messages" column (and "images"), has {dataset.column_names}'
        )
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
    return [
        None if (first := _first_stored(row)) is None else image_header(first) for row in stored[start:end]["images"]
    ]


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
