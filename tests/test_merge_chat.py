"""qllava merge (merged == base + adapter, loads without qllava) and qllava chat (run and merged folders)."""

import json
import shutil
import subprocess
import sys

import pytest

from qllava.chat import Chat
from qllava.cli import main
from qllava.vision import VisionError
from qllava.merge import merge


@pytest.fixture(scope="module")
def merged_fp32(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "fp32"
    return out, merge(trained_run, out, dtype="float32", say=lambda _: None)


def test_merged_equals_base_plus_adapter_in_float32(merged_fp32):
    out, report = merged_fp32
    assert report["max_abs_diff_vs_unmerged"] < 1e-4 and report["max_ulps_vs_float32_merge"] == 0.0
    assert report["max_abs_diff_vs_4bit_training_model"] > report["max_abs_diff_vs_unmerged"]  # NF4 is lossy
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "processor_config.json",
                                               "tokenizer.json", "chat_template.jinja", "generation_config.json",
                                               "README.md", "qllava.json", "merge_report.json"}
    assert json.loads((out / "qllava.json").read_text())["template"] == "mistral_instruct"
    assert "## Use" in (out / "README.md").read_text() and report["peak_ram_gib"] > 0 and report["output_bytes"] > 0


def test_a_bfloat16_merge_stores_the_float32_merge_rounded(trained_run, tmp_path):
    report = merge(trained_run, tmp_path / "bf16", dtype="bfloat16", say=lambda _: None)
    assert report["merged_weights_checked"] == 14 and report["max_ulps_vs_float32_merge"] == 0.0
    assert report["max_abs_diff_vs_unmerged"] > 0 and "tolerance" not in report  # logits: for information


LOAD_WITHOUT_QLLAVA = """
import sys, json
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
path, image = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(path)
processor = AutoProcessor.from_pretrained(path)
pipe = pipeline("image-text-to-text", model=model, processor=processor)
messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image)},
                                         {"type": "text", "text": "What color is the shape?"}]}]
out = pipe(text=messages, max_new_tokens=4, return_full_text=False)
assert not any(m.startswith("qllava") for m in sys.modules)
print(json.dumps({"model": type(model).__name__, "text": out[0]["generated_text"]}))
"""


def test_merged_folder_runs_in_a_transformers_pipeline_without_qllava(merged_fp32, tiny_inputs):
    out, _ = merged_fp32
    image = tiny_inputs / "shapes" / "images" / "eval-0.png"
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_QLLAVA, str(out), str(image)], capture_output=True,
                            text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["model"] == "LlavaForConditionalGeneration" and isinstance(answer["text"], str)


def test_chat_template_of_the_merged_folder_renders_the_training_template(merged_fp32):
    from transformers import AutoProcessor
    from qllava import templates
    out, _ = merged_fp32
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
                {"role": "assistant", "content": "red"}, {"role": "user", "content": "And the shape?"}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    turns = [("user", "<image>\nWhat color?"), ("assistant", "red"), ("user", "And the shape?")]
    assert text == "<s>" + templates.render("mistral_instruct", turns, "<s>", "</s>", generation_prompt=True).text


def test_a_stage1_only_run_merges(trained_run, tmp_path):
    stage1_run = tmp_path / "stage1_run"
    shutil.copytree(trained_run / "stage1", stage1_run / "stage1")
    report = merge(stage1_run, tmp_path / "out", dtype="float32", say=lambda _: None)
    assert report["stage"] == "stage1" and report["max_abs_diff_vs_unmerged"] == 0.0


def test_merge_refusals(trained_run, merged_fp32, tmp_path, capsys):
    out, _ = merged_fp32
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "is not a qllava run folder: no complete stage1/ or stage2/" in capsys.readouterr().out
    before = (out / "model.safetensors").read_bytes()
    assert main(["merge", str(trained_run), "--out", str(out)]) == 2
    assert "already exists: pass --overwrite to replace it" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == before
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    recipe = broken / "stage2" / "recipe.toml"
    recipe.write_text(recipe.read_text().replace('decoder = "', f'decoder = "{tmp_path}/missing'))
    assert main(["merge", str(broken), "--out", str(tmp_path / "y"), "--no-verify"]) == 2
    said = capsys.readouterr().out
    assert "the run's base model (" in said and "missing" in said and "cannot be loaded" in said
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("kind", ["run", "merged"])
def test_chat_on_run_and_merged_folders(kind, trained_run, merged_fp32, tiny_inputs):
    path = trained_run if kind == "run" else merged_fp32[0]
    chat = Chat(path, tiny_inputs / "shapes" / "images" / "eval-0.png")
    assert chat.loaded.kind == kind and chat.loaded.template == "mistral_instruct"
    first = chat.reply("What color is the shape?", max_new_tokens=4)
    second = chat.reply("What shape is in the image?", max_new_tokens=4)
    assert isinstance(first, str) and isinstance(second, str)
    assert [role for role, _ in chat.turns] == ["user", "assistant", "user", "assistant"]
    assert chat.turns[0][1].startswith("<image>\n") and not chat.turns[2][1].startswith("<image>")


def test_chat_refuses_a_missing_or_unreadable_image(trained_run, tmp_path):
    with pytest.raises(VisionError, match="nope.png: file not found"):
        Chat(trained_run, tmp_path / "nope.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(VisionError, match="bad.png: cannot be read as an image"):
        Chat(trained_run, tmp_path / "bad.png")


def test_chat_cli_answers_one_prompt(trained_run, tiny_inputs, capsys):
    assert main(["chat", str(trained_run), "--image", str(tiny_inputs / "shapes" / "images" / "eval-0.png"),
                 "--prompt", "What color is the shape?", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_stage2_continues_from_a_llava_hf_checkpoint_in_4bit(merged_fp32, tiny_inputs, tmp_path):
    """Model source (b): an existing llava-hf checkpoint (here the merged run), loaded whole in 4-bit with the
    vision tower, projector and lm_head kept out of quantization, its own projector as stage 2's start."""
    import bitsandbytes as bnb
    import torch
    from conftest import TINY_RECIPE, tiny_overrides
    from qllava import train
    from qllava.recipe import load_recipe
    out, _ = merged_fp32
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_inputs, tmp_path / "run") + [
        f'model.llava="{out}"', 'stage2.projector="model"', "eval.at=[]", "stage2.max_steps=4",
        "lora.modules_to_save=[]"])
    result = train.run_stage(recipe, "stage2", say=lambda _: None)
    base = result.model.get_base_model()
    quantized = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14 and all(".language_model." in n for n in quantized)
    assert not isinstance(base.model.multi_modal_projector.linear_1, bnb.nn.Linear4bit)
    assert isinstance(base.lm_head, torch.nn.Linear) and not isinstance(base.lm_head, bnb.nn.Linear4bit)
    assert result.metrics["steps"] == 4 and (tmp_path / "run" / "stage2" / "adapter_model.safetensors").exists()
    # stage 1 on the same checkpoint: only its projector trains, on the frozen 4-bit base
    stage1 = train.run_stage(load_recipe(TINY_RECIPE, tiny_overrides(tiny_inputs, tmp_path / "run1") + [
        f'model.llava="{out}"', "eval.at=[]", "stage1.max_steps=2"]), "stage1", say=lambda _: None)
    assert stage1.metrics["steps"] == 2 and stage1.metrics["trainable_params"] == 64 * 128 + 64 + 64 * 64 + 64
