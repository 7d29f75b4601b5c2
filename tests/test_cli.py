"""`qllava finetune` end to end on the tiny recipe, through the CLI, and its refusals."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_RECIPE, tiny_overrides

from qllava.cli import main


@pytest.fixture(scope="module")
def demo_run(tiny_inputs, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "tiny_demo"
    status = main(["finetune", str(TINY_RECIPE), *tiny_overrides(tiny_inputs, run), "eval.batch_size=36"])
    return status, run


def test_finetune_writes_the_run(demo_run, capsys):
    status, run = demo_run
    assert status == 0
    assert {p.name for p in run.iterdir()} == {"stage1", "stage2", "metrics.json"}
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy_before", "accuracy_stage1", "accuracy_stage2", "accuracy_blank_images"):
        assert 0 <= metrics[key] <= 1
    assert metrics["chance"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 2) / 3)
    assert metrics["stage1"]["steps"] == 8 and metrics["stage2"]["steps"] == 8
    assert (run / "stage2" / "adapter_model.safetensors").exists() and (run / "stage2" / "loss.png").exists()
    assert 'template = "mistral_instruct"' in (run / "stage2" / "recipe.toml").read_text()


def test_a_stage2_run_folder_reloads_and_generates(demo_run):
    from qllava import evaluate, inference, scorers
    from qllava.recipe import load_recipe

    _, run = demo_run
    loaded = inference.load_for_inference(run)
    assert type(loaded.model).__name__ == "PeftModelForCausalLM" and loaded.template == "mistral_instruct"
    recipe = load_recipe(run / "stage2" / "recipe.toml")
    items = scorers.load_items("vqa", recipe.eval.data)[:4]
    answers = evaluate.answer(loaded, items, recipe.eval.image_folder, max_new_tokens=3)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


def test_existing_run_is_not_overwritten(demo_run, tiny_inputs, capsys):
    _, run = demo_run
    before = (run / "stage2" / "adapter_model.safetensors").read_bytes()
    assert main(["finetune", str(TINY_RECIPE), *tiny_overrides(tiny_inputs, run)]) == 2
    assert "stage2 exist: pass --overwrite to replace them" in capsys.readouterr().out
    assert (run / "stage2" / "adapter_model.safetensors").read_bytes() == before


def test_stage2_alone_reuses_stage1_with_overwrite(demo_run, tiny_inputs):
    _, run = demo_run
    stage1 = (run / "stage1" / "projector.safetensors").read_bytes()
    assert (
        main(
            [
                "finetune",
                str(TINY_RECIPE),
                "--stage",
                "2",
                "--overwrite",
                *tiny_overrides(tiny_inputs, run),
                "eval.at=[]",
            ]
        )
        == 0
    )
    assert (run / "stage1" / "projector.safetensors").read_bytes() == stage1
    assert (run / "stage2" / "adapter_model.safetensors").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    # stage 2 was redone without scoring: its old scores are gone, stage 1's stay
    assert "accuracy_stage2" not in metrics and "accuracy_blank_images" not in metrics
    assert "accuracy_before" in metrics and "accuracy_stage1" in metrics


def test_recipe_errors_exit_2_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_RECIPE.read_text().replace("[lora]\nr = 8", "[lora]\nrank = 8"))
    out = subprocess.run(
        [sys.executable, "-m", "qllava", "finetune", str(bad), "stage1.learning_rate=-1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stdout + out.stderr
    assert 'lora.rank: unknown key, did you mean "r"?' in out.stdout
    assert "stage1.learning_rate: must be > 0, got -1.0" in out.stdout


def test_data_stats(tiny_inputs, tmp_path, capsys):
    assert main(["data", "stats", str(TINY_RECIPE), "--stage", "2", *tiny_overrides(tiny_inputs, tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "stage2: data at max_seq_len 256" in out and "sample lengths" in out
    from qllava import stats
    from qllava.recipe import load_recipe

    s = stats.stage_stats(load_recipe(TINY_RECIPE, tiny_overrides(tiny_inputs, tmp_path / "r")), "stage2")
    assert s["samples"] == 420 and s["image_tokens"] == {"min": 16, "mean": 16.0, "max": 16}
    assert sum(c for *_, c in s["histogram"]) == 420
    assert s["packed_pad_fraction"] < 0.02 < s["padded_pad_fraction"]


def test_version_and_every_help_shows_defaults_and_explains_every_argument(capsys):
    import argparse

    from qllava import __version__
    from qllava.cli import _parser

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"qllava {__version__}\n"
    parsers = [_parser()]
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                assert action.help, f"{parser.prog} {action.dest}: no help text"
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, "", argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, f"{parser.prog} {action.option_strings[0]}"
    assert len(parsers) >= 9  # qllava, finetune, data, data stats, merge, chat, eval, compare, plan


def test_ctrl_c_ends_with_a_clean_line_and_the_exact_resume_command(monkeypatch, capsys):
    from qllava import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "finetune", interrupted)
    argv = ["finetune", str(TINY_RECIPE), "--overwrite", "output.dir=runs/my try", "--stage", "2"]
    assert main(argv) == 130
    assert capsys.readouterr().out == (
        f"interrupted; continue with:\n  qllava finetune {TINY_RECIPE} 'output.dir=runs/my try' --stage 2 --resume\n"
    )


def test_the_eta_after_a_resume_counts_only_the_steps_trained_now(capsys):
    from qllava.console import TrainingProgress

    show = TrainingProgress("stage2")
    show({"event": "begin", "step": 40, "max_steps": 60})
    show(
        {
            "event": "log",
            "step": 50,
            "max_steps": 60,
            "elapsed_s": 20.0,
            "loss": 1.0,
            "lr": 1e-4,
            "tokens_per_s": 1.0,
            "label_tokens_per_s": 1.0,
            "pad_fraction": 0.0,
            "memory_gib": 1.0,
        }
    )
    show({"event": "end", "step": 60})
    assert capsys.readouterr().out.rstrip().endswith("ETA 20s")  # 10 steps took 20 s, 10 to go (not 20 / 50 x 10)


def test_the_eval_title_keeps_a_long_path_whole(monkeypatch, capsys):
    from qllava import console

    monkeypatch.setattr(console.console, "width", 60)
    data = "/a/rather/long/folder/of/benchmarks/playground/data/eval/scienceqa/llava_test_CQM-A.json"
    console.print_eval(
        {
            "benchmark": "scienceqa",
            "data": data,
            "questions": 4,
            "metrics": {"accuracy": 0.5},
            "model": {"name": "run", "backbone": "mistralai/Mistral-7B-v0.1", "template": "mistral_instruct"},
        }
    )
    out = capsys.readouterr().out
    assert f"scienceqa on {data}: run (mistralai/Mistral-7B-v0.1, mistral_instruct)\n" in out


def test_requires_python_is_what_the_code_needs():
    import tomllib

    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    supported = SpecifierSet(project["requires-python"])
    assert "3.11" in supported and "3.10" not in supported  # recipes are read with tomllib, new in 3.11


def test_the_recipe_docs_name_every_recipe_key():
    import dataclasses

    from qllava.recipe import TABLES

    docs = (ROOT / "docs" / "recipes.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in docs.splitlines() if line.startswith("| `[")}
    for table, cls in TABLES.items():
        if table == "synthetic":  # demo and tests only
            continue
        row = next(line for header, line in rows.items() if f"`[{table}]`" in header)
        cls = [c for c in getattr(cls, "__args__", (cls,)) if c is not type(None)][0]
        missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in row]
        assert not missing, f"docs/recipes.md's [{table}] row lacks {missing}"


def test_stage_2_alone_scores_before_on_the_first_stages_starting_model(trained_run, tiny_inputs, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run / "stage1", run / "stage1")  # stage 1 trained by an earlier command, never scored
    assert (
        main(
            [
                "finetune",
                str(TINY_RECIPE),
                "--stage",
                "2",
                *tiny_overrides(tiny_inputs, run),
                "stage1.max_steps=30",
                "stage2.max_steps=1",
                'eval.at=["before", "stage1"]',
                "eval.limit=36",
                "eval.batch_size=36",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    metrics, want = (json.loads((r / "metrics.json").read_text()) for r in (run, trained_run))
    # stage 1's untrained model, rebuilt from its seed, answers as it did when the whole run scored it
    for key in ("accuracy_before", "by_category_before", "accuracy_stage1", "by_category_stage1"):
        assert metrics[key] == want[key], key
    assert "held-out accuracy before: " in out and f"run written to {run} (metrics.json, stage1/, stage2/)" in out


def test_a_run_without_stage_1_scores_before_on_stage_2s_start_and_names_what_it_cannot_score(
    tiny_inputs, tmp_path, capsys
):
    run = tmp_path / "run"
    assert (
        main(
            [
                "finetune",
                str(TINY_RECIPE),
                *tiny_overrides(tiny_inputs, run),
                "stage1.enabled=false",
                'stage2.projector="fresh"',
                "stage2.max_steps=1",
                'eval.at=["before", "stage1"]',
                "eval.limit=12",
                "eval.batch_size=12",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        f"eval.at: stage1 not scored: {run / 'stage1'} is not complete and stage1 is not among the stages run "
        "now" in out
    )
    assert f"run written to {run} (metrics.json, stage2/)" in out and not (run / "stage1").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["accuracy_before"] <= 1 and "accuracy_stage1" not in metrics
