"""Packed rows are exact: a packed row equals its samples run alone, and packed loss and gradients equal the
unpacked batch's token-weighted ones. Through LlavaForConditionalGeneration, in float32, with images in
several samples of a row and a text-only sample among them."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from qllava import model as modeling
from qllava.data import DataReport, ImageStore, image_source, read_conversations, tokenize_dataset
from qllava.packing import Collator, packed_vs_unpacked_error


@pytest.fixture(scope="module")
def setup(tiny_inputs, tmp_path_factory):
    from conftest import TINY_RECIPE, tiny_overrides

    from qllava.recipe import load_recipe

    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_inputs, tmp_path_factory.mktemp("exact")))
    processor = modeling.build_processor(recipe.model)
    return recipe, processor, samples(recipe, processor)


def samples(recipe, processor, images: int = 3) -> list[dict]:
    """`images` image conversations (1-3 turns) and one text-only one from the tiny dataset, tokenized for
    training."""
    stage = recipe.stage2
    where = image_source(stage.data[0], stage.image_folder)
    convs = read_conversations(stage.data[0], where, 0, DataReport())
    chosen = [c for c in convs if c.image][:images] + [next(c for c in convs if not c.image)]
    tok = processor.tokenizer
    config = modeling.load_llava_config(recipe.model)
    ds = tokenize_dataset(
        chosen,
        stage.template,
        tok,
        tok.convert_tokens_to_ids("<image>"),
        modeling.image_geometry(config, processor.image_processor),
        stage.max_seq_len,
        DataReport(),
    )
    return [ds[i] for i in range(len(ds))]


def collator_for(processor, recipe, packing: bool, flatten: bool = False) -> Collator:
    where = image_source(recipe.stage2.data[0], recipe.stage2.image_folder)
    return Collator(
        ImageStore([where]),
        processor.image_processor,
        "pad",
        processor.tokenizer.pad_token_id,
        processor.tokenizer.convert_tokens_to_ids("<image>"),
        packing=packing,
        flatten=flatten,
    )


def fp32_model(recipe, processor, attn: str):
    recipe.model.attn_implementation = attn
    return modeling.load_base_model(recipe, processor, quantized=False).eval()


def stage2_model(recipe, processor, attn: str):
    """The float32 model as stage 2 trains it, in train mode: LoRA (given a real path: B starts at zero) and the
    projector trainable."""
    model = modeling.attach_lora(fp32_model(recipe, processor, attn), recipe.lora)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.05)
    modeling.projector(model).requires_grad_(True)
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    return model.train()


def alone_logits(model, collator, sample) -> torch.Tensor:
    batch = collator.batch([[sample]])
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch, use_cache=False).logits[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_row_equals_its_samples_run_alone(setup, attn):
    recipe, processor, items = setup
    model = fp32_model(recipe, processor, attn)
    packed, unpacked = collator_for(processor, recipe, True), collator_for(processor, recipe, False)
    batch = packed.batch([items[:2], items[2:]])  # two rows, the second holding the text-only sample; padded
    assert "attention_mask" not in batch and batch["pixel_values"].shape[0] == 3
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    worst = 0.0
    for r, row in enumerate([items[:2], items[2:]]):
        at = 0
        for sample in row:
            n = sample["length"]
            worst = max(worst, (logits[r, at : at + n] - alone_logits(model, unpacked, sample)).abs().max().item())
            at += n
    assert worst <= 1e-5, f"packed vs alone max abs logit diff {worst:.2e}"
    assert (labels != -100).sum() > 0


def test_packed_loss_and_gradients_equal_the_unpacked_token_weighted_ones(setup):
    """Two packed micro-batches (gradient accumulation) against one padded batch of the same four samples:
    the loss is the mean over all label tokens of the step, as the trainer computes it (num_items_in_batch)."""
    recipe, processor, items = setup
    model = stage2_model(recipe, processor, "sdpa")
    micro_batches = [[[items[0], items[3]]], [[items[1]], [items[2]]]]  # step = 2 micro-batches, 3 rows
    err = packed_vs_unpacked_error(
        model, collator_for(processor, recipe, True), collator_for(processor, recipe, False), micro_batches
    )
    assert err <= 1e-5, f"packed vs unpacked worst relative error (loss and gradients) {err:.2e}"


def test_isolation_breaks_if_a_mask_or_cache_creeps_back(setup):
    """The guard: the exactness above depends on no attention mask and no cache. Both break it, loudly here."""
    recipe, processor, items = setup
    model = fp32_model(recipe, processor, "sdpa")
    batch = collator_for(processor, recipe, True).batch([items[:2]])
    batch.pop("labels")
    n = items[0]["length"]
    second = alone_logits(model, collator_for(processor, recipe, False), items[1])
    with torch.no_grad():
        exact = model(**batch, use_cache=False).logits[0, n:]
        masked = model(**batch, attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits[0, n:]
        cached = model(**batch, use_cache=True).logits[0, n:]
    assert (exact - second).abs().max() <= 1e-5
    assert (masked - second).abs().max() > 1e-3
    assert (cached - second).abs().max() > 1e-3


def test_training_feeds_the_decoder_packed_rows_without_mask_or_cache(tiny_recipe, monkeypatch):
    """Every decoder call of a real packed training run gets position_ids restarting per sample, no attention
    mask and use_cache=False: the conditions under which transformers isolates packed samples."""
    from qllava import train

    calls = []
    load = modeling.load_base_model

    def load_and_watch(*args, **kwargs):
        model = load(*args, **kwargs)

        def watch(module, args, kwargs):
            calls.append(
                (kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs.get("use_cache"), kwargs.get("cache"))
            )

        model.model.language_model.register_forward_pre_hook(watch, with_kwargs=True)
        return model

    monkeypatch.setattr(modeling, "load_base_model", load_and_watch)
    train.run_stage(tiny_recipe("stage1.max_steps=3", "stage1.per_device_train_batch_size=2"), "stage1")
    assert len(calls) == 3
    for mask, positions, use_cache, cache in calls:
        assert mask is None and use_cache is False and cache is None
        restarts = (positions == 0).sum(dim=1)
        assert positions.shape[0] == 2 and (restarts > 1).all()


def test_packing_benchmark_compares_like_with_like():
    """benchmarks/packing.py, small: both runs train on the same label tokens in the same precision, and its
    own exactness check holds on its model and data."""
    done = subprocess.run(
        [sys.executable, "benchmarks/packing.py", "--samples", "40", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["precision"] == "float32" and "precision in both runs: float32" in done.stdout
    label_tokens = {
        m[1]: int(m[2].replace(",", ""))
        for m in re.finditer(r"repeat 1 (trl|qllava)\s*:.*label tokens ([\d,]+)", done.stdout)
    }
    assert label_tokens["trl"] == label_tokens["qllava"] > 0
    assert result["packed_vs_unpacked_max_rel_err"] <= 1e-5
    assert result["qllava_pad_fraction"] < 0.1 < 0.3 < result["trl_pad_fraction"]
    assert result["speedup"] > 0 and result["trl_tokens_per_s"] > 0 and result["qllava_tokens_per_s"] > 0
