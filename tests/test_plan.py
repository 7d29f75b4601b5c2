"""qllava plan: exact parameter counts for the shipped 7B recipes (offline), estimates that grow with the
micro-batch, and the GPU check script's CPU dry run."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from qllava import console, plan
from qllava.cli import main
from qllava.recipe import load_recipe

MISTRAL = ROOT / "recipes" / "mistral_qlora.toml"


def test_exact_counts_for_the_shipped_7b_recipes():
    counts = plan.count_parameters(load_recipe(MISTRAL))
    assert counts.lora == 335_544_320  # r128 on q,k,v,o,gate,up,down of Mistral-7B's 32 layers
    assert counts.projector == 20_979_712  # 1024 -> 4096 -> 4096, with biases
    assert counts.decoder_linear == 6_979_321_856 and counts.vision_tower == 303_507_456
    assert counts.embeddings == 2 * 32064 * 4096  # 32000 + the image token, grown to a multiple of 64
    vicuna = plan.count_parameters(load_recipe(ROOT / "recipes" / "vicuna_qlora.toml"))
    assert vicuna.lora == 319_815_680 and vicuna.projector == 20_979_712


def test_the_24gb_promise_holds_on_paper():
    result = plan.plan(load_recipe(MISTRAL), 24)
    assert result["stages"]["stage1"]["fits"] and result["stages"]["stage2"]["fits"]
    assert 11 < result["stage2_peak_gib"] < 16 and result["stage1_peak_gib"] < result["stage2_peak_gib"] + 1
    tight = plan.plan(load_recipe(MISTRAL), 12)
    assert not tight["stages"]["stage2"]["fits"] and 0 < tight["stages"]["stage2"]["max_tokens_per_micro_batch"] < 4096


@pytest.mark.parametrize(
    "key,values", [("per_device_train_batch_size", (1, 2, 4)), ("max_seq_len", (1024, 2048, 4096))]
)
def test_estimates_grow_with_batch_and_sequence_length(key, values):
    peaks = []
    for value in values:
        recipe = load_recipe(MISTRAL, [f"stage2.{key}={value}", f"stage1.{key}={value}"])
        result = plan.plan(recipe)
        peaks.append((result["stage1_peak_gib"], result["stage2_peak_gib"]))
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(peaks, peaks[1:]))


def test_gradient_checkpointing_and_8bit_adam_lower_the_estimate():
    base = plan.plan(load_recipe(MISTRAL))["stage2_peak_gib"]
    assert plan.plan(load_recipe(MISTRAL, ["stage2.gradient_checkpointing=false"]))["stage2_peak_gib"] > base + 10
    assert plan.plan(load_recipe(MISTRAL, ['stage2.optim="paged_adamw_8bit"']))["stage2_peak_gib"] < base - 1.5


def test_plan_cli_prints_the_breakdown_and_json(capsys):
    assert main(["plan", str(MISTRAL), "--gpu-memory", "24GiB", "--json"]) == 0
    printed = capsys.readouterr()
    assert "peak memory per training step on a 24 GiB card" in printed.err and "fits" in printed.err
    last = json.loads(printed.out)  # stdout holds the one JSON object, the tables go to stderr
    assert not console.console.stderr  # and only while plan runs: what comes next prints to stdout again
    assert last["lora_params"] == 335_544_320 and last["projector_params"] == 20_979_712
    assert {"stage1_peak_gib", "stage2_peak_gib"} <= last.keys()


def test_gpu_check_dry_run():
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(r["decoder"], r["stage"]) for r in result["rows"]] == [
        ("mistral", "stage1"),
        ("mistral", "stage2"),
        ("vicuna", "stage1"),
        ("vicuna", "stage2"),
    ]
    assert all(r["steps"] == 3 and r["tokens_per_s"] > 0 and r["nf4_linears"] == 14 for r in result["rows"])
    # the same stage traced on fake tensors for the same rows, beside what the card measures (none on CPU)
    assert all(0 < r["traced_gib"] < r["traced_with_allowances_gib"] for r in result["rows"])


def test_gpu_check_llava_next_dry_run():
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--llava-next"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    assert [(r["decoder"], r["stage"], r["tokens_per_micro_batch"], r["steps"]) for r in rows] == [
        ("llava_next", "stage2", 512, 3)
    ]
    assert rows[0]["nf4_linears"] == 14 and rows[0]["tokens_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_meets_the_memory_targets():
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--decoders", "mistral", "--steps", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["stage"]: r for r in json.loads(done.stdout.strip().splitlines()[-1])["rows"]}
    assert rows["stage2"]["peak_allocated_gib"] <= 16 and rows["stage1"]["peak_allocated_gib"] <= 10
    assert abs(rows["stage2"]["plan_error"]) <= 0.10
    # the trace against torch.cuda.max_memory_allocated: the first card checks what the CPU tests cannot
    assert all(abs(r["trace_error"]) <= 0.10 for r in rows.values())
