"""Real pretrained weights: SmolLM2-135M-Instruct (30 layers, tied embeddings, a tokenizer that adds no BOS) with a
tiny SigLIP tower, through the 7B recipes' path: stage 2 with LoRA + projector only, the default bfloat16 merge and
its check at real depth, the merged folder served by transformers exactly as it was trained, and plan's counts.
Then every tower family through a short stage 2 and a float32 merge with a tiny decoder."""

import json
import subprocess
import sys

import peft
import pytest
from conftest import SMOLLM2_STEPS as STEPS
from conftest import smollm2_recipe, stage2_recipe
from safetensors import safe_open

from qllava import inference, plan, templates, tiny, train, vision
from qllava import model as modeling
from qllava.chat import Chat
from qllava.data import expand_images, tokenize_conversation
from qllava.merge import MergeError, merge
from qllava.tokenizer import adds_bos

# LoRA r8 on q,k,v,o,gate,up,down of SmolLM2's 30 layers (hidden 576, 3 KV heads of 64, MLP 1536) and the
# projector 128 -> 576 -> 576: nothing else trains (no modules_to_save, as in the 7B recipes).
SMOLLM2_LORA = 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
SMOLLM2_PROJECTOR = 128 * 576 + 576 + 576 * 576 + 576
SMOLLM2_PARAMS = 134_515_008  # SmolLM2-135M-Instruct as published, its tied embeddings counted once


