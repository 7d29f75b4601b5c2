"""Rows and batches: samples grouped into rows (packed best-fit decreasing, or one per row) and the collator.

Packed rows are exact, not approximate: transformers isolates the samples of a row (block-diagonal causal
attention, or FlashAttention varlen) only when position_ids restart at 0 for every sample, the attention
mask is None and no cache is built (tests/test_packing_exact.py guards it). The collator produces exactly
that, masks the first label of every sample (so no sample learns from its predecessor's last token), widens
each sample's image placeholders to the token count stored with each image, and orders pixel_values as their
image tokens appear.
Unpacked rows are right-padded with an attention mask, the classic way.

The collator is a pure function of the rows it is handed (Rows yields them), so DataLoader worker processes
can build batches and decode images; what it counts travels in the batch (REAL_TOKENS), for the trainer.
"""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from dataclasses import dataclass

import datasets
import torch

from . import vision
from .data import ImageStore, expand_sample

REAL_TOKENS = "qllava_real_tokens"
"""Batch key: the batch's real (not padding) tokens. The trainer takes it out before the model sees the batch."""


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into rows of total length <= capacity, longest samples placed first,
    each into the row it fills best. Equal lengths keep the order given (the caller shuffles them)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - lengths[i], len(rows) - 1))
        else:
            space, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (space - lengths[i], row))
    return rows


def padded_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Sample lengths in shuffled batches, as a padded (unpacked) trainer would draw them."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return [[lengths[i] for i in order[at : at + batch_size]] for at in range(0, len(order), batch_size)]


def pad_fraction(batches: list[list[int]]) -> float:
    """Share of the slots of batches padded to their longest row that hold padding."""
    slots = sum(len(b) * max(b) for b in batches)
    return 1 - sum(map(sum, batches)) / slots if slots else 0.0


class Rows(torch.utils.data.Dataset):
    """The rows of the current epoch: lists of sample indices, one sample per row unless packing. Item i is row
    i's samples (what the collator is handed), so a DataLoader draws rows, in this process or in workers.

    Packed rows are re-drawn every epoch (set_epoch, before the epoch's DataLoader iterator starts its workers):
    samples of equal length are shuffled among themselves before best-fit decreasing, so rows change but their
    number and lengths stay fixed, as the trainer's step count requires.
    """

    def __init__(self, samples, max_seq_len: int, packing: bool, seed: int):
        self.samples = samples
        self.lengths = list(samples["length"])
        self.max_seq_len = max_seq_len
        self.packing = packing
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if not self.packing:
            self.rows = [[i] for i in range(len(self.lengths))]
            return
        rng = random.Random(self.seed * 1_000_003 + epoch)
        by_length = defaultdict(list)
        for i, n in enumerate(self.lengths):
            by_length[n].append(i)
        shuffled = []
        for n in sorted(by_length):
            group = by_length[n]
            rng.shuffle(group)
            shuffled += group
        rows = best_fit_decreasing([self.lengths[i] for i in shuffled], self.max_seq_len)
        self.rows = [[shuffled[j] for j in row] for row in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int) -> list[dict]:
        return [self.samples[j] for j in self.rows[row]]

    def row_lengths(self) -> list[int]:
        """Tokens per row; they do not change between epochs (only equal-length samples swap rows)."""
        return [sum(self.lengths[i] for i in row) for row in self.rows]

    def as_dataset(self):
        """Row numbers and row lengths as a datasets.Dataset, the type TRL's trainer requires of its train_dataset."""
        return datasets.Dataset.from_dict({"row": list(range(len(self.rows))), "length": self.row_lengths()})


