"""Recipes: every shipped recipe validates; every error message names the TOML path and the fix."""

import json
import tomllib
from pathlib import Path

import pytest

from qllava.recipe import RecipeError, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))
MINIMAL = {
    "stage1": {"data": ["captions.json"]},
    "stage2": {"data": ["chat.json"], "template": "vicuna_v1"},
    "output": {"dir": "runs/x"},
}


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


@pytest.mark.parametrize(
    "mistral_name,vicuna_name", [("mistral_qlora", "vicuna_qlora"), ("scienceqa_mistral", "scienceqa_vicuna")]
)
def test_twin_recipes_differ_only_in_decoder_and_template(mistral_name, vicuna_name):
    mistral, vicuna = (load_recipe(RECIPES[0].parent / f"{n}.toml") for n in (mistral_name, vicuna_name))
    assert (
        mistral.model.decoder == "mistralai/Mistral-7B-Instruct-v0.2" and vicuna.model.decoder == "lmsys/vicuna-7b-v1.5"
    )
    assert (mistral.stage2.template, vicuna.stage2.template) == ("mistral_instruct", "vicuna_v1")
    vicuna.model.decoder, vicuna.stage2.template, vicuna.output.dir = (
        mistral.model.decoder,
        mistral.stage2.template,
        mistral.output.dir,
    )
    assert vicuna == mistral
    # LLaVA-1.5's values
    assert (mistral.lora.r, mistral.lora.lora_alpha, mistral.stage2.learning_rate, mistral.stage2.projector_lr) == (
        128,
        256,
        2e-4,
        2e-5,
    )
    assert (mistral.stage1.learning_rate, mistral.stage1.template, mistral.stage1.max_seq_len) == (1e-3, "plain", 2048)


def test_unknown_key_suggests_the_right_name():
    assert problems({**MINIMAL, "lora": {"rnak": 8}}) == ['lora.rnak: unknown key, did you mean "r"?']
    assert problems({**MINIMAL, "stage1": {"data": ["a"], "lr": 1e-3}}) == [
        'stage1.lr: unknown key, did you mean "learning_rate"?'
    ]


def test_unknown_key_without_a_close_match_lists_the_known_ones():
    assert problems({**MINIMAL, "output": {"dir": "x", "zzz": 1}}) == ["output.zzz: unknown key (known: dir)"]


def test_unknown_table():
    assert problems({**MINIMAL, "modle": {}}) == ['modle: unknown table, did you mean "model"?']


def test_wrong_type():
    assert problems({**MINIMAL, "lora": {"r": "eight"}}) == ["lora.r: expected an integer, got a string 'eight'"]
    assert problems({**MINIMAL, "quantization": {"load_in_4bit": 1}}) == [
        "quantization.load_in_4bit: expected true/false, got an integer 1"
    ]


def test_out_of_range_values_are_all_reported_together():
    found = problems(
        {
            **MINIMAL,
            "lora": {"r": 0, "lora_dropout": 1.5},
            "stage2": {"data": ["c.json"], "template": "vicuna_v1", "learning_rate": 0},
        }
    )
    assert found == [
        "lora.r: must be > 0, got 0",
        "lora.lora_dropout: must be in [0, 1), got 1.5",
        "stage2.learning_rate: must be > 0, got 0.0",
    ]


def test_bad_choice_suggests_the_closest():
    assert problems({**MINIMAL, "stage2": {"data": ["c"], "template": "vicuna"}}) == [
        "stage2.template: 'vicuna' is not one of plain, vicuna_v1, mistral_instruct, llava_llama_2, "
        'did you mean "vicuna_v1"?'
    ]


def test_missing_required_values():
    assert problems({"stage2": {"template": "vicuna_v1"}}) == [
        "stage1.data: required, a list of LLaVA JSON files or dataset folders",
        "stage2.data: required, a list of LLaVA JSON files or dataset folders",
        'output.dir: required, e.g. "runs/my_llava"',
    ]


def test_stage_templates_must_fit_the_stage():
    assert problems(
        {**MINIMAL, "stage1": {"data": ["a"], "template": "vicuna_v1"}, "stage2": {"data": ["b"], "template": "plain"}}
    ) == [
        'stage1.template: stage 1 (alignment) uses the "plain" template, as LLaVA does',
        "stage2.template: stage 2 needs a conversation template: vicuna_v1, mistral_instruct or llava_llama_2",
    ]


