"""Rows and the collator: best-fit decreasing, padded and packed batches, image order."""

import datasets
import pytest
import torch
from PIL import Image

from qllava.data import ImageStore
from qllava.packing import (Collator, Rows, SimilarLengthSampler, best_fit_decreasing, pad_fraction,
                            padded_batches)


def samples(lengths, image_every=0):
    rows = {"id": [], "input_ids": [], "labels": [], "length": [], "source": [], "image": []}
    for i, n in enumerate(lengths):
        ids = [1] + [10 + i] * (n - 1)
        rows["id"].append(str(i))
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] + ids[1:])
        rows["length"].append(n)
        rows["source"].append(0)
        rows["image"].append(f"{i}.png" if image_every and i % image_every == 0 else "")
    return datasets.Dataset.from_dict(rows)


class FakeImages(ImageStore):
    def __init__(self):
        super().__init__([""])

    def open(self, source, image):
        shade = int(image.split(".")[0]) * 10
        return Image.new("RGB", (4, 4), (shade, shade, shade))


class FakeProcessor:
    image_mean = [0.5, 0.5, 0.5]

    def __call__(self, images, return_tensors):
        return {"pixel_values": torch.stack([torch.tensor(img.getpixel((0, 0))[0]).float().expand(3, 4, 4)
                                             for img in images])}


def collator(rows):
    return Collator(rows, FakeImages(), FakeProcessor(), "crop", pad_token_id=0)


def test_best_fit_decreasing_fills_rows_without_overflow():
    lengths = [7, 5, 5, 4, 3, 3, 2, 1]
    rows = best_fit_decreasing(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 30 tokens in rows of 10: optimal


def test_unpacked_batch_is_right_padded_with_an_attention_mask():
    rows = Rows(samples([3, 5]), max_seq_len=8, packing=False, seed=0)
    batch = collator(rows)([{"row": 0}, {"row": 1}])
    assert batch["input_ids"].tolist() == [[1, 10, 10, 0, 0], [1, 11, 11, 11, 11]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 10, 10, -100, -100], [-100, 11, 11, 11, 11]]
    assert "position_ids" not in batch and "pixel_values" not in batch


def test_packed_rows_restart_positions_and_mask_each_first_label():
    rows = Rows(samples([3, 2, 4], image_every=2), max_seq_len=6, packing=True, seed=0)
    assert sorted(len(r) for r in rows.rows) == [1, 2]
    packed_row = next(i for i, r in enumerate(rows.rows) if len(r) == 2)
    batch = collator(rows)([{"row": packed_row}])
    first, second = rows.rows[packed_row]
    n1 = rows.lengths[first]
    assert "attention_mask" not in batch
    assert batch["position_ids"][0].tolist()[:6] == list(range(n1)) + list(range(6 - n1))
    assert batch["labels"][0, 0] == -100 and batch["labels"][0, n1] == -100
    shades = [int(v) for v in batch["pixel_values"][:, 0, 0, 0]]
    assert shades == [10 * i for i in rows.rows[packed_row] if i % 2 == 0]  # images in token order


def test_rows_are_redrawn_per_epoch_with_the_same_shape():
    rows = Rows(samples([4] * 12 + [3] * 6), max_seq_len=12, packing=True, seed=0)
    first = [list(r) for r in rows.rows]
    rows.set_epoch(1)
    assert rows.rows != first
    assert sorted(sum(rows.lengths[i] for i in r) for r in rows.rows) == \
        sorted(sum(rows.lengths[i] for i in r) for r in first)


def test_flash_attention_batches_are_one_row_without_padding():
    rows = Rows(samples([3, 5, 4, 2]), max_seq_len=8, packing=True, seed=0)
    c = Collator(rows, FakeImages(), FakeProcessor(), "crop", pad_token_id=0, flatten=True)
    batch = c([{"row": i} for i in range(len(rows))])
    assert batch["input_ids"].shape == (1, 14) and "attention_mask" not in batch
    assert (batch["position_ids"][0] == 0).sum() == 4 and c.counts.pad_fraction == 0.0


def test_similar_length_sampler_keeps_batches_aligned_and_similar():
    lengths = [500, 120, 480, 130, 510, 125, 470, 140, 490, 135, 505]
    sampler = SimilarLengthSampler(lengths, batch_size=2, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(11))
    batches = [order[i:i + 2] for i in range(0, 11, 2)]
    assert len(batches[-1]) == 1  # only the last batch is short, so the loader's cuts match ours
    assert pad_fraction([[lengths[i] for i in b] for b in batches]) < 0.05
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_padded_pad_fraction():
    assert pad_fraction([[10, 5], [4, 4]]) == pytest.approx(1 - 23 / 28)
    assert padded_batches([1, 2, 3], 2, seed=0) in ([[1, 2], [3]], [[2, 1], [3]], [[1, 3], [2]], [[3, 1], [2]],
                                                    [[2, 3], [1]], [[3, 2], [1]])