class SimilarLengthSampler(torch.utils.data.Sampler):
    """Row order for an epoch: rows shuffled, sorted by length inside mega-batches of `megabatch` micro-batches,
    micro-batches shuffled. Rows of similar length share a micro-batch, so padding them to the longest one
    costs almost nothing, and every epoch (set_epoch) draws a new order from the seed."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, megabatch: int = 50):
        self.lengths, self.batch_size, self.seed, self.megabatch = lengths, batch_size, seed, megabatch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.batch_size * self.megabatch
        batches = []
        for at in range(0, len(order), size):
            mega = sorted(order[at : at + size], key=lambda i: -self.lengths[i])
            batches += [mega[k : k + self.batch_size] for k in range(0, len(mega), self.batch_size)]
        # The data loader cuts this stream into batches again: only the last batch may be short.
        short = [b for b in batches if len(b) < self.batch_size]
        full = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(full)
        return iter([i for batch in full + short for i in batch])


@dataclass
class TokenCounts:
    """Tokens of the batches trained on so far: real tokens, label tokens and padded slots."""

    tokens: int = 0
    label_tokens: int = 0
    slots: int = 0

    def add(self, batch: dict) -> None:
        """Count a batch as the collator built it (REAL_TOKENS still in it)."""
        self.tokens += int(batch[REAL_TOKENS])
        self.label_tokens += int((batch["labels"] != -100).sum())
        self.slots += batch["input_ids"].numel()

    @property
    def pad_fraction(self) -> float:
        return 1 - self.tokens / self.slots if self.slots else 0.0


@dataclass(frozen=True)
class Collator:
    """Turns rows (lists of tokenized samples, as Rows yields them) into one batch for
    LlavaForConditionalGeneration. Holds settings only: the same rows always give the same batch."""

    images: ImageStore
    image_processor: object
    image_aspect_ratio: str
    pad_token_id: int
    image_token_id: int
    packing: bool = True
    flatten: bool = False
    """FlashAttention-2 isolates packed samples only in a batch of one row: concatenate the rows (no padding)."""

    def __call__(self, rows: list[list[dict]]) -> dict:
        """The training batch: model inputs plus REAL_TOKENS (the trainer counts it and takes it out)."""
        batch = self.batch(rows)
        batch[REAL_TOKENS] = torch.tensor(sum(s["length"] for row in rows for s in row))
        return batch

    def batch(self, rows: list[list[dict]]) -> dict:
        """The model inputs of the rows given as lists of tokenized samples."""
        if self.flatten and self.packing:
            rows = [[sample for row in rows for sample in row]]
        row_lengths = torch.tensor([sum(s["length"] for s in row) for row in rows])
        width = int(row_lengths.max())
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for sample in row:
                sample_ids, sample_labels = expand_sample(sample, self.image_token_id)
                n = len(sample_ids)
                ids[r, at : at + n] = sample_ids
                labels[r, at : at + n] = sample_labels
                labels[r, at] = -100  # never learn a sample's first token from the previous sample's last one
                positions[r, at : at + n] = torch.arange(n)
                at += n
            positions[r, at:] = torch.arange(width - at)  # padding is a sequence of its own
        batch = {"input_ids": ids, "labels": labels}
        if self.packing:
            batch["position_ids"] = positions
        else:
            batch["attention_mask"] = (torch.arange(width)[None, :] < row_lengths[:, None]).long()
        batch.update(self.image_inputs([s for row in rows for s in row]))
        return batch

    def image_inputs(self, samples: list[dict]) -> dict:
        """pixel_values (and image_sizes) of the samples that have an image, in sample order (the order of their
        image tokens); none for text only. Each image is checked against its sample's token count as it is decoded
        (ImageStore.open_sample): a changed file stops here, naming it, not in the model."""
        images = [self.images.open_sample(s) for s in samples if s["image"]]
        return vision.image_inputs(images, self.image_processor, self.image_aspect_ratio) if images else {}


@dataclass
class Step:
    """What one optimizer step computed: its loss, every trainable gradient and the label tokens it averaged over."""

    loss: float
    grads: dict[str, torch.Tensor]
    label_tokens: int

    def error(self, reference: Step) -> float:
        """Worst relative difference from `reference`, in the loss and in every gradient."""
        return max(self.loss_error(reference), self.gradient_error(reference))

    def loss_error(self, reference: Step) -> float:
        return abs(self.loss - reference.loss) / abs(reference.loss)

    def gradient_error(self, reference: Step) -> float:
        """Worst relative difference (in norm) of a gradient from `reference`'s."""
        return max(((self.grads[n] - g).norm() / g.norm().clamp(min=1e-30)).item() for n, g in reference.grads.items())


def unpacked_step(model, unpacked: Collator, samples: list[dict]) -> Step:
    """The samples in one right-padded batch, loss = token-summed NLL / label tokens. `model` in train mode."""
    model.zero_grad()
    batch = unpacked.batch([[s] for s in samples])
    labels = batch.pop("labels")[:, 1:]
    logits = model(**batch, use_cache=False).logits[:, :-1]
    total = int((labels != -100).sum())
    loss = (
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        / total
    )
    loss.backward()
    return _step(model, loss.item(), total)


def packed_step(model, packed: Collator, micro_batches: list[list[list[dict]]], label_tokens: int) -> Step:
    """The micro-batches of rows, each scored with TRL's fused head and num_items_in_batch = the step's label tokens,
    as SFTTrainer does under gradient accumulation; gradients accumulate. `model` in train mode."""
    from trl.trainer.utils import add_fused_lm_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "_qllava_fused_head", False):  # SFTTrainer adds the same head when it trains
        add_fused_lm_head(base)
        base._qllava_fused_head = True
    model.zero_grad()
    loss = 0.0
    for micro in micro_batches:
        out = model(**packed.batch(micro), fused_lm_head=True, num_items_in_batch=label_tokens)
        out.loss.backward()
        loss += out.loss.item()
    return _step(model, loss, label_tokens)


def _step(model, loss: float, label_tokens: int) -> Step:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return Step(loss, grads, label_tokens)


def packed_vs_unpacked_error(
    model, packed: Collator, unpacked: Collator, micro_batches: list[list[list[dict]]]
) -> float:
    """Worst relative error between the packed step (the given micro-batches of rows) and the unpacked one (all
    their samples in one padded batch), in loss and in every trainable gradient. `model` must be in train mode."""
    reference = unpacked_step(model, unpacked, [s for micro in micro_batches for row in micro for s in row])
    return packed_step(model, packed, micro_batches, reference.label_tokens).error(reference)