@pytest.fixture(scope="module")
def smollm2_merged(smollm2_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2_merged") / "merged"
    return out, merge(smollm2_run[0], out, say=lambda _: None)  # qllava merge's default dtype: bfloat16


def test_stage2_on_the_real_decoder_trains_lora_and_the_projector_only(smollm2_run):
    _, metrics = smollm2_run
    assert metrics["steps"] == STEPS and metrics["trainable_params"] == SMOLLM2_LORA + SMOLLM2_PROJECTOR
    assert metrics["final_loss"] < metrics["first_loss"] / 2


def test_a_correct_bfloat16_merge_of_the_real_decoder_passes_its_check(smollm2_merged):
    out, report = smollm2_merged
    # every one of the 210 adapted weights is exactly base + adapter computed in float32, rounded to bfloat16 ...
    assert report["dtype"] == "bfloat16" and report["merged_weights_checked"] == 30 * 7
    assert report["max_ulps_vs_float32_merge"] == 0.0
    # ... while that rounding moves the logits further than the old check allowed (2% of the logit scale, ~33 here)
    assert 0 < report["adapter_change_rounding_error"] < 1 and report["max_abs_diff_vs_unmerged"] > 0.02 * 33
    assert "tolerance" not in report
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["text_config"]["num_hidden_layers"] == 30
    with safe_open(out / "model.safetensors", "pt") as f:  # tied: the head is the embedding, stored once
        assert "lm_head.weight" not in f.keys()


def skip_merge(original):
    def merge(self, *args, **kwargs):  # marks the layer merged, adds nothing
        self.merged_adapters.extend(self.active_adapters)

    return merge


def merge_twice(original):
    def merge(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.merged_adapters.clear()
        original(self, *args, **kwargs)

    return merge


@pytest.mark.parametrize("wrong", [skip_merge, merge_twice])
def test_the_bfloat16_merge_check_refuses_a_merge_that_loses_or_doubles_the_adapter(
    wrong, smollm2_run, tmp_path, monkeypatch
):
    linear = peft.tuners.lora.layer.Linear
    monkeypatch.setattr(linear, "merge", wrong(linear.merge))
    refusal = (
        r"merged weight model\.language_model\.layers\.\d+\.\S+\.weight is \S+ units in the last place "
        r"of bfloat16 away from base \+ adapter computed in float32"
    )
    with pytest.raises(MergeError, match=refusal):
        merge(smollm2_run[0], tmp_path / "out", say=lambda _: None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


SERVE = """
import sys, json
from PIL import Image
from transformers import AutoProcessor, pipeline
path, image, question, answer = sys.argv[1:]
processor = AutoProcessor.from_pretrained(path)
asked = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
answered = asked + [{"role": "assistant", "content": answer}]
out = {"prompt": processor.apply_chat_template(asked, add_generation_prompt=True),
       "conversation": processor.apply_chat_template(answered)}
for key in ("prompt", "conversation"):
    out[key + "_ids"] = processor(text=out[key], images=[Image.open(image)])["input_ids"][0]
pipe = pipeline("image-text-to-text", model=path)
asked[0]["content"][0]["image"] = Image.open(image)
out["answer"] = pipe(text=asked, max_new_tokens=5, return_full_text=False)[0]["generated_text"]
assert not any(m.startswith("qllava") for m in sys.modules)
print(json.dumps(out))
"""


def test_the_merged_real_model_is_served_by_transformers_as_it_was_trained(smollm2_merged, tiny_inputs, tmp_path):
    out, _ = smollm2_merged
    loaded = inference.load_for_inference(out)
    tokenizer, image_processor = loaded.processor.tokenizer, loaded.processor.image_processor
    # a square image: transformers' processor does not pad to a square as training did, so give it one that is
    image = tmp_path / "square.png"
    vision.prepared(vision.open_image(tiny_inputs / "shapes" / "images" / "eval-0.png"), image_processor, "pad").save(
        image
    )
    question, answer = "What color is the shape?", "red"
    served = subprocess.run(
        [sys.executable, "-c", SERVE, str(out), str(image), question, answer],
        text=True,
        capture_output=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert served.returncode == 0, served.stderr[-3000:]
    served = json.loads(served.stdout.strip().splitlines()[-1])

    # the chat template renders the training text exactly, without the bos_token SmolLM2's tokenizer never adds
    turns = [("user", "<image>\n" + question), ("assistant", answer)]
    assert not adds_bos(tokenizer)
    assert served["conversation"] == templates.render("vicuna_v1", turns, "<|im_start|>", "<|im_end|>").text
    assert (
        served["prompt"]
        == templates.render("vicuna_v1", turns[:1], "<|im_start|>", "<|im_end|>", generation_prompt=True).text
    )
    assert not served["prompt"].startswith("<|im_start|>")
    # and transformers' processor tokenizes it into the ids training trained on, 16 image tokens included
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    trained_ids, _ = tokenize_conversation(turns, "vicuna_v1", tokenizer, image_token_id)
    assert served["conversation_ids"] == expand_images(trained_ids, image_token_id, [16]).tolist()
    assert served["prompt_ids"] == inference.prompt_ids(loaded, turns[:1], [vision.open_image(image)])
    # the pipeline answers what qllava's own generation answers
    assert served["answer"].strip() == Chat(out, image).reply(question, max_new_tokens=5)


def test_plan_counts_the_real_decoder_as_the_model_it_builds(tiny_inputs, smollm2_dir, siglip_dir, tmp_path):
    recipe = smollm2_recipe(tiny_inputs, smollm2_dir, siglip_dir, tmp_path / "run")
    counts = plan.count_parameters(recipe)
    model = modeling.load_base_model(recipe, modeling.build_processor(recipe.model), quantized=False)
    unique = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    assert (
        counts.vision_tower + counts.projector + counts.decoder_linear + counts.embeddings + counts.decoder_other
        == unique
    )
    assert counts.embeddings == 49216 * 576  # 49,152 + the image token, grown to a multiple of 64; tied: once
    assert unique - counts.vision_tower - counts.projector - 64 * 576 == SMOLLM2_PARAMS
    assert counts.lora == SMOLLM2_LORA and counts.projector == SMOLLM2_PROJECTOR


# A tiny decoder: LoRA r8 on its 2 layers (hidden 64, 2 KV heads of 16, MLP 128) + the projector 128 -> 64 -> 64.
TINY_TRAINABLE = 2 * 8 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128)) + 128 * 64 + 64 + 64 * 64 + 64


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2"])
def test_every_tower_family_trains_and_merges(family, tiny_inputs, tmp_path):
    tower = tmp_path / family
    tiny.write_vision_tower(tower, seed=0, family=family)
    strategy = "full" if family == "siglip" else "default"
    recipe = stage2_recipe(
        tiny_inputs,
        tiny_inputs / "mistral",
        tower,
        tmp_path / "run",
        "stage2.max_steps=2",
        f'model.vision_feature_select_strategy="{strategy}"',
    )
    metrics = train.finetune(recipe, stages=("stage2",), say=lambda _: None)["stage2"]
    assert metrics["steps"] == 2 and metrics["trainable_params"] == TINY_TRAINABLE
    report = merge(tmp_path / "run", tmp_path / "merged", dtype="float32", say=lambda _: None)
    assert report["merged_weights_checked"] == 14 and report["max_ulps_vs_float32_merge"] == 0.0
    assert report["max_abs_diff_vs_unmerged"] <= report["tolerance"]
    loaded = inference.load_for_inference(tmp_path / "merged")
    assert type(loaded.model.model.vision_tower) is vision.tower_class(tiny.VISION_FAMILIES[family]({}))
    assert loaded.geometry.tokens_of() == 16
