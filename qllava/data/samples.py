"""Turning conversations into samples: rendered with a template as official LLaVA renders them, tokenized as its
tokenizer_image_token does (input_ids and labels), with ONE placeholder per image that expand_images widens to the
image's tokens when a batch or a prompt is built.

A sample is {"id", "input_ids", "labels", "length", "source", "image", "image_tokens", "image_file", "image_stamp"}
(FEATURES): image_tokens says, per image, how many tokens it becomes; "length" counts tokens after that widening
(what packing and max_seq_len measure); labels are -100 everywhere but the assistant text and its end token.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch

from .. import templates
from ..errors import DataError
from ..templates import IMAGE_TAG, TemplateError
from ..tokenizer import ids_and_offsets
from ..vision import AnyresGeometry, ImageGeometry
from .formats import Conversation, DataReport

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "source": datasets.Value("int32"),
        "image": datasets.Value("string"),
        "image_tokens": datasets.List(datasets.Value("int32")),
        "image_file": datasets.Value("string"),
        "image_stamp": datasets.Value("int64"),
    }
)


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


def tokenize_conversation(
    turns: list[tuple[str, str]], template: str, tokenizer, image_token_id: int, system: str | None = None
) -> tuple[list[int], list[int]]:
    """input_ids (one placeholder per image) and labels of one conversation to train on, as official LLaVA's
    preprocessing makes them (TemplateError for one LLaVA would not train on: see templates.render). `system`
    replaces the template's system prompt."""
    rendered = templates.render(
        template,
        turns,
        tokenizer.bos_token or "",
        tokenizer.eos_token,
        special_tokens=tuple(tokenizer.all_special_tokens),
        system=system,
    )
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
        raise DataError(
            f"sample {sample['id']}: {placeholders} image placeholders for {len(sample['image_tokens'])} "
            "images (prepared with another tokenizer?): delete its folder in the tokenized-data cache"
        )
    wide = expand_images(ids, image_token_id, sample["image_tokens"])
    if len(wide) != sample["length"]:
        raise DataError(
            f"sample {sample['id']}: {len(wide)} tokens once its images are widened, its length says "
            f"{sample['length']}: delete its folder in the tokenized-data cache"
        )
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


def tokenize_dataset(
    conversations: list[Conversation],
    template: str,
    tokenizer,
    image_token_id: int,
    geometry: ImageGeometry | AnyresGeometry,
    max_seq_len: int,
    report: DataReport,
) -> datasets.Dataset:
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
        for key, value in (
            ("id", conv.id),
            ("input_ids", ids),
            ("labels", labels),
            ("length", length),
            ("source", conv.source),
            ("image", conv.image),
            ("image_tokens", image_tokens),
            ("image_file", conv.image_file),
            ("image_stamp", conv.image_stamp),
        ):
            columns[key].append(value)
    return columns
