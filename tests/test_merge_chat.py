"""qllava merge (merged == base + adapter, loads without qllava) and qllava chat (run and merged folders)."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from qllava import merge as merging
from qllava.chat import Chat
from qllava.cli import main
from qllava.merge import MergeError, merge
from qllava.vision import VisionError


@pytest.fixture(scope="module")
def merged_fp32(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "fp32"
    return out, merge(trained_run, out, dtype="float32", say=lambda _: None)


def test_merged_equals_base_plus_adapter_in_float32(merged_fp32):
    out, report = merged_fp32
    assert report["max_abs_diff_vs_unmerged"] < 1e-4 and report["max_ulps_vs_float32_merge"] == 0.0
    assert report["max_abs_diff_vs_4bit_training_model"] > report["max_abs_diff_vs_unmerged"]  # NF4 is lossy
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        "README.md",
        "qllava.json",
        "merge_report.json",
    }
    assert json.loads((out / "qllava.json").read_text())["template"] == "mistral_instruct"
    assert "## Use" in (out / "README.md").read_text() and report["peak_ram_gib"] > 0 and report["output_bytes"] > 0


def test_a_bfloat16_merge_stores_the_float32_merge_rounded(trained_run, tmp_path):
    report = merge(trained_run, tmp_path / "bf16", dtype="bfloat16", say=lambda _: None)
    assert report["merged_weights_checked"] == 14 and report["max_ulps_vs_float32_merge"] == 0.0
    assert report["max_abs_diff_vs_unmerged"] > 0 and "tolerance" not in report  # logits: for information


def merged_in_memory(run, dtype: str, folder):
    """How qllava merged before it streamed: the whole model in memory, peft's merge_and_unload, save_pretrained."""
    from qllava import model as modeling

    model = modeling.load_run(run, quantized=False, dtype=dtype)[0].merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(folder, max_shard_size="1MB")


def weights(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        with safe_open(folder / shard, "pt") as f:
            tensors.update({(shard, k): f.get_tensor(k) for k in f.keys()})
    return index, tensors


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_streamed_merge_writes_what_merging_the_whole_model_in_memory_wrote(
    dtype, trained_run, tmp_path, monkeypatch
):
    monkeypatch.setattr(merging, "SHARD_SIZE", "1MB")  # several shards, as a 7B merge writes
    report = merge(trained_run, tmp_path / "streamed", dtype=dtype, verify=False, say=lambda _: None)
    merged_in_memory(trained_run, dtype, tmp_path / "memory")
    streamed, memory = weights(tmp_path / "streamed"), weights(tmp_path / "memory")
    assert streamed[0] == memory[0] and len(set(streamed[0].values())) > 1  # the same shards
    assert streamed[1].keys() == memory[1].keys()
    assert all(torch.equal(t, memory[1][k]) and t.dtype == getattr(torch, dtype) for k, t in streamed[1].items())
    # written a weight at a time, each file holds the bytes save_pretrained writes (headers included)
    assert all(
        (tmp_path / "streamed" / f).read_bytes() == (tmp_path / "memory" / f).read_bytes()
        for f in set(streamed[0].values())
    )
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "streamed" / name).read_text()) == json.loads(
            (tmp_path / "memory" / name).read_text()
        )
    # 14 LoRA-adapted weights, the trained embeddings and head (modules_to_save), the projector
    assert report["merged_weights"] == 14 and report["verification"] == "not run: --no-verify was given"


