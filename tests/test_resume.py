"""Interruption and resume: a training process killed with SIGKILL in the middle of stage 2 continues from
its latest complete checkpoint and ends exactly where an uninterrupted run ends."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from conftest import ROOT, TINY_RECIPE, tiny_overrides
from qllava.trainer import COMPLETE, latest_checkpoint

STEPS, SAVE_EVERY, KILL_AFTER = 60, 10, 20


def stage2_command(tiny_inputs, run, *extra):
    overrides = tiny_overrides(tiny_inputs, run) + [f"stage2.max_steps={STEPS}", f"stage2.save_steps={SAVE_EVERY}",
                                                    "stage2.logging_steps=5", "eval.at=[]"]
    return [sys.executable, "-m", "qllava", "finetune", str(TINY_RECIPE), "--stage", "2", *overrides, *extra]


def fresh_run(trained_run, tmp_path, name):
    run = tmp_path / name
    shutil.copytree(trained_run / "stage1", run / "stage1")  # both runs start stage 2 from the same projector
    return run


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def test_kill_and_resume_equals_an_uninterrupted_run(trained_run, tiny_inputs, tmp_path):
    reference = fresh_run(trained_run, tmp_path, "uninterrupted")
    subprocess.run(stage2_command(tiny_inputs, reference), check=True, cwd=ROOT, env=ENV, capture_output=True)

    run = fresh_run(trained_run, tmp_path, "interrupted")
    process = subprocess.Popen(stage2_command(tiny_inputs, run), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    marker = run / "stage2" / "checkpoints" / f"checkpoint-{KILL_AFTER}" / COMPLETE
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists() and not (run / "stage2" / "metrics.json").exists(), "the kill came too late to test resume"

    resumed = subprocess.run(stage2_command(tiny_inputs, run, "--resume"), cwd=ROOT, env=ENV, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "stage2: resuming from" in resumed.stdout

    for name in ("adapter_model.safetensors", "projector.safetensors"):
        want, got = load_file(str(reference / "stage2" / name)), load_file(str(run / "stage2" / name))
        assert want.keys() == got.keys()
        worst = max((want[k] - got[k]).abs().max().item() for k in want)
        assert worst <= 1e-6, f"{name}: resumed run differs from the uninterrupted one by {worst:.2e}"

    def losses(r):
        return {e["step"]: e["loss"] for e in json.loads((r / "stage2" / "log_history.json").read_text()) if "loss" in e}
    want, got = losses(reference), losses(run)
    assert sorted(got) == list(range(5, STEPS + 1, 5))  # the logged loss continues: no step missing or repeated
    assert all(abs(got[s] - want[s]) <= 1e-5 for s in want)


def test_resume_ignores_a_checkpoint_cut_by_a_crash(tmp_path):
    folder = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (folder / f"checkpoint-{step}" / COMPLETE).write_text("{}")
    assert latest_checkpoint(folder) == folder / "checkpoint-20"
    assert latest_checkpoint(tmp_path / "none") is None


def test_resume_keeps_finished_stages_and_refuses_overwrite_with_resume(trained_run, tiny_inputs, tmp_path, capsys):
    from qllava.cli import main
    run = tmp_path / "done"
    shutil.copytree(trained_run, run)
    before = (run / "stage2" / "adapter_model.safetensors").read_bytes()
    assert main(["finetune", str(TINY_RECIPE), "--resume", *tiny_overrides(tiny_inputs, run)]) == 0
    out = capsys.readouterr().out
    assert "stage1: already complete" in out and "stage2: already complete" in out
    assert (run / "stage2" / "adapter_model.safetensors").read_bytes() == before
    assert main(["finetune", str(TINY_RECIPE), "--resume", "--overwrite", *tiny_overrides(tiny_inputs, run)]) == 2
    assert "--resume continues a run and --overwrite replaces it" in capsys.readouterr().out
