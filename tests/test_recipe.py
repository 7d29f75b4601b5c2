"""Recipes: every shipped recipe validates; every error message names the TOML path and the fix."""

import tomllib
from pathlib import Path

import pytest

from qllava.recipe import RecipeError, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))
MINIMAL = {"stage1": {"data": ["captions.json"]}, "stage2": {"data": ["chat.json"], "template": "vicuna_v1"},
           "output": {"dir": "runs/x"}}


def problems(raw: dict, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw, list(overrides))
    return e.value.problems


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_round_trips(path):
    recipe = load_recipe(path)
    assert recipe_from_dict(tomllib.loads(recipe.to_toml())) == recipe


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_starts_with_a_header(path):
    header = path.read_text().split("\n[")[0]
    assert header.startswith("# ") and "qllava finetune" in header


@pytest.mark.parametrize("mistral_name,vicuna_name", [("mistral_qlora", "vicuna_qlora"),
                                                       ("scienceqa_mistral", "scienceqa_vicuna")])
def test_twin_recipes_differ_only_in_decoder_and_template(mistral_name, vicuna_name):
    mistral, vicuna = (load_recipe(RECIPES[0].parent / f"{n}.toml") for n in (mistral_name, vicuna_name))
    assert mistral.model.decoder == "mistralai/Mistral-7B-Instruct-v0.2" and vicuna.model.decoder == "lmsys/vicuna-7b-v1.5"
    assert (mistral.stage2.template, vicuna.stage2.template) == ("mistral_instruct", "vicuna_v1")
    vicuna.model.decoder, vicuna.stage2.template, vicuna.output.dir = (
        mistral.model.decoder, mistral.stage2.template, mistral.output.dir)
    assert vicuna == mistral
    # LLaVA-1.5's values
    assert (mistral.lora.r, mistral.lora.lora_alpha, mistral.stage2.learning_rate, mistral.stage2.projector_lr) == \
        (128, 256, 2e-4, 2e-5)
    assert (mistral.stage1.learning_rate, mistral.stage1.template, mistral.stage1.max_seq_len) == (1e-3, "plain", 2048)


def test_unknown_key_suggests_the_right_name():
    assert problems({**MINIMAL, "lora": {"rnak": 8}}) == ['lora.rnak: unknown key, did you mean "r"?']
    assert problems({**MINIMAL, "stage1": {"data": ["a"], "lr": 1e-3}}) == \
        ['stage1.lr: unknown key, did you mean "learning_rate"?']


def test_unknown_key_without_a_close_match_lists_the_known_ones():
    assert problems({**MINIMAL, "output": {"dir": "x", "zzz": 1}}) == ["output.zzz: unknown key (known: dir)"]


def test_unknown_table():
    assert problems({**MINIMAL, "modle": {}}) == ['modle: unknown table, did you mean "model"?']


def test_wrong_type():
    assert problems({**MINIMAL, "lora": {"r": "eight"}}) == ["lora.r: expected an integer, got a string 'eight'"]
    assert problems({**MINIMAL, "quantization": {"load_in_4bit": 1}}) == \
        ["quantization.load_in_4bit: expected true/false, got an integer 1"]


def test_out_of_range_values_are_all_reported_together():
    found = problems({**MINIMAL, "lora": {"r": 0, "lora_dropout": 1.5},
                      "stage2": {"data": ["c.json"], "template": "vicuna_v1", "learning_rate": 0}})
    assert found == ["lora.r: must be > 0, got 0", "lora.lora_dropout: must be in [0, 1), got 1.5",
                     "stage2.learning_rate: must be > 0, got 0.0"]


def test_bad_choice_suggests_the_closest():
    assert problems({**MINIMAL, "stage2": {"data": ["c"], "template": "vicuna"}}) == [
        "stage2.template: 'vicuna' is not one of plain, vicuna_v1, mistral_instruct, llava_llama_2, "
        'did you mean "vicuna_v1"?']


def test_missing_required_values():
    assert problems({"stage2": {"template": "vicuna_v1"}}) == [
        "stage1.data: required, a list of LLaVA JSON files or dataset folders",
        "stage2.data: required, a list of LLaVA JSON files or dataset folders",
        'output.dir: required, e.g. "runs/my_llava"']


def test_stage_templates_must_fit_the_stage():
    assert problems({**MINIMAL, "stage1": {"data": ["a"], "template": "vicuna_v1"},
                     "stage2": {"data": ["b"], "template": "plain"}}) == [
        'stage1.template: stage 1 (alignment) uses the "plain" template, as LLaVA does',
        "stage2.template: stage 2 needs a conversation template: vicuna_v1, mistral_instruct or llava_llama_2"]


def test_projector_from_model_needs_a_llava_checkpoint():
    assert problems(MINIMAL, ["stage2.projector=model"]) == [
        'stage2.projector: "model" takes the projector of model.llava, which is not set']


def test_overrides_are_typed_and_validated():
    recipe = recipe_from_dict(MINIMAL, ["stage2.max_steps=10", "output.dir=runs/other", "lora.target_modules=q_proj"])
    assert (recipe.stage2.max_steps, recipe.output.dir, recipe.lora.target_modules) == (10, "runs/other", ["q_proj"])
    assert problems(MINIMAL, ["stage2.max_steps"]) == [
        "override 'stage2.max_steps': write it as table.key=value, e.g. stage2.max_steps=10"]
    assert problems(MINIMAL, ["stage2.max_stpes=3"]) == ['stage2.max_stpes: unknown key, did you mean "max_steps"?']


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[lora]\nr = 8\nlora_alpha = = 16\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}: 1 problem:\n  - not valid TOML: ")
    assert "line 3" in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "nope.toml")
    assert e.value.problems == [f"recipe file not found (looked in {Path.cwd()})"]