@pytest.mark.parametrize("fault", ["left out", "added twice"])
def test_verification_refuses_a_streamed_merge_that_loses_or_doubles_the_adapter(
    fault, trained_run, tmp_path, monkeypatch
):
    right = merging.merged_delta
    monkeypatch.setattr(
        merging,
        "merged_delta",
        lambda a, b, scaling, out=None: right(a, b, scaling, out).mul_(0 if fault == "left out" else 2),
    )
    refusal = (
        r"merged weight model\.language_model\.layers\.\d\.\S+ as written differs from base \+ adapter merged by peft"
    )
    with pytest.raises(MergeError, match=refusal):
        merge(trained_run, tmp_path / "out", dtype="bfloat16", say=lambda _: None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_verification_uses_the_training_data_when_eval_data_are_not_conversations(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    questions = tmp_path / "questions.jsonl"  # a benchmark question file, not LLaVA JSON
    questions.write_text(json.dumps({"question_id": 1, "image": "x.png", "text": "Is there a cat?"}) + "\n")
    recipe = run / "stage2" / "recipe.toml"
    recipe.write_text(re.sub(r'(?m)^data = ".*"$', f'data = "{questions}"', recipe.read_text()))
    said = []
    report = merge(run, tmp_path / "out", dtype="float32", say=said.append)
    assert "verification" not in report and report["max_abs_diff_vs_unmerged"] < report["tolerance"]
    # with no readable sample at all it says so, loudly, and in the report
    recipe.write_text(recipe.read_text().replace('data = ["', f'data = ["{tmp_path}/gone/'))
    report = merge(run, tmp_path / "out", dtype="float32", overwrite=True, say=said.append)
    assert report["verification"].startswith("not run: no sample to check it on (")
    assert "questions.jsonl" in report["verification"] and "gone" in report["verification"]
    assert said[-1].startswith("WARNING: the merge was not verified: no sample")
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["verification"] == report["verification"]


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
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_QLLAVA, str(out), str(image)],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["model"] == "LlavaForConditionalGeneration" and isinstance(answer["text"], str)


def test_chat_template_of_the_merged_folder_renders_the_training_template(merged_fp32):
    from transformers import AutoProcessor

    from qllava import templates

    out, _ = merged_fp32
    processor = AutoProcessor.from_pretrained(out)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the shape?"},
    ]
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
    assert (
        f"{tmp_path} is neither a qllava run (no stage1/ or stage2/) nor a model folder (no config.json): merge "
        "takes a run folder written by qllava finetune (runs/NAME)" in " ".join(capsys.readouterr().out.split())
    )
    before = (out / "model.safetensors").read_bytes()
    assert main(["merge", str(trained_run), "--out", str(out)]) == 2
    assert "exists: pass --overwrite to replace it" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == before
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    recipe = broken / "stage2" / "recipe.toml"
    recipe.write_text(recipe.read_text().replace('decoder = "', f'decoder = "{tmp_path}/missing'))
    assert main(["merge", str(broken), "--out", str(tmp_path / "y"), "--no-verify"]) == 2
    said = capsys.readouterr().out
    assert "the run's base model (" in said and "missing" in said and "cannot be loaded" in said
    assert not (tmp_path / "y").exists()


def test_a_base_without_safetensors_is_refused_naming_the_folder(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    recipe = run / "stage2" / "recipe.toml"
    decoder = re.search(r'(?m)^decoder = "(.*)"$', recipe.read_text()).group(1)
    shutil.copytree(decoder, tmp_path / "decoder", ignore=shutil.ignore_patterns("*.safetensors"))
    recipe.write_text(recipe.read_text().replace(f'decoder = "{decoder}"', f'decoder = "{tmp_path}/decoder"'))
    (run / "stage2" / "base.json").unlink()
    assert main(["merge", str(run), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path}/decoder: no safetensors weights" in capsys.readouterr().out
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_base_weight_cut_short_is_refused_naming_its_file_from_the_reader_thread(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    recipe = run / "stage2" / "recipe.toml"
    decoder = re.search(r'(?m)^decoder = "(.*)"$', recipe.read_text()).group(1)
    shutil.copytree(decoder, tmp_path / "decoder")
    weights = tmp_path / "decoder" / "model.safetensors"
    with safe_open(weights, "pt") as f:  # an index, as a sharded checkpoint has: the files are listed unread
        index = {"metadata": {}, "weight_map": dict.fromkeys(f.keys(), weights.name)}
    (tmp_path / "decoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    weights.write_bytes(weights.read_bytes()[:-100])
    recipe.write_text(recipe.read_text().replace(f'decoder = "{decoder}"', f'decoder = "{tmp_path}/decoder"'))
    (run / "stage2" / "base.json").unlink()
    assert main(["merge", str(run), "--out", str(tmp_path / "out"), "--no-verify"]) == 2
    assert re.search(
        rf"{weights}: weight \S+ is cut short \(\d+ of its \d+ bytes are in the file\)", capsys.readouterr().out
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


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
    assert (
        main(
            [
                "chat",
                str(trained_run),
                "--image",
                str(tiny_inputs / "shapes" / "images" / "eval-0.png"),
                "--prompt",
                "What color is the shape?",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
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
    recipe = load_recipe(
        TINY_RECIPE,
        tiny_overrides(tiny_inputs, tmp_path / "run")
        + [
            f'model.llava="{out}"',
            'stage2.projector="model"',
            "eval.at=[]",
            "stage2.max_steps=4",
            "lora.modules_to_save=[]",
        ],
    )
    result = train.run_stage(recipe, "stage2", say=lambda _: None)
    base = result.model.get_base_model()
    quantized = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14 and all(".language_model." in n for n in quantized)
    assert not isinstance(base.model.multi_modal_projector.linear_1, bnb.nn.Linear4bit)
    assert isinstance(base.lm_head, torch.nn.Linear) and not isinstance(base.lm_head, bnb.nn.Linear4bit)
    assert result.metrics["steps"] == 4 and (tmp_path / "run" / "stage2" / "adapter_model.safetensors").exists()
    # stage 1 on the same checkpoint: only its projector trains, on the frozen 4-bit base
    stage1 = train.run_stage(
        load_recipe(
            TINY_RECIPE,
            tiny_overrides(tiny_inputs, tmp_path / "run1")
            + [f'model.llava="{out}"', "eval.at=[]", "stage1.max_steps=2"],
        ),
        "stage1",
        say=lambda _: None,
    )
    assert stage1.metrics["steps"] == 2 and stage1.metrics["trainable_params"] == 64 * 128 + 64 + 64 * 64 + 64