def test_projector_from_model_needs_a_llava_checkpoint():
    assert problems(MINIMAL, ["stage2.projector=model"]) == [
        'stage2.projector: "model" takes the projector of model.llava, which is not set'
    ]


def test_overrides_are_typed_and_validated():
    recipe = recipe_from_dict(MINIMAL, ["stage2.max_steps=10", "output.dir=runs/other", "lora.target_modules=q_proj"])
    assert (recipe.stage2.max_steps, recipe.output.dir, recipe.lora.target_modules) == (10, "runs/other", ["q_proj"])
    assert problems(MINIMAL, ["stage2.max_steps"]) == [
        "override 'stage2.max_steps': write it as table.key=value, e.g. stage2.max_steps=10"
    ]
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


def test_a_type_error_does_not_hide_the_other_problems_of_its_table():
    found = problems(
        {
            **MINIMAL,
            "lora": {"r": "eight", "lora_dropout": 1.5, "lora_alpha": 0},
            "stage2": {
                "data": ["c.json"],
                "template": "vicuna_v1",
                "max_steps": "ten",
                "learning_rate": -1,
                "num_train_epochs": 0,
            },
        }
    )
    assert found == [
        "lora.r: expected an integer, got a string 'eight'",
        "lora.lora_alpha: must be > 0, got 0",
        "lora.lora_dropout: must be in [0, 1), got 1.5",
        "stage2.max_steps: expected an integer, got a string 'ten'",
        "stage2.learning_rate: must be > 0, got -1.0",
    ]
    # "set num_train_epochs > 0 or max_steps > 0" would judge max_steps's default: it waits for a max_steps that reads


def test_cross_checks_run_beside_other_problems_but_never_on_a_mistyped_value():
    found = problems({**MINIMAL, "lora": {"r": "eight"}, "stage1": {"data": ["a"], "template": "vicuna_v1"}})
    assert found == [
        "lora.r: expected an integer, got a string 'eight'",
        'stage1.template: stage 1 (alignment) uses the "plain" template, as LLaVA does',
    ]
    # stage2.template mistyped: its default ("plain") must not be reported as the wrong template
    assert problems({**MINIMAL, "stage2": {"data": ["c"], "template": 2}}) == [
        "stage2.template: expected a string, got an integer 2"
    ]
    # a table given as another type is one problem, not also its defaults' ("output.dir: required")
    assert problems({**MINIMAL, "output": "runs/x"}) == ["output: must be a table ([output]), got a str"]


@pytest.mark.parametrize(
    "table,key,meant",
    [
        ("stage2", "lora_r", '"lora.r"'),
        ("stage2", "r", '"lora.r"'),
        ("stage2", "lora_alpha", '"lora.lora_alpha"'),
        ("stage2", "rank", '"lora.r"'),
        ("model", "load_in_4bit", '"quantization.load_in_4bit"'),
        ("stage1", "eval_batch_size", '"eval.batch_size"'),
        ("stage2", "lora_alpah", '"lora.lora_alpha"'),
        ("lora", "learning_rate", '"stage1.learning_rate" or "stage2.learning_rate"'),
        ("data", "dir", '"output.dir"'),
        ("eval", "max_seq_len", '"stage1.max_seq_len" or "stage2.max_seq_len"'),
    ],
)
def test_a_key_in_the_wrong_table_is_offered_where_it_belongs(table, key, meant):
    raw = {**MINIMAL, table: {**MINIMAL.get(table, {}), key: 8}}
    assert problems(raw) == [f"{table}.{key}: unknown key, did you mean {meant}?"]
    assert problems(MINIMAL, [f"{table}.{key}=8"]) == [f"{table}.{key}: unknown key, did you mean {meant}?"]


