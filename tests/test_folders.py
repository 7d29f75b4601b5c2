"""The wrong kind of folder (a decoder, a vision tower, a stage, a run where a merged model belongs, a merged model
where a run belongs, a missing path) is one line saying what the folder is and what to pass, exit status 2, before
anything is loaded or written."""

import json
import re

import pytest
from conftest import TINY_RECIPE, tiny_overrides

from qllava.cli import main
from qllava.folders import folder_kind


@pytest.fixture
def merged_like(tmp_path):
    """What folder_kind reads of a merged folder: its config.json and the qllava.json merge writes beside it."""
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]})
    )
    (folder / "qllava.json").write_text(json.dumps({"template": "mistral_instruct", "source_run": "runs/first"}))
    return folder


def test_folder_kinds(tiny_inputs, trained_run, merged_like, tmp_path):
    llava_hf = tmp_path / "llava-hf"
    llava_hf.mkdir()
    (llava_hf / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    other = tmp_path / "qwen"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "text_config": {}, "vision_config": {}}))
    (tmp_path / "file.txt").write_text("x")
    kinds = {
        name: folder_kind(path).kind
        for name, path in {
            "run": trained_run,
            "stage": trained_run / "stage2",
            "merged": merged_like,
            "llava": llava_hf,
            "decoder": tiny_inputs / "mistral",
            "llama decoder": tiny_inputs / "llama",
            "vision": tiny_inputs / "clip",
            "other model": other,
            "file": tmp_path / "file.txt",
            "missing": tmp_path / "nothing",
            "empty": tmp_path,
        }.items()
    }
    assert kinds == {
        "run": "run",
        "stage": "stage",
        "merged": "merged",
        "llava": "llava",
        "decoder": "decoder",
        "llama decoder": "decoder",
        "vision": "vision_tower",
        "other model": "checkpoint",
        "file": "file",
        "missing": "missing",
        "empty": "other",
    }


@pytest.mark.parametrize("command", ["chat", "eval"])
@pytest.mark.parametrize(
    "folder,says",
    [
        (
            "mistral",
            "is a decoder checkpoint (mistral): pass a run folder (runs/NAME) or a merged one (qllava merge RUN "
            "--out DIR); this checkpoint goes in a recipe's model.decoder",
        ),
        ("clip", "is a vision tower checkpoint (clip_vision_model): pass a run folder (runs/NAME) or a merged one"),
        ("nothing", "is not found: pass a run folder (runs/NAME) or a merged one"),
        ("shapes", "is neither a qllava run (no stage1/ or stage2/) nor a model folder (no config.json)"),
    ],
)
def test_chat_and_eval_name_the_folder_they_were_given(command, folder, says, tiny_inputs, capsys):
    path = tiny_inputs / folder
    image = next((tiny_inputs / "shapes" / "images").iterdir())
    before = sorted(p for p in tiny_inputs.rglob("*") if "cache" not in p.parts)
    argv = {
        "chat": ["chat", str(path), "--image", str(image), "--prompt", "hi"],
        "eval": [
            "eval",
            str(path),
            "--benchmark",
            "vqa",
            "--data",
            str(tiny_inputs / "shapes" / "eval.json"),
            "--images",
            str(tiny_inputs / "shapes" / "images"),
            "--limit",
            "2",
        ],
    }[command]
    assert main(argv) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert out == f"error: {path} {says}" or out.startswith(f"error: {path} {says}")
    assert out.count("error:") == 1 and "Traceback" not in out and "LlavaConfig" not in out
    assert sorted(p for p in tiny_inputs.rglob("*") if "cache" not in p.parts) == before  # no eval/ written


def test_a_stage_folder_is_named_with_its_run(trained_run, capsys):
    from qllava.folders import FolderError
    from qllava.inference import load_for_inference

    with pytest.raises(
        FolderError, match=f"stage2 of the qllava run {trained_run}: pass the run folder, {trained_run}$"
    ):
        load_for_inference(trained_run / "stage2")


@pytest.mark.parametrize(
    "case,says",
    [
        (
            "merged",
            "is a merged qllava model (written by qllava merge): it is merged already: chat, eval and serve take "
            "it as it is; to merge again, pass its run, runs/first",
        ),
        ("stage", "is stage2 of the qllava run {run}: merge the whole run: qllava merge {run} --out DIR"),
        ("missing", "is not found: merge takes a run folder written by qllava finetune (runs/NAME)"),
        (
            "decoder",
            "is a decoder checkpoint (mistral): merge takes a run folder written by qllava finetune (runs/NAME)",
        ),
        ("llava", "is a LLaVA checkpoint (llava): there is nothing to merge: chat, eval and serve take it as it is"),
    ],
)
def test_merge_names_what_it_was_given(case, says, merged_like, trained_run, tiny_inputs, tmp_path, capsys):
    llava_hf = tmp_path / "hf"
    llava_hf.mkdir()
    (llava_hf / "config.json").write_text(json.dumps({"model_type": "llava"}))
    path = {
        "merged": merged_like,
        "stage": trained_run / "stage2",
        "missing": tmp_path / "runs" / "typo",
        "decoder": tiny_inputs / "mistral",
        "llava": llava_hf,
    }[case]
    out_dir = tmp_path / "out"
    assert main(["merge", str(path), "--out", str(out_dir)]) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert printed == f"error: {path} {says.format(run=trained_run)}"
    assert "not a qllava run folder" not in printed
    assert not out_dir.exists() and not out_dir.with_name("out.partial").exists()


@pytest.mark.parametrize(
    "overrides,says",
    [
        (
            ['model.llava="{run}"'],
            "model.llava: {run} is a qllava run: merge it first (qllava merge {run} --out DIR), "
            "then point model.llava at the merged folder",
        ),
        (
            ['model.llava="{run}/stage2"'],
            "model.llava: {run}/stage2 is stage2 of the qllava run {run}: merge it first "
            "(qllava merge {run} --out DIR), then point model.llava at the merged folder",
        ),
        (
            ['model.llava="{inputs}/mistral"'],
            "model.llava: {inputs}/mistral is a decoder checkpoint (mistral): set it as "
            "model.decoder and leave model.llava empty",
        ),
        (
            ['model.decoder="{inputs}/clip"'],
            "model.decoder: {inputs}/clip is a vision tower checkpoint "
            "(clip_vision_model): set it as model.vision_tower",
        ),
        (
            ['model.vision_tower="{inputs}/mistral"'],
            "model.vision_tower: {inputs}/mistral is a decoder checkpoint (mistral): set it as model.decoder",
        ),
    ],
)
@pytest.mark.parametrize("command", ["plan", "finetune"])
def test_a_recipe_key_naming_the_wrong_kind_of_folder(
    command, overrides, says, trained_run, tiny_inputs, tmp_path, capsys
):
    run_dir = tmp_path / "new_run"
    fill = {"run": trained_run, "inputs": tiny_inputs}
    # Without its [synthetic] table: that step would rewrite a tiny checkpoint put under another key.
    text = TINY_RECIPE.read_text()
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        text[: re.search(r"^\[synthetic\]", text, re.M).start()] + text[re.search(r"^\[model\]", text, re.M).start() :]
    )
    settings = [o for o in tiny_overrides(tiny_inputs, run_dir) if not o.startswith("synthetic.")]
    argv = [command, str(recipe), *settings, *(o.format(**fill) for o in overrides)]
    assert main(argv) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert says.format(**fill) in printed and "Traceback" not in printed
    assert not run_dir.exists()
