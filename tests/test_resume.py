"""Interruption and resume: a training process killed with SIGKILL in the middle of stage 2 continues from
its latest complete checkpoint and ends exactly where an uninterrupted run ends."""

import json
import os
import shlex
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


def test_resume_scores_the_held_out_points_a_failure_left_unscored(trained_run, tiny_inputs, tmp_path, capsys):
    from qllava.cli import main
    run = tmp_path / "scoring_failed"
    shutil.copytree(trained_run, run)
    full = json.loads((run / "metrics.json").read_text())
    # What a failure while scoring stage 2 leaves: stage2/ complete (its metrics.json is written before the held-out
    # scoring), the run's metrics.json as it was written after stage 1.
    after_stage1 = {k: v for k, v in full.items() if k in ("stage1", "chance") or k.endswith(("_before", "_stage1"))}
    (run / "metrics.json").write_text(json.dumps(after_stage1))
    assert main(["finetune", str(TINY_RECIPE), "--resume", *tiny_overrides(tiny_inputs, run), "stage1.max_steps=30",
                 "stage2.max_steps=60", "eval.limit=36", "eval.batch_size=36"]) == 0
    out = capsys.readouterr().out
    assert "stage2: already complete" in out and "held-out accuracy stage2: " in out
    assert "held-out accuracy blank_images: " in out and "held-out accuracy stage1" not in out  # only what was missing
    assert json.loads((run / "metrics.json").read_text()) == full  # the same scores, and stage 2's row, back
    assert "│ stage2 " in out  # the summary table has the stage's row


def test_ctrl_c_prints_the_exact_command_that_resumes(trained_run, tiny_inputs, tmp_path):
    run = fresh_run(trained_run, tmp_path, "ctrl_c")
    command = stage2_command(tiny_inputs, run, "--overwrite")
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = run / "stage2" / "checkpoints" / f"checkpoint-{SAVE_EVERY}" / COMPLETE
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate()
    assert process.returncode == 130 and "Traceback" not in out + err, out[-2000:] + err[-2000:]
    again = [a for a in command[3:] if a != "--overwrite"] + ["--resume"]  # after "python -m qllava"
    assert out.endswith(f"interrupted; continue with:\n  qllava {shlex.join(again)}\n")
    printed = shlex.split(out.splitlines()[-1])
    assert printed[0] == "qllava"
    resumed = subprocess.run([sys.executable, "-m", "qllava", *printed[1:]], cwd=ROOT, env=ENV, capture_output=True,
                             text=True)
    assert resumed.returncode == 0 and "stage2: resuming from" in resumed.stdout, resumed.stdout[-2000:]
    assert json.loads((run / "stage2" / "metrics.json").read_text())["steps"] == STEPS