def test_a_table_keeps_its_own_close_keys_first():
    assert problems(MINIMAL, ["stage2.max_stpes=3"]) == ['stage2.max_stpes: unknown key, did you mean "max_steps"?']
    assert problems(MINIMAL, ["stage2.batch_size=3"]) == [
        'stage2.batch_size: unknown key, did you mean "per_device_train_batch_size"?'
    ]
    assert problems(MINIMAL, ["stage2.seed=3", "lora.seed=1"]) == [
        'lora.seed: unknown key, did you mean "stage1.seed" or "stage2.seed" or "synthetic.seed"?'
    ]


@pytest.mark.parametrize("name", ["DATA.JSON", "Data.Json", "DATA.JSONL"])
def test_a_data_file_with_an_upper_case_extension_is_llava_json(tmp_path, name):
    from qllava.data import is_llava_json
    from qllava.data.formats import _json_samples
    from qllava.preflight import data_problem

    samples = [{"id": "a", "conversations": []}, {"id": "b", "conversations": []}]
    path = tmp_path / name
    path.write_text("\n".join(map(json.dumps, samples)) if name.endswith("L") else json.dumps(samples))
    assert is_llava_json(str(path)) and data_problem(str(path)) is None
    assert list(_json_samples(path)) == samples
    assert data_problem(str(tmp_path / "MISSING.JSON")) == f"{tmp_path / 'MISSING.JSON'}: file not found"


def test_changed_values_name_every_key_that_differs_and_which_change_training():
    from qllava.recipe import changed_values, trains

    before = recipe_from_dict(MINIMAL)
    now = recipe_from_dict(
        MINIMAL,
        [
            "stage2.learning_rate=1e-5",
            "stage2.logging_steps=3",
            "eval.limit=4",
            "lora.r=4",
            "stage1.max_steps=9",
            "synthetic.data_dir=d",
        ],
    )
    changed = changed_values(before, now)
    assert [(k, old, new) for k, old, new in changed if not k.startswith("synthetic.")] == [
        ("lora.r", 128, 4),
        ("stage1.max_steps", -1, 9),
        ("stage2.learning_rate", 2e-4, 1e-5),
        ("stage2.logging_steps", 10, 3),
        ("eval.limit", 0, 4),
    ]
    assert ("synthetic.data_dir", None, "d") in changed  # a table one recipe lacks: its keys are unset there
    assert {k for k, *_ in changed if trains("stage2", k)} == {"lora.r", "stage2.learning_rate"} | {
        k for k, *_ in changed if k.startswith("synthetic.")
    }
    assert {k for k, *_ in changed if trains("stage1", k)} == {"stage1.max_steps"} | {
        k for k, *_ in changed if k.startswith("synthetic.")
    }
    for key in (
        "stage2.save_steps",
        "stage2.report_to",
        "stage2.gradient_checkpointing",
        "stage2.enabled",
        "data.num_proc",
        "output.dir",
        "eval.at",
    ):
        assert not trains("stage2", key), key


def test_a_mistyped_benchmark_is_named_at_load_time_with_the_closest():
    assert problems({**MINIMAL, "eval": {"benchmark": "scienceq"}}) == [
        "eval.benchmark: 'scienceq' is not one of scienceqa, pope, vqa, mme, did you mean \"scienceqa\"?"
    ]
    assert problems(MINIMAL, ["eval.benchmark='textvqa'"]) == [
        "eval.benchmark: 'textvqa' is not one of scienceqa, pope, vqa, mme, did you mean \"vqa\"?"
    ]


def test_the_recipe_knows_no_benchmark_code():
    """recipe.py imports the benchmarks' names from a leaf, never qllava.scorers (directly or through another
    module), and the names are the scorers' table's."""
    import ast
    import subprocess
    import sys

    from qllava.benchmark_names import BENCHMARK_NAMES
    from qllava.scorers import BENCHMARKS

    source = (Path(__file__).resolve().parents[1] / "qllava" / "recipe.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import) for alias in node.names
    }
    assert "scorers" not in imported and "qllava.scorers" not in imported
    assert tuple(BENCHMARKS) == BENCHMARK_NAMES
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from qllava.recipe import recipe_from_dict; "
            f"recipe_from_dict({MINIMAL!r} | {{'eval': {{'benchmark': 'pope'}}}}); "
            "print(sorted(m for m in sys.modules if m.startswith('qllava')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert eval(loaded) == ["qllava", "qllava.benchmark_names", "qllava.recipe", "qllava.templates"]
