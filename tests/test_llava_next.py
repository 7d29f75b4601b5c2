"""LLaVA-NeXT (anyres): an image's token count from its size equals transformers' LlavaNextProcessor and what
LlavaNextForConditionalGeneration consumes; packed rows of images of different aspect ratios are exact; a tiny
LLaVA-NeXT run trains, merges into a LlavaNextForConditionalGeneration that transformers' pipeline runs, and
chats; the 7B recipe plans offline."""

import json
import random
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, next_recipe
from PIL import Image

from qllava import model as modeling
from qllava import tiny
from qllava.data import DataReport, ImageStore, image_source, read_conversations, tokenize_dataset
from qllava.packing import Collator, packed_vs_unpacked_error
from qllava.recipe import load_recipe
from qllava.templates import render

V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def test_tokens_per_image_equal_llava_next_processor_on_many_sizes():
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=V16_PINPOINTS
    )
    tokenizer = tiny.build_tokenizer(["what"])
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    config = modeling.load_llava_config(load_recipe(ROOT / "recipes" / "llava_next_mistral_qlora.toml").model)
    geometry = modeling.image_geometry(config, image_processor)
    rng = random.Random(0)
    sizes = [(640, 480), (480, 640), (336, 336), (1, 1), (2000, 90), (90, 2000), (1008, 336), (337, 673)]
    sizes += [(rng.randint(8, 1600), rng.randint(8, 1600)) for _ in range(40)]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for width, height in sizes:
        ids = processor(text="<image>", images=[Image.new("RGB", (width, height))], return_tensors="pt")["input_ids"]
        assert geometry.tokens_of((width, height)) == int((ids == image_id).sum()), (width, height)
    assert geometry.tokens_of() == 2928 and geometry.tiles_of() == 5


@pytest.fixture(scope="module")
def setup(next_inputs, tmp_path_factory):
    recipe = next_recipe(next_inputs, tmp_path_factory.mktemp("next_exact") / "run")
    processor = modeling.build_processor(recipe.model)
    return recipe, processor, samples(recipe, processor)


def samples(recipe, processor) -> list[dict]:
    """Three image conversations of different aspect ratios and a text-only one, tokenized for training."""
    stage = recipe.stage2
    convs = read_conversations(stage.data[0], image_source(stage.data[0], stage.image_folder), 0, DataReport())
    sizes = {}
    chosen = []
    for conv in convs:  # images of three different aspect ratios, and one text-only conversation
        if conv.image and conv.image_size not in sizes and len(sizes) < 3:
            sizes[conv.image_size] = conv
            chosen.append(conv)
    chosen.append(next(c for c in convs if not c.image))
    config = modeling.load_llava_config(recipe.model)
    tok = processor.tokenizer
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


def collator(recipe, processor, packing, flatten=False):
    where = image_source(recipe.stage2.data[0], recipe.stage2.image_folder)
    return Collator(
        ImageStore([where]),
        processor.image_processor,
        "anyres",
        processor.tokenizer.pad_token_id,
        processor.tokenizer.convert_tokens_to_ids("<image>"),
        packing=packing,
        flatten=flatten,
    )


def test_images_of_different_sizes_take_different_token_counts_and_the_model_accepts_them(setup):
    recipe, processor, items = setup
    counts = [s["image_tokens"][0] for s in items if s["image"]]
    assert len(set(counts)) > 1  # anyres: the count follows the aspect ratio
    model = modeling.load_base_model(recipe, processor, quantized=False).eval()
    batch = collator(recipe, processor, True).batch([items])
    assert batch["image_sizes"].shape == (3, 2)
    with torch.no_grad():
        assert model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.shape[1] == sum(
            s["length"] for s in items
        )


def stage2_model(recipe, processor):
    """The float32 LLaVA-NeXT model as stage 2 trains it, in train mode: LoRA given a real path (B starts at zero),
    the projector and image_newline trainable."""
    model = modeling.attach_lora(modeling.load_base_model(recipe, processor, quantized=False), recipe.lora)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.05)
    for p in modeling.projector_parameters(model).values():
        p.requires_grad_(True)
    assert "image_newline" in modeling.projector_parameters(model)
    return model.train()


