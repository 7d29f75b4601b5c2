"""Rows and the collator: best-fit decreasing, padded and packed batches, image order."""

import datasets
import pytest
import torch
from PIL import Image

from qllava.data import FEATURES, ImageStore
from qllava.packing import (
    REAL_TOKENS,
    Collator,
    Rows,
    SimilarLengthSampler,
    TokenCounts,
    best_fit_decreasing,
    pad_fraction,
    padded_batches,
)

IMAGE_ID = 99


def samples(lengths, image_every=0, image_tokens=3):
    """Samples as the cache holds them: an image sample has one placeholder (IMAGE_ID) and its token count."""
    rows = {name: [] for name in FEATURES}
    for i, n in enumerate(lengths):
        has_image = bool(image_every) and i % image_every == 0
        ids = [1] + ([IMAGE_ID] if has_image else []) + [10 + i] * (n - 1 - (image_tokens if has_image else 0))
        rows["id"].append(str(i))
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * (2 if has_image else 1) + ids[2 if has_image else 1 :])
        rows["length"].append(n)
        rows["source"].append(0)
        rows["image"].append(f"{i}.png" if has_image else "")
        rows["image_tokens"].append([image_tokens] if has_image else [])
        rows["image_file"].append("")
        rows["image_stamp"].append(0)
    return datasets.Dataset.from_dict(rows, features=FEATURES)


class FakeImages(ImageStore):
    def __init__(self):
        super().__init__([""])

    def open(self, source, image):
        shade = int(image.split(".")[0]) * 10
        return Image.new("RGB", (4, 4), (shade, shade, shade))


class FakeProcessor:
    image_mean = [0.5, 0.5, 0.5]

    def __call__(self, images, return_tensors):
        return {
            "pixel_values": torch.stack(
                [torch.tensor(img.getpixel((0, 0))[0]).float().expand(3, 4, 4) for img in images]
            )
        }


def collator(rows, flatten=False):
    return Collator(FakeImages(), FakeProcessor(), "crop", 0, IMAGE_ID, packing=rows.packing, flatten=flatten)


def test_best_fit_decreasing_fills_rows_without_overflow():
    lengths = [7, 5, 5, 4, 3, 3, 2, 1]
    rows = best_fit_decreasing(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 30 tokens in rows of 10: optimal


def test_unpacked_batch_is_right_padded_with_an_attention_mask():
    rows = Rows(samples([3, 5]), max_seq_len=8, packing=False, seed=0)
    batch = collator(rows).batch([rows[0], rows[1]])
    assert batch["input_ids"].tolist() == [[1, 10, 10, 0, 0], [1, 11, 11, 11, 11]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 10, 10, -100, -100], [-100, 11, 11, 11, 11]]
    assert "position_ids" not in batch and "pixel_values" not in batch


def test_packed_rows_restart_positions_and_mask_each_first_label():
    rows = Rows(samples([3, 2, 4], image_every=2), max_seq_len=6, packing=True, seed=0)
    assert sorted(len(r) for r in rows.rows) == [1, 2]
    packed_row = next(i for i, r in enumerate(rows.rows) if len(r) == 2)
    batch = collator(rows).batch([rows[packed_row]])
    first, second = rows.rows[packed_row]
    n1 = rows.lengths[first]
    assert "attention_mask" not in batch
    assert batch["position_ids"][0].tolist()[:6] == list(range(n1)) + list(range(6 - n1))
    assert batch["labels"][0, 0] == -100 and batch["labels"][0, n1] == -100
    shades = [int(v) for v in batch["pixel_values"][:, 0, 0, 0]]
    assert shades == [10 * i for i in rows.rows[packed_row] if i % 2 == 0]  # images in token order


def test_the_collator_widens_each_placeholder_to_its_images_stored_token_count():
    """The cache holds one placeholder per image and, per image, its token count (issue 13 makes counts vary)."""
    data = datasets.concatenate_datasets(
        [samples([6], image_every=1, image_tokens=3), samples([4]), samples([9], image_every=1, image_tokens=5)]
    )
    rows = Rows(data, max_seq_len=20, packing=False, seed=0)
    batch = collator(rows)([rows[0], rows[1], rows[2]])
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids[0].tolist() == [1, IMAGE_ID, IMAGE_ID, IMAGE_ID, 10, 10, 0, 0, 0]  # BOS, 3 image tokens, 2 text
    assert ids[2].tolist() == [1] + [IMAGE_ID] * 5 + [10, 10, 10]
    assert (labels[ids == IMAGE_ID] == -100).all() and labels[2, -3:].tolist() == [10, 10, 10]
    assert int(batch[REAL_TOKENS]) == 6 + 4 + 9 == int(batch["attention_mask"].sum())


def test_token_counts_come_from_the_batches():
    rows = Rows(samples([3, 5]), max_seq_len=8, packing=False, seed=0)
    counts = TokenCounts()
    counts.add(collator(rows)([rows[0], rows[1]]))
    assert (counts.tokens, counts.label_tokens, counts.slots) == (8, 6, 10) and counts.pad_fraction == pytest.approx(
        0.2
    )


def test_rows_are_redrawn_per_epoch_with_the_same_shape():
    rows = Rows(samples([4] * 12 + [3] * 6), max_seq_len=12, packing=True, seed=0)
    first = [list(r) for r in rows.rows]
    rows.set_epoch(1)
    assert rows.rows != first
    assert sorted(sum(rows.lengths[i] for i in r) for r in rows.rows) == sorted(
        sum(rows.lengths[i] for i in r) for r in first
    )


def test_flash_attention_batches_are_one_row_without_padding():
    rows = Rows(samples([3, 5, 4, 2]), max_seq_len=8, packing=True, seed=0)
    batch = collator(rows, flatten=True)([rows[i] for i in range(len(rows))])
    assert batch["input_ids"].shape == (1, 14) and "attention_mask" not in batch
    assert (batch["position_ids"][0] == 0).sum() == 4 and int(batch[REAL_TOKENS]) == 14


def test_similar_length_sampler_keeps_batches_aligned_and_similar():
    lengths = [500, 120, 480, 130, 510, 125, 470, 140, 490, 135, 505]
    sampler = SimilarLengthSampler(lengths, batch_size=2, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(11))
    batches = [order[i : i + 2] for i in range(0, 11, 2)]
    assert len(batches[-1]) == 1  # only the last batch is short, so the loader's cuts match ours
    assert pad_fraction([[lengths[i] for i in b] for b in batches]) < 0.05
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_padded_pad_fraction():
    assert pad_fraction([[10, 5], [4, 4]]) == pytest.approx(1 - 23 / 28)
    assert padded_batches([1, 2, 3], 2, seed=0) in (
        [[1, 2], [3]],
        [[2, 1], [3]],
        [[1, 3], [2]],
        [[3, 1], [2]],
        [[2, 3], [1]],
        [[3, 2], [1]],
    )
