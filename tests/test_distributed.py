"""Data-parallel training through torchrun: 2 CPU processes (gloo) match 1 process with the same effective batch."""

import json
import os
import shutil
import subprocess
import sys

from conftest import ROOT, TINY_RECIPE, tiny_overrides
from safetensors.torch import load_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
# What `python -m qllava` does, then a report of whether the process group outlived the command: one left
# alive makes gloo abort some processes at interpreter exit (about 8 runs in 20 here), after a run that succeeded.
LAUNCHER = """import sys
import torch.distributed as dist
from qllava.cli import main
status = main()
print("process group left alive:", dist.is_initialized())
sys.exit(status)
"""


def stage2(tiny_inputs, trained_run, run, launcher, rows, accumulation):
    shutil.copytree(trained_run / "stage1", run / "stage1")
    # stage1.max_steps: the value trained_run's stage 1 was trained with (stage 2 refuses to build on it otherwise)
    overrides = tiny_overrides(tiny_inputs, run) + [
        "stage2.max_steps=10",
        "stage2.logging_steps=2",
        "eval.at=[]",
        "stage1.max_steps=30",
        f"stage2.per_device_train_batch_size={rows}",
        f"stage2.gradient_accumulation_steps={accumulation}",
    ]
    done = subprocess.run(
        [*launcher, "finetune", str(TINY_RECIPE), "--stage", "2", *overrides],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_two_processes_match_one_with_the_same_effective_batch(trained_run, tiny_inputs, tmp_path):
    launcher = tmp_path / "launch_qllava.py"
    launcher.write_text(LAUNCHER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(launcher)]
    two_out = stage2(tiny_inputs, trained_run, tmp_path / "two", torchrun, rows=2, accumulation=1)
    stage2(tiny_inputs, trained_run, tmp_path / "one", [sys.executable, "-m", "qllava"], rows=2, accumulation=2)

    two = json.loads((tmp_path / "two" / "stage2" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "stage2" / "metrics.json").read_text())
    assert two["steps_per_rank"] == [10, 10] and one["steps_per_rank"] == [10]
    assert two_out.count("training summary") == 1  # only rank 0 prints
    assert two_out.count("process group left alive: False") == 2, two_out[-1000:]
    for name in ("adapter_model.safetensors", "projector.safetensors"):
        a, b = load_file(str(tmp_path / "one" / "stage2" / name)), load_file(str(tmp_path / "two" / "stage2" / name))
        worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item() for k in a)
        assert worst <= 1e-5, f"{name}: 2 processes differ from 1 by {worst:.2e} (relative)"
    losses = [
        [e["loss"] for e in json.loads((tmp_path / r / "stage2" / "log_history.json").read_text()) if "loss" in e]
        for r in ("one", "two")
    ]
    assert max(abs(x - y) for x, y in zip(*losses)) <= 1e-5
