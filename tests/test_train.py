"""The two stages train what they should and nothing else, and their losses fall."""

import hashlib
import json

import pytest
import torch

from qllava import model as modeling
from qllava import train


def base_state(recipe) -> dict:
    """Every tensor of a freshly loaded base (4-bit weights as stored), keyed by plain module path."""
    model = modeling.load_base_model(recipe, modeling.build_processor(recipe.model))
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def plain_name(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", "")


def falling(losses: list[float]) -> bool:
    third = max(1, len(losses) // 3)
    return sum(losses[-third:]) / third < sum(losses[:third]) / third


@pytest.fixture(scope="module")
def stages(tiny_inputs, tmp_path_factory):
    """Stage 1 then stage 2 of the tiny recipe, long enough for losses to move, and the base before them."""
    from conftest import TINY_RECIPE, tiny_overrides

    from qllava.recipe import load_recipe

    run = tmp_path_factory.mktemp("stages") / "run"
    recipe = load_recipe(
        TINY_RECIPE,
        tiny_overrides(tiny_inputs, run)
        + ["stage1.max_steps=40", "stage2.max_steps=40", "stage1.logging_steps=4", "stage2.logging_steps=4"],
    )
    before = base_state(recipe)
    one = train.run_stage(recipe, "stage1")
    two = train.run_stage(recipe, "stage2")
    return recipe, before, one, two


def test_stage1_changes_only_the_projector(stages):
    _, before, one, _ = stages
    after = one.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if n.startswith("model.multi_modal_projector.")}
    assert {n for n, p in one.model.named_parameters() if p.requires_grad} == {
        n for n in before if n.startswith("model.multi_modal_projector.")
    }


def test_stage2_changes_lora_and_projector_only(stages):
    _, before, _, two = stages
    after = two.model.state_dict()
    base_after = {plain_name(n): t for n, t in after.items() if "lora_" not in n and "modules_to_save" not in n}
    assert base_after.keys() == before.keys()
    changed = {n for n in before if not torch.equal(before[n], base_after[n])}
    # The projector starts from stage 1's, then learns; every other base tensor (4-bit ones included) is untouched.
    assert changed == {n for n in before if n.startswith("model.multi_modal_projector.")}
    lora_b = [t for n, t in after.items() if "lora_B" in n]
    assert len(lora_b) == 14 and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: it learned
    saved = [t for n, t in after.items() if "modules_to_save" in n]
    originals = {
        n.replace(".modules_to_save.default", ".original_module"): t for n, t in after.items() if "modules_to_save" in n
    }
    assert len(saved) == 2 and all(not torch.equal(t, after[n]) for n, t in originals.items())


def test_stage2_starts_from_stage1s_projector(stages):
    recipe, _, one, _ = stages
    from safetensors.torch import load_file

    stage1 = load_file(str(one.out_dir / modeling.PROJECTOR_FILE))
    log = json.loads((recipe.run_dir / "stage2" / "log_history.json").read_text())
    assert log and stage1["linear_1.weight"].shape == (64, 128)


def test_losses_fall(stages):
    _, _, one, two = stages
    for result in (one, two):
        losses = [e["loss"] for e in json.loads((result.out_dir / "log_history.json").read_text()) if "loss" in e]
        assert len(losses) == 11 and falling(losses), (result.name, losses)  # steps 1, 4, 8, ..., 40


def test_stage_outputs(stages):
    _, _, one, two = stages
    assert {p.name for p in one.out_dir.iterdir()} >= {
        "projector.safetensors",
        "recipe.toml",
        "metrics.json",
        "loss.png",
        "processor_config.json",
        "tokenizer.json",
    }
    assert {p.name for p in two.out_dir.iterdir()} >= {
        "projector.safetensors",
        "recipe.toml",
        "metrics.json",
        "loss.png",
        "adapter_config.json",
        "adapter_model.safetensors",
        "processor_config.json",
        "tokenizer.json",
    }
    metrics = json.loads((two.out_dir / "metrics.json").read_text())
    assert metrics["steps"] == 40 and metrics["data"]["used"] > 400 and metrics["attn_implementation"] == "sdpa"
    assert 0 <= metrics["pad_fraction"] < 0.05 and metrics["tokens_per_s"] > 0


def test_projector_group_has_its_own_learning_rate(tiny_recipe):
    recipe = tiny_recipe("stage2.projector_lr=1e-5", "stage2.learning_rate=3e-4", "stage2.weight_decay=0.1")
    model = modeling.attach_lora(modeling.load_base_model(recipe, modeling.build_processor(recipe.model)), recipe.lora)
    modeling.projector(model).requires_grad_(True)
    groups = {
        g["name"]: (g["lr"], g["weight_decay"], len(g["params"]))
        for g in train.build_optimizer(model, recipe.stage2).param_groups
    }
    assert groups == {"adapter": (3e-4, 0.1, 30), "projector": (1e-5, 0.1, 2), "projector_no_decay": (1e-5, 0.0, 2)}


def test_stage2_refuses_a_missing_stage1_projector(tiny_recipe):
    recipe = tiny_recipe()
    with pytest.raises(
        FileNotFoundError,
        match="stage 2 starts from the stage-1 projector .*stage1/projector.safetensors, "
        "which does not exist: run stage 1 first",
    ):
        train.run_stage(recipe, "stage2")


# Digests of the 8 batches of the run below, recorded with qllava before its collator became stateless (one
# DataLoader process, N image ids per image in the cache): rows, their order and epochs must not change.
BATCHES_BEFORE = [
    "3cb7b5492caf8c9f",
    "329913ea3f2d2470",
    "95cd8d827430ed15",
    "27f369e517286d5b",
    "3479f559a0cd4f47",
    "883804db2c10e598",
    "d5747049adb68816",
    "5cd0f3b2470d3928",
]


def batch_digests(recipe, monkeypatch) -> list[str]:
    """A digest of every batch the model trains on (ids, positions, mask, per-image pixel sums), in order."""
    digests = []
    load = modeling.load_base_model

    def load_and_watch(*args, **kwargs):
        model = load(*args, **kwargs)

        def watch(module, args, kwargs):
            digest = hashlib.sha256()
            for key in ("input_ids", "position_ids", "attention_mask"):
                if kwargs.get(key) is not None:
                    digest.update(key.encode() + kwargs[key].cpu().numpy().tobytes())
            digest.update(kwargs["pixel_values"].float().sum(dim=(1, 2, 3)).numpy().round(3).tobytes())
            digests.append(digest.hexdigest()[:16])

        model.register_forward_pre_hook(watch, with_kwargs=True)
        return model

    monkeypatch.setattr(modeling, "load_base_model", load_and_watch)
    train.run_stage(recipe, "stage1")
    return digests


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_the_same_with_any_number_of_workers(tiny_recipe, monkeypatch, workers):
    """8 steps of 8 packed rows cross into a second epoch (5 steps each), whose rows are drawn anew."""
    recipe = tiny_recipe(
        "stage1.max_steps=8",
        "stage1.per_device_train_batch_size=8",
        "stage1.logging_steps=1",
        f"data.dataloader_num_workers={workers}",
    )
    assert batch_digests(recipe, monkeypatch) == BATCHES_BEFORE
    epochs = [
        e["epoch"] for e in json.loads((recipe.run_dir / "stage1" / "log_history.json").read_text()) if "loss" in e
    ]
    assert epochs[4] == 1.0 and epochs[-1] > 1.0


@pytest.mark.parametrize("steps,logging,logged", [(3, 10, [1, 3]), (7, 3, [1, 3, 6, 7]), (2, 1, [1, 2])])
def test_a_stage_logs_its_first_and_last_step_whatever_its_logging_steps(tiny_recipe, steps, logging, logged):
    result = train.run_stage(
        tiny_recipe(f"stage1.max_steps={steps}", f"stage1.logging_steps={logging}", "eval.at=[]"), "stage1"
    )
    history = json.loads((result.out_dir / "log_history.json").read_text())
    losses = {e["step"]: e["loss"] for e in history if "loss" in e}
    assert list(losses) == logged and (result.out_dir / "loss.png").exists()
    # the summary's "first -> last" spans the stage: never one loss shown twice
    assert (result.metrics["first_loss"], result.metrics["final_loss"]) == (losses[1], losses[steps])
    assert result.metrics["first_loss"] != result.metrics["final_loss"]
    assert result.metrics["resumed_at"] == [] and result.metrics["train_seconds"] > 0


def test_the_loss_plot_does_not_make_a_flat_loss_look_steep():
    figure = train.loss_figure([{"step": s, "loss": 6.2 - s * 1e-4} for s in range(1, 31)], "stage1")
    axes = figure.axes[0]
    assert axes.get_ylim()[0] == 0 and 6.2 <= axes.get_ylim()[1] < 7  # the whole loss, from 0
    figure.canvas.draw()
    assert axes.yaxis.get_major_formatter().get_offset() == ""  # plain values, no "+6.19" offset label
    assert train.loss_figure([{"step": 1, "learning_rate": 0.1}], "stage1") is None


def test_the_stage_folders_model_card_is_filled(stages):
    recipe, _, one, two = stages
    card = (two.out_dir / "README.md").read_text()
    assert "More Information Needed" not in card  # not PEFT's blank template
    metrics = json.loads((two.out_dir / "metrics.json").read_text())
    for fact in (
        f"- vision tower: `{recipe.model.vision_tower}`",
        f"- decoder: `{recipe.model.decoder}`",
        f"LoRA adapter (r {recipe.lora.r}, alpha {recipe.lora.lora_alpha}",
        f"- files: `{recipe.stage2.data[0]}`, images in `{recipe.stage2.image_folder}`",
        f"- template `{recipe.stage2.template}`",
        f"- {metrics['steps']} optimizer steps",
        f"{metrics['data']['used']:,} samples used",
        f"training loss {metrics['first_loss']:.4f} -> ",
        "library_name: peft",
        f"qllava merge {recipe.run_dir} --out MERGED",
    ):
        assert fact in card, fact
    assert "base_model" not in card  # local checkpoints: no hub id to link
    assert (
        "The MLP projector (`projector.safetensors`), trained by LLaVA alignment"
        in (one.out_dir / "README.md").read_text()
    )


def test_the_merged_model_card_links_nowhere_fake(stages):
    from qllava.merge import model_card

    recipe, _, _, two = stages
    card = model_card(recipe, two.out_dir, recipe.run_dir, {"dtype": "bfloat16"})
    assert "trained with qllava (QLoRA)" in card and "](" not in card  # no markdown link (it pointed at github.com/)