def test_packed_llava_next_rows_equal_their_samples_alone_in_loss_and_gradients(setup):
    recipe, processor, items = setup
    model = stage2_model(recipe, processor)
    micro_batches = [[[items[0], items[3]]], [[items[1]], [items[2]]]]
    err = packed_vs_unpacked_error(
        model, collator(recipe, processor, True), collator(recipe, processor, False), micro_batches
    )
    assert err <= 1e-5, f"packed vs unpacked worst relative error (loss and gradients) {err:.2e}"


def test_the_v1_6_mistral_prompt_is_llava_hfs():
    # llava-hf/llava-v1.6-mistral-7b-hf's own prompt (its model card; its chat template renders the same):
    # LLaVA's mistral_instruct with the tokenizer's BOS before it.
    asked = render(
        "mistral_instruct", [("user", "<image>\nWhat is shown in this image?")], "<s>", "</s>", generation_prompt=True
    )
    assert asked.text == "[INST] <image>\nWhat is shown in this image? [/INST]"


def test_a_tiny_llava_next_run_trains_merges_and_runs_in_transformers_pipeline(next_inputs, tmp_path):
    from qllava import train
    from qllava.chat import Chat
    from qllava.merge import merge

    run = tmp_path / "run"
    recipe = next_recipe(
        next_inputs, run, "stage1.max_steps=3", "stage2.max_steps=6", "eval.limit=12", 'eval.at=["stage2"]'
    )
    metrics = train.finetune(recipe, say=lambda _: None)
    assert metrics["stage2"]["steps"] == 6 and 0 <= metrics["accuracy_stage2"] <= 1
    state = json.loads((run / "stage2" / "adapter_config.json").read_text())
    assert state["peft_type"] == "LORA"
    image = next_inputs / "shapes" / "images" / "eval-0.png"
    answer = Chat(run, image).reply("What color is the shape?", max_new_tokens=4)
    report = merge(run, tmp_path / "merged", dtype="float32", say=lambda _: None)
    assert report["max_abs_diff_vs_unmerged"] <= report["tolerance"]
    script = (
        "import json, sys\n"
        "from transformers import pipeline\n"
        "from PIL import Image\n"
        f"pipe = pipeline('image-text-to-text', model={str(tmp_path / 'merged')!r})\n"
        f"image = Image.open({str(image)!r})\n"
        "out = pipe(text=[{'role': 'user', 'content': [{'type': 'image', 'image': image}, "
        "{'type': 'text', 'text': 'What color is the shape?'}]}], max_new_tokens=4, return_full_text=False)\n"
        "print(json.dumps({'model': type(pipe.model).__name__, 'text': out[0]['generated_text']}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["model"] == "LlavaNextForConditionalGeneration"
    # greedy answers of the 4-bit run and the float32 merged model agree here (deterministic, tiny answers)
    assert Chat(tmp_path / "merged", image).reply("What color is the shape?", max_new_tokens=4) == answer
    from qllava.evaluate import evaluate

    shapes = next_inputs / "shapes"
    result = evaluate(
        tmp_path / "merged",
        "vqa",
        str(shapes / "eval.json"),
        str(shapes / "images"),
        out=tmp_path / "answers.jsonl",
        limit=6,
        max_new_tokens=4,
    )
    assert result["questions"] == 6 and result["asked_now"] == 6 and 0 <= result["metrics"]["accuracy"] <= 1


def test_the_7b_llava_next_recipe_plans_offline():
    done = subprocess.run(
        [sys.executable, "-m", "qllava", "plan", "recipes/llava_next_mistral_qlora.toml", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    stage2 = plan["stages"]["stage2"]
    assert stage2["largest_image_tokens"] == 2928 and stage2["largest_image_fits"]
    assert plan["projector_params"] == 20_979_712 + 4096  # the MLP and image_newline
    assert stage2["fits"]
