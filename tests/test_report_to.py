"""report_to: a stage's logs (loss, learning rate, tokens/s, pad fraction) reach TensorBoard's event file, and a
reporter that is unknown or not installed is refused before any work."""

import importlib.util
import json

import pytest

from qllava.recipe import RecipeError, check_report_to


def scalars(event_dir) -> dict[str, dict[int, float]]:
    """Every scalar of a TensorBoard log folder, read back with TensorBoard's own reader: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_event_file_holds_the_training_logs(tiny_recipe):
    from qllava import train

    recipe = tiny_recipe(
        "eval.at=[]", 'stage1.report_to=["tensorboard"]', "stage1.max_steps=6", "stage1.logging_steps=2"
    )
    metrics = train.finetune(recipe, stages=("stage1",), say=lambda _: None)["stage1"]
    folders = list((recipe.run_dir / "stage1" / "checkpoints" / "runs").iterdir())
    assert len(folders) == 1 and any(p.name.startswith("events.out.tfevents") for p in folders[0].iterdir())
    logged = scalars(folders[0])
    history = [e for e in json.loads((recipe.run_dir / "stage1" / "log_history.json").read_text()) if "loss" in e]
    assert [e["step"] for e in history] == [1, 2, 4, 6]  # the first step is always logged
    for entry in history:
        assert logged["train/loss"][entry["step"]] == pytest.approx(entry["loss"], rel=1e-6)
        assert logged["train/learning_rate"][entry["step"]] == pytest.approx(entry["learning_rate"], rel=1e-6)
    assert sorted(logged["train/tokens_per_s"]) == sorted(logged["train/pad_fraction"]) == [1, 2, 4, 6]
    assert all(rate > 0 for rate in logged["train/tokens_per_s"].values())
    assert all(
        0 < rate < logged["train/tokens_per_s"][step] for step, rate in logged["train/label_tokens_per_s"].items()
    )
    # the pad fraction logged last covers every batch trained on: the stage's own figure
    assert logged["train/pad_fraction"][6] == pytest.approx(metrics["pad_fraction"], rel=1e-6)


def test_no_report_to_writes_no_event_file(tiny_recipe):
    from qllava import train

    recipe = tiny_recipe("eval.at=[]", "stage1.max_steps=2")
    train.finetune(recipe, stages=("stage1",), say=lambda _: None)
    assert not (recipe.run_dir / "stage1" / "checkpoints" / "runs").exists()


def test_an_unknown_reporter_is_a_recipe_error(tiny_recipe):
    with pytest.raises(
        RecipeError,
        match=r"stage2\.report_to: 'tensorbord' is not one of tensorboard, wandb, "
        r"did you mean \"tensorboard\"\?",
    ):
        tiny_recipe('stage2.report_to=["tensorbord"]')


def test_a_reporter_that_is_not_installed_is_refused_before_any_work(tiny_recipe, monkeypatch):
    recipe = tiny_recipe('stage2.report_to=["wandb", "tensorboard"]')
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    from qllava import train

    with pytest.raises(RecipeError) as refused:
        train.finetune(recipe, say=lambda _: None)
    assert not recipe.run_dir.exists()
    assert refused.value.problems == [
        'stage2.report_to: "wandb" needs the wandb package (pip install wandb), or remove it'
    ]
    check_report_to(recipe, ("stage1",))  # a stage not about to run is not asked
