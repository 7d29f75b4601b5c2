"""qllava plan --trace: the training step traced on fake tensors equals real CPU execution, counted by the same tracker
(peak live bytes within 2%, FLOPs equal), on the tiny demo model and on the real-weight SmolLM2 decoder; a read of
tensor data the trace does not know fails with one line naming the operator and the place."""

import json

import pytest
from conftest import TINY_RECIPE, smollm2_recipe, tiny_overrides

from qllava import trace
from qllava.cli import main


def _compare(recipe, stage):
    traced = trace.trace_stage(recipe, stage, "cpu")
    real = trace.trace_stage(recipe, stage, "cpu", real=True)
    return traced, real


def _check(traced, real):
    assert traced["real"] is False and real["real"] is True
    assert abs(traced["traced_peak_bytes"] / real["traced_peak_bytes"] - 1) < 0.02
    assert traced["flops_per_step_micro_batch"] == real["flops_per_step_micro_batch"]
    assert traced["flops_per_token"]["forward"] > 0 and traced["flops_per_token"]["backward"] > 0
    assert traced["tokens_per_micro_batch"] == real["tokens_per_micro_batch"]
    assert sum(traced["breakdown"].values()) == traced["traced_peak_bytes"]
    assert traced["allowances_bytes"] == {}  # on CPU the tracker's count is the whole story


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_tiny_trace_equals_real_cpu_execution(tiny_recipe, stage):
    recipe = tiny_recipe('stage2.projector="fresh"')
    traced, real = _compare(recipe, stage)
    _check(traced, real)
    cfg = getattr(recipe, stage)
    # the worst-case micro-batch fills every row: per_device_train_batch_size x max_seq_len tokens
    assert traced["tokens_per_micro_batch"] == cfg.per_device_train_batch_size * cfg.max_seq_len
    assert traced["op_at_peak"]["step"] in (1, 2) and traced["op_at_peak"]["op"].startswith("aten.")
    # AdamW's two float32 moments per trainable weight (and a step counter per parameter) exist at the peak
    parts = traced["breakdown"]
    assert 2 * parts["trainable_weights"] <= parts["optimizer_states"] < 2 * parts["trainable_weights"] + 4096


def test_smollm2_trace_equals_real_cpu_execution(tiny_inputs, smollm2_dir, siglip_dir, tmp_path):
    recipe = smollm2_recipe(
        tiny_inputs,
        smollm2_dir,
        siglip_dir,
        tmp_path / "run",
        "stage2.max_seq_len=128",
        "stage2.per_device_train_batch_size=2",
    )
    traced, real = _compare(recipe, "stage2")
    _check(traced, real)
    assert traced["breakdown"]["quantized_weights"] > 0 and traced["breakdown"]["trainable_weights"] > 0


def _peaks(tiny_recipe, attn):
    return [
        trace.trace_stage(
            tiny_recipe(
                'stage2.projector="fresh"',
                f'model.attn_implementation="{attn}"',
                f"stage2.max_seq_len={n}",
                "stage2.per_device_train_batch_size=1",
            ),
            "stage2",
            "cuda",
        )["traced_peak_bytes"]
        for n in (256, 512, 1024)
    ]


def test_the_flash_attention_path_holds_no_n_squared_scores(tiny_recipe):
    # flash_attention_2 keeps an output and a float32 logsumexp per token: the peak grows linearly with the
    # tokens (equal second differences); eager attention's n x n scores make it grow faster
    flash, eager = _peaks(tiny_recipe, "flash_attention_2"), _peaks(tiny_recipe, "eager")
    assert abs((flash[2] - flash[1]) / (flash[1] - flash[0]) - 2) < 0.05
    assert (eager[2] - eager[1]) / (eager[1] - eager[0]) > 2.3


def test_an_unknown_data_read_fails_naming_the_operator(tiny_recipe, monkeypatch):
    monkeypatch.delitem(trace.SCALAR_SITES, "compute_loss")
    with pytest.raises(trace.TraceError, match=r"_local_scalar_dense.*sft_trainer\.py:\d+ \(compute_loss\)"):
        trace.trace_stage(tiny_recipe('stage2.projector="fresh"'), "stage1", "cpu")


def test_plan_trace_cli_prints_the_issue_keys(tiny_inputs, tmp_path, capsys):
    overrides = tiny_overrides(tiny_inputs, tmp_path / "run") + ['stage2.projector="fresh"']
    assert main(["plan", str(TINY_RECIPE), *overrides, "--stage", "1", "--trace", "--device", "cpu", "--json"]) == 0
    printed = capsys.readouterr()
    assert "traced peak" in printed.err and "operator at the peak" in printed.err
    stage = json.loads(printed.out)["stages"]["stage1"]
    assert {
        "traced_peak_bytes",
        "breakdown",
        "op_at_peak",
        "allowances_bytes",
        "flops_per_token",
        "tokens_per_step",
    } <= stage.keys()
    assert stage["tokens_per_step"] == 4 * 256 and stage["traced_peak_bytes"] > 0
    epoch = stage["epoch"]  # an estimate per card, labelled, with where its token count comes from
    assert set(epoch["hours"]) == {"RTX 4090", "A100-40GB", "H100"} and "estimate" in epoch["label"]
    assert "one epoch" in printed.err and epoch["tokens"] > 0 and epoch["hours"]["RTX 4090"] >= epoch["hours"]["H100"]


def test_epoch_hours_follow_the_traced_flops():
    hours = trace.epoch_hours(10**9, {"forward": 2e9, "backward": 2e9, "recompute": 2e9})
    assert hours["H100"] == round(10**9 * 6e9 / (989e12 * trace.UTILISATION) / 3600, 1)
