"""Reading LLaVA JSON and Hugging Face datasets, tokenizing conversations into input_ids + labels, images.

A sample becomes {"id", "input_ids", "labels", "length", "source", "image"}: input_ids already hold one image
token per vision feature, labels are -100 everywhere but the assistant text and its end token. Samples that
cannot be trained on are skipped and counted by reason (never silently: LLaVA's "tokenization mismatch
(ignored)" is the anti-example), and a file-level problem is an error naming the file. Tokenized datasets
are cached on disk; images are only decoded when a batch is built (collate.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from PIL import Image

from . import templates
from .templates import IMAGE_TAG, TemplateError
from .tokenizer import ids_and_offsets

CACHE_VERSION = 3  # 3: the separator space before an answer is a label, as in LLaVA
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """A problem with a data file or a data setting, naming the file or the recipe key."""


@dataclass
class Conversation:
    id: str
    turns: list[tuple[str, str]]
    image: str = ""
    """"" for text-only; a file path, or "row:N" for an image stored in a Hugging Face dataset."""
    source: int = 0
    """Index of the data file it came from (an ImageStore resolves images per file)."""
    extra: dict = field(default_factory=dict)
    """Fields qllava does not interpret (category, options, ...), kept for evaluation."""


@dataclass
class DataReport:
    """What a stage's data turned into: samples used, skipped by reason (with example ids), tokens."""

    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    tokens: int = 0
    label_tokens: int = 0

    def skip(self, sample_id: str, reason: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(sample_id)

    def to_dict(self) -> dict:
        return {"used": self.used, "skipped": dict(self.skipped), "examples": self.examples,
                "tokens": self.tokens, "label_tokens": self.label_tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "DataReport":
        return cls(d["used"], Counter(d["skipped"]), d["examples"], d["tokens"], d["label_tokens"])


class ImageStore:
    """Opens a sample's image: a file under its data file's image folder, or a row of a Hugging Face dataset."""

    def __init__(self, sources: list):
        self.sources = sources  # per data file: an image folder (str) or a datasets.Dataset

    def open(self, source: int, image: str) -> Image.Image:
        where = self.sources[source]
        if isinstance(where, str):
            path = os.path.join(where, image)
            try:
                with Image.open(path) as img:
                    return img.convert("RGB")
            except (OSError, ValueError) as e:
                raise DataError(f"image {path}: cannot be read ({e})") from None
        return where[int(image.removeprefix("row:"))]["images"][0].convert("RGB")


def image_source(path: str, image_folder: str):
    """Where a data file's images live: the image folder (LLaVA JSON) or the dataset itself (memory-mapped)."""
    return image_folder if _is_llava_json(path) else _load_hf_dataset(path)


def read_conversations(path: str, where, source: int, report: DataReport) -> list[Conversation]:
    """All usable conversations of one data file; unusable samples are counted in `report`."""
    if _is_llava_json(path):
        return _read_llava_json(Path(path), where, source, report)
    return _read_hf_dataset(where, path, source, report)


def encode(rendered: templates.Rendered, tokenizer, image_token_id: int, n_image_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of a rendered conversation, tokenized the way LLaVA's tokenizer_image_token does.

    The text around each <image> is tokenized on its own (so the tokens next to an image are LLaVA's, e.g.
    "▁" + "<0x0A>" after it), only the first chunk keeps its BOS, and the tag becomes n_image_tokens ids.
    A token is a label when its characters overlap a trained span of the template.
    """
    ids, labels, offset = [], [], 0
    for i, chunk in enumerate(rendered.text.split(IMAGE_TAG)):
        if i > 0:
            ids += [image_token_id] * n_image_tokens
            labels += [-100] * n_image_tokens
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
                          n_image_tokens: int) -> tuple[list[int], list[int]]:
    """input_ids and labels of one conversation to train on, as official LLaVA's preprocessing makes them
    (TemplateError for one LLaVA would not train on as a conversation: see templates.render)."""
    rendered = templates.render(template, turns, tokenizer.bos_token or "", tokenizer.eos_token,
                                special_tokens=tuple(tokenizer.all_special_tokens))
    return encode(rendered, tokenizer, image_token_id, n_image_tokens)


def tokenize_dataset(conversations: list[Conversation], template: str, tokenizer, image_token_id: int,
                     n_image_tokens: int, max_seq_len: int, report: DataReport) -> datasets.Dataset:
    columns = {"id": [], "input_ids": [], "labels": [], "length": [], "source": [], "image": []}
    for conv in conversations:
        try:
            ids, labels = tokenize_conversation(conv.turns, template, tokenizer, image_token_id, n_image_tokens)
        except TemplateError as e:
            report.skip(conv.id, str(e))
            continue
        if len(ids) > max_seq_len:
            report.skip(conv.id, f"longer than max_seq_len ({max_seq_len} tokens, image tokens included)")
            continue
        n_labels = sum(label != -100 for label in labels)
        if n_labels == 0:
            report.skip(conv.id, "no token left to train on (empty assistant text)")
            continue
        report.used += 1
        report.tokens += len(ids)
        report.label_tokens += n_labels
        for key, value in (("id", conv.id), ("input_ids", ids), ("labels", labels), ("length", len(ids)),
                           ("source", conv.source), ("image", conv.image)):
            columns[key].append(value)
    return datasets.Dataset.from_dict(columns)


def build_stage_dataset(stage, tokenizer, image_token_id: int, n_image_tokens: int, cache_dir: str,
                        stage_name: str) -> tuple[datasets.Dataset, ImageStore, DataReport]:
    """A stage's data, tokenized with its template (cached), filtered and counted."""
    if stage.max_seq_len < n_image_tokens + 2:
        raise DataError(f"{stage_name}.max_seq_len: {stage.max_seq_len} is shorter than one image's "
                        f"{n_image_tokens} tokens plus text; raise it (LLaVA-1.5 uses 2048)")
    sources = [image_source(path, stage.image_folder) for path in stage.data]
    key = _cache_key(stage, tokenizer, image_token_id, n_image_tokens)
    folder = Path(cache_dir or Path.home() / ".cache" / "qllava") / "tokenized" / key
    if (folder / "report.json").exists():
        report = DataReport.from_dict(json.loads((folder / "report.json").read_text()))
        dataset = datasets.load_from_disk(str(folder / "dataset"))
    else:
        report = DataReport()
        conversations = []
        for source, path in enumerate(stage.data):
            conversations += read_conversations(path, sources[source], source, report)
        dataset = tokenize_dataset(conversations, stage.template, tokenizer, image_token_id, n_image_tokens,
                                   stage.max_seq_len, report)
        if len(dataset):
            dataset.save_to_disk(str(folder / "dataset"))
            (folder / "report.json").write_text(json.dumps(report.to_dict()))
    if len(dataset) == 0:
        reasons = "; ".join(f"{n} {r}" for r, n in report.skipped.most_common()) or "the files hold no samples"
        raise DataError(f"{stage_name}: no trainable samples left in {', '.join(stage.data)} ({reasons})")
    return dataset, ImageStore(sources), report


def pad_to_square(image: Image.Image, image_mean: list[float]) -> Image.Image:
    """LLaVA's expand2square: centre on a square of the image-mean colour (truncated to ints, as LLaVA does)."""
    width, height = image.size
    if width == height:
        return image
    size = max(width, height)
    canvas = Image.new(image.mode, (size, size), tuple(int(x * 255) for x in image_mean))
    canvas.paste(image, ((size - width) // 2, (size - height) // 2))
    return canvas


def _read_llava_json(path: Path, image_folder: str, source: int, report: DataReport) -> list[Conversation]:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        text = path.read_text()
        raw = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of LLaVA samples "
                        f'({{"id", "image", "conversations"}}), got a {type(raw).__name__}')
    out = []
    for i, sample in enumerate(raw):
        sample_id = str(sample.get("id", f"{path.name}[{i}]")) if isinstance(sample, dict) else f"{path.name}[{i}]"
        problem = _llava_sample_problem(sample, image_folder)
        if problem:
            report.skip(sample_id, problem)
            continue
        turns = [(ROLES[t["from"]], t["value"]) for t in sample["conversations"]]
        conv = _conversation(sample_id, turns, sample.get("image", ""), source, report)
        if conv:
            conv.extra = {k: v for k, v in sample.items() if k not in ("id", "image", "conversations")}
            out.append(conv)
    return out


def _llava_sample_problem(sample, image_folder: str) -> str | None:
    if not isinstance(sample, dict):
        return "not a JSON object"
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "no \"conversations\" list"
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            return 'a turn is not {"from": "human"|"gpt", "value": text}'
    image = sample.get("image")
    if image is not None:
        if not isinstance(image, str):
            return "\"image\" is not one path (one image per sample)"
        path = os.path.join(image_folder, image)
        if not os.path.isfile(path):
            return f"image file not found under the image folder ({image_folder or '.'})"
        try:  # the header only (fast); a file cut short later in its data stops training naming the file
            Image.open(path).close()
        except (OSError, ValueError):
            return "image file cannot be read as an image"
    return None


def _conversation(sample_id: str, turns: list, image: str, source: int, report: DataReport) -> Conversation | None:
    """Checks shared by both formats; LLaVA's own rules for the image tag and a leading assistant turn."""
    turns = [(role, text) for role, text in turns if role != "system"]  # the template owns the system prompt
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
    return Conversation(sample_id, turns, image, source)


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


def _read_hf_dataset(dataset: datasets.Dataset, path: str, source: int, report: DataReport) -> list[Conversation]:
    out = []
    image_counts = _image_counts(dataset)
    for row, messages in enumerate(dataset["messages"]):
        sample_id = f"{Path(path).name}[{row}]"
        try:
            turns = [(m["role"], _content_text(m["content"])) for m in messages]
        except (KeyError, TypeError):
            report.skip(sample_id, 'a message is not {"role", "content"}')
            continue
        if any(role not in ROLES and role != "system" for role, _ in turns):
            report.skip(sample_id, "a role is not user/assistant/system")
            continue
        turns = [(ROLES.get(role, role), text) for role, text in turns]
        n_images = image_counts[row]
        if n_images > 1:
            report.skip(sample_id, "more than one image (one image per sample)")
            continue
        conv = _conversation(sample_id, turns, f"row:{row}" if n_images else "", source, report)
        if conv:
            out.append(conv)
    return out


def _image_counts(dataset: datasets.Dataset) -> list[int]:
    """Images per row, read without decoding any image."""
    if "images" not in dataset.column_names:
        return [0] * len(dataset)
    undecoded = dataset.select_columns(["images"]).cast_column("images", datasets.List(datasets.Image(decode=False)))
    return [len(images or []) for images in undecoded["images"]]


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(IMAGE_TAG if part["type"] == "image" else part["text"] for part in content)


def _is_llava_json(path: str) -> bool:
    return path.endswith((".json", ".jsonl"))


def _cache_key(stage, tokenizer, image_token_id: int, n_image_tokens: int) -> str:
    files = []
    for path in stage.data:
        p = Path(path)
        stat = p.stat() if p.exists() else None
        files.append([str(p.resolve()), stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    key = {"version": CACHE_VERSION, "files": files, "image_folder": str(Path(stage.image_folder).resolve()),
           "template": stage.template, "max_seq_len": stage.max_seq_len, "image_token_id": image_token_id,
           "n_image_tokens": n_image_tokens, "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
           "bos": tokenizer.bos_token, "eos": tokenizer.eos_token}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
