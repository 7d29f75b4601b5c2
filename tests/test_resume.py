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

import pytest
from conftest import ROOT, TINY_RECIPE, tiny_overrides
from safetensors.torch import load_file

from qllava.trainer import COMPLETE, RESUME_READS, checkpoint_problem, latest_checkpoint

STEPS, SAVE_EVERY, KILL_AFTER = 60, 10, 20
MINIMAL = {
    "stage1": {"data": ["captions.json"]},
    "stage2": {"data": ["chat.json"], "template": "vicuna_v1"},
    "output": {"dir": "runs/x"},
}


def stage2_command(tiny_inputs, run, *extra):
    overrides = tiny_overrides(tiny_inputs, run) + [
        f"stage2.max_steps={STEPS}",
        f"stage2.save_steps={SAVE_EVERY}",
        "stage2.logging_steps=5",
        "eval.at=[]",
        *TRAINED_STAGE1,
    ]
    return [sys.executable, "-m", "qllava", "finetune", str(TINY_RECIPE), "--stage", "2", *overrides, *extra]


# The value trained_run's stage 1 was trained with, which a stage 2 built on it must be given (tiny_overrides: 8).
TRAINED_STAGE1 = ["stage1.max_steps=30"]


def fresh_run(trained_run, tmp_path, name):
    run = tmp_path / name
    shutil.copytree(trained_run / "stage1", run / "stage1")  # both runs start stage 2 from the same projector
    return run


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def test_kill_and_resume_equals_an_uninterrupted_run(trained_run, tiny_inputs, tmp_path):
    reference = fresh_run(trained_run, tmp_path, "uninterrupted")
    subprocess.run(stage2_command(tiny_inputs, reference), check=True, cwd=ROOT, env=ENV, capture_output=True)

    run = fresh_run(trained_run, tmp_path, "interrupted")
    process = subprocess.Popen(
        stage2_command(tiny_inputs, run), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = run / "stage2" / "checkpoints" / f"checkpoint-{KILL_AFTER}" / COMPLETE
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists() and not (run / "stage2" / "metrics.json").exists(), "the kill came too late to test resume"
    # The checkpoint to resume from holds every file a resume reads, as its marker lists them.
    checkpoint = latest_checkpoint(run / "stage2" / "checkpoints", lora=True)
    written = json.loads((checkpoint / COMPLETE).read_text())
    assert set(RESUME_READS) | {"adapter_model.safetensors", "rng_state.pth"} <= set(written["files"])

    resumed = subprocess.run(
        stage2_command(tiny_inputs, run, "--resume"), cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"stage2: resuming from {checkpoint}" in resumed.stdout

    for name in ("adapter_model.safetensors", "projector.safetensors"):
        want, got = load_file(str(reference / "stage2" / name)), load_file(str(run / "stage2" / name))
        assert want.keys() == got.keys()
        worst = max((want[k] - got[k]).abs().max().item() for k in want)
        assert worst <= 1e-6, f"{name}: resumed run differs from the uninterrupted one by {worst:.2e}"

    def losses(r):
        return {
            e["step"]: e["loss"] for e in json.loads((r / "stage2" / "log_history.json").read_text()) if "loss" in e
        }

    want, got = losses(reference), losses(run)
    assert sorted(got) == [1, *range(5, STEPS + 1, 5)]  # the logged loss continues: no step missing or repeated
    assert all(abs(got[s] - want[s]) <= 1e-5 for s in want)

    # The stage's record says where it was continued, and its time adds the segment before the checkpoint.
    metrics = json.loads((run / "stage2" / "metrics.json").read_text())
    assert metrics["resumed_at"] == [written["step"]] and metrics["train_seconds"] > written["train_seconds"] > 0
    assert f"continued from a checkpoint at step {written['step']}" in (run / "stage2" / "README.md").read_text()
    assert json.loads((reference / "stage2" / "metrics.json").read_text())["resumed_at"] == []


def test_resume_ignores_a_checkpoint_cut_by_a_crash(tmp_path):
    folder = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):
        write_checkpoint(folder, step, marker=complete)
    assert latest_checkpoint(folder, lora=True) == folder / "checkpoint-20"
    assert latest_checkpoint(tmp_path / "none", lora=True) is None


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
    assert (
        main(
            [
                "finetune",
                str(TINY_RECIPE),
                "--resume",
                *tiny_overrides(tiny_inputs, run),
                "stage1.max_steps=30",
                "stage2.max_steps=60",
                "eval.limit=36",
                "eval.batch_size=36",
            ]
        )
        == 0
    )
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
    resumed = subprocess.run(
        [sys.executable, "-m", "qllava", *printed[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0 and "stage2: resuming from" in resumed.stdout, resumed.stdout[-2000:]
    assert json.loads((run / "stage2" / "metrics.json").read_text())["steps"] == STEPS


# ---------------------------------------------------------------- what a checkpoint must hold


def write_checkpoint(folder, step, lora=True, marker=True, processes=1, old_marker=False):
    """A checkpoint folder as QllavaTrainer writes one: every file a resume reads, then the marker listing them."""
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    rng = ["rng_state.pth"] if processes == 1 else [f"rng_state_{i}.pth" for i in range(processes)]
    adapter = ["adapter_model.safetensors", "adapter_config.json"] if lora else []
    names = [*RESUME_READS, *rng, "training_args.bin", *adapter]
    for i, name in enumerate(names):
        (checkpoint / name).write_bytes(b"x" * (10 + i))
    files = {name: 10 + i for i, name in enumerate(names)}
    if marker:
        (checkpoint / COMPLETE).write_text(
            json.dumps(
                {"step": step}
                if old_marker
                else {
                    "step": step,
                    "files": files,
                    "processes": processes,
                    "train_seconds": 1.5 * step,
                    "resumed_at": [],
                }
            )
        )
    return checkpoint


@pytest.mark.parametrize(
    "damage,problem",
    [
        (lambda c: (c / "optimizer.pt").unlink(), "it lacks optimizer.pt"),
        (lambda c: (c / "scheduler.pt").unlink(), "it lacks scheduler.pt"),
        (lambda c: (c / "trainer_state.json").unlink(), "it lacks trainer_state.json"),
        (lambda c: (c / "adapter_model.safetensors").unlink(), "it lacks adapter_model.safetensors"),
        (lambda c: (c / "projector.safetensors").unlink(), "it lacks projector.safetensors"),
        (lambda c: (c / "rng_state.pth").unlink(), "it lacks rng_state.pth"),
        (lambda c: (c / "optimizer.pt").write_bytes(b"x"), "its optimizer.pt is 1 bytes, 11 when written"),
        (lambda c: (c / COMPLETE).unlink(), f"it has no {COMPLETE} (writing it was cut short)"),
        (lambda c: (c / COMPLETE).write_text('{"step": 3'), f"its {COMPLETE} is not valid JSON"),
    ],
)
def test_a_checkpoint_without_every_file_a_resume_reads_is_passed_over_saying_why(tmp_path, damage, problem):
    from qllava.recipe import recipe_from_dict
    from qllava.resume import resume_points
    from qllava.run import RunFolder

    run = RunFolder(tmp_path / "run")
    write_checkpoint(run.checkpoints("stage2"), 10)
    damage(write_checkpoint(run.checkpoints("stage2"), 20))
    said = []
    recipe = recipe_from_dict(MINIMAL, [f'output.dir="{run.path}"'])
    points = resume_points(recipe, run, ["stage2"], said.append)
    assert points == {"stage2": run.checkpoints("stage2") / "checkpoint-10"}
    assert said == [
        f"stage2: {run.checkpoints('stage2') / 'checkpoint-20'} is not complete ({problem}): passed over "
        "for checkpoint-10"
    ]


def test_no_complete_checkpoint_is_refused_naming_the_file(tmp_path):
    from qllava.recipe import recipe_from_dict
    from qllava.resume import ResumeError, resume_points
    from qllava.run import RunFolder

    run = RunFolder(tmp_path / "run")
    (write_checkpoint(run.checkpoints("stage2"), 10) / "scheduler.pt").unlink()
    (write_checkpoint(run.checkpoints("stage2"), 20, marker=False))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    recipe = recipe_from_dict(MINIMAL, [f'output.dir="{run.path}"'])
    with pytest.raises(ResumeError) as e:
        resume_points(recipe, run, ["stage2"], lambda _: None)
    assert str(e.value) == (
        f"{run.checkpoints('stage2')}: no checkpoint there is complete (checkpoint-20: it has no {COMPLETE} (writing "
        "it was cut short); checkpoint-10: it lacks scheduler.pt). Put the file back, or remove "
        f"{run.checkpoints('stage2')} to train stage2 again from step 0 (with --resume; finished stages are kept)"
    )
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_what_a_checkpoint_must_hold_depends_on_the_stage_and_the_processes(tmp_path):
    stage1 = write_checkpoint(tmp_path / "stage1", 5, lora=False)
    assert checkpoint_problem(stage1, lora=False) is None  # stage 1 trains no adapter
    assert checkpoint_problem(stage1, lora=True) == "it lacks adapter_model.safetensors"
    two = write_checkpoint(tmp_path / "ddp", 5, processes=2)
    assert checkpoint_problem(two, lora=True) is None
    (two / "rng_state_1.pth").unlink()
    assert checkpoint_problem(two, lora=True) == "it lacks rng_state_1.pth"
    old = write_checkpoint(tmp_path / "old", 5, old_marker=True)  # a marker that lists no files (older qllava)
    assert checkpoint_problem(old, lora=True) is None
    (old / "optimizer.pt").unlink()
    assert checkpoint_problem(old, lora=True) == "it lacks optimizer.pt"


# ---------------------------------------------------------------- the recipe a stage started with


def started_run(tmp_path, *stages, **overrides):
    """A run folder whose stages (name -> "complete" or "begun") were started with MINIMAL + their overrides, and
    the recipe of the first; a begun stage has a complete checkpoint."""
    from qllava.recipe import recipe_from_dict
    from qllava.resume import store_recipe
    from qllava.run import RunFolder

    run = RunFolder(tmp_path / "run")
    for name, state in stages:
        store_recipe(recipe_from_dict(MINIMAL, [f'output.dir="{run.path}"', *overrides.get(name, [])]), run.stage(name))
        if state == "complete":
            (run.stage(name) / "metrics.json").write_text("{}")
        else:
            write_checkpoint(run.checkpoints(name), 4, lora=name == "stage2")
    return run


def check(run, names, *overrides, resume=True):
    """check_recipe for a command running `names` with MINIMAL + overrides: (what it said, the error or None)."""
    from qllava.recipe import recipe_from_dict
    from qllava.resume import ResumeError, check_recipe, resume_points

    recipe = recipe_from_dict(MINIMAL, [f'output.dir="{run.path}"', *overrides])
    said = []
    points = resume_points(recipe, run, names, said.append) if resume else {}
    try:
        check_recipe(recipe, run, names, points, said.append)
    except ResumeError as e:
        return said, str(e)
    return said, None


def test_a_stage_continues_only_with_the_values_that_train_it_as_it_started(tmp_path):
    run = started_run(
        tmp_path,
        ("stage1", "complete"),
        ("stage2", "begun"),
        stage2=["stage2.max_steps=2000", "stage2.learning_rate=2e-3"],
    )
    snapshot = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    said, error = check(
        run,
        ["stage2"],
        "stage2.max_steps=100",
        "stage2.learning_rate=1e-5",
        "lora.r=16",
        'stage2.template="mistral_instruct"',
        "eval.limit=3",
    )
    stage2 = run.stage("stage2")
    assert error == (
        f"{stage2} cannot be continued with this recipe: its checkpoints hold the optimizer, schedule and data "
        f"position of the values it started with ({stage2 / 'recipe.toml'}), and these values, which change what it "
        "learns, differ:\n"
        "  - lora.r: 16 here, 128 when it started\n"
        '  - stage2.template: "mistral_instruct" here, "vicuna_v1" when it started\n'
        "  - stage2.learning_rate: 1e-05 here, 0.002 when it started\n"
        "  - stage2.max_steps: 100 here, 2000 when it started\n"
        """To continue it, give the values back: lora.r=128 'stage2.template="vicuna_v1"' stage2.learning_rate=0.002 """
        "stage2.max_steps=2000. To train with the new values, start it over: --stage 2 --overwrite (stage 1 is kept)."
    )
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == snapshot  # nothing written
    assert check(run, ["stage2"], "stage2.max_steps=2000", "stage2.learning_rate=2e-3") == ([], None)


def test_values_that_cannot_change_what_a_stage_learns_may_change_and_are_named(tmp_path):
    run = started_run(tmp_path, ("stage1", "complete"), ("stage2", "begun"))
    said, error = check(
        run,
        ["stage2"],
        "eval.limit=3",
        "stage2.logging_steps=1",
        "stage2.save_steps=7",
        "stage2.gradient_checkpointing=false",
        "data.num_proc=2",
        'output.dir="elsewhere"',
        "stage1.logging_steps=3",
    )
    assert error is None
    assert said == [
        "stage2: changed since it started, without effect on what it learns: stage1.logging_steps "
        "(10 -> 3), stage2.gradient_checkpointing (true -> false), stage2.logging_steps (10 -> 1), "
        "stage2.save_steps (500 -> 7), eval.limit (0 -> 3), data.num_proc (unset -> 2), "
        f'output.dir ("{run.path}" -> "elsewhere")'
    ]
    # stage 2's values (and [lora]) cannot change what stage 1 learns
    run = started_run(tmp_path / "s1", ("stage1", "begun"))
    said, error = check(run, ["stage1", "stage2"], "stage2.learning_rate=1", "lora.r=4")
    assert error is None and said == [
        "stage1: changed since it started, without effect on what it learns: lora.r "
        "(128 -> 4), stage2.learning_rate (0.0002 -> 1.0)"
    ]


@pytest.mark.parametrize("resume", [True, False])
def test_a_kept_stage_1_that_stage_2_starts_from_is_checked_the_same_way(tmp_path, resume):
    run = started_run(
        tmp_path,
        ("stage1", "complete"),
        ("stage2", "begun" if resume else "complete"),
        stage1=["stage1.learning_rate=3e-3"],
        stage2=["stage1.learning_rate=3e-3"],
    )
    snapshot = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    said, error = check(run, ["stage2"], "stage1.learning_rate=1e-3", 'model.decoder="other"', resume=resume)
    stage1 = run.stage("stage1")
    kept = (
        f"stage 2 starts from the projector of {stage1}, which was trained with other values than this recipe's "
        f"({stage1 / 'recipe.toml'}):\n"
    )
    if resume:  # model.decoder is named once, for the stage continued; stage 1 adds its own key
        assert error.startswith(f"{run.stage('stage2')} cannot be continued with this recipe")
        assert '\n  - model.decoder: "other" here, "mistralai/Mistral-7B-v0.1" when it started\n' in error
        assert error.endswith(
            kept + "  - stage1.learning_rate: 0.001 here, 0.003 when it was trained\n"
            "To train stage 2 from it, give the values back: stage1.learning_rate=0.003. To use the "
            "new values, train stage 1 again: --overwrite (both stages)."
        )
    else:
        assert error == (
            kept + '  - model.decoder: "other" here, "mistralai/Mistral-7B-v0.1" when it was trained\n'
            "  - stage1.learning_rate: 0.001 here, 0.003 when it was trained\n"
            "To train stage 2 from it, give the values back: "
            """'model.decoder="mistralai/Mistral-7B-v0.1"' stage1.learning_rate=0.003. """
            "To use the new values, train stage 1 again: --overwrite (both stages)."
        )
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == snapshot
    # stage 2 from a fresh projector does not build on stage 1
    assert check(run, ["stage2"], "stage1.learning_rate=1e-3", 'stage2.projector="fresh"', resume=False) == ([], None)


def test_a_stage_begun_by_an_older_qllava_is_continued_saying_it_is_not_checked(tmp_path):
    run = started_run(tmp_path, ("stage1", "complete"), ("stage2", "begun"))
    (run.stage("stage2") / "recipe.toml").unlink()
    said, error = check(run, ["stage2"], "stage2.learning_rate=1")
    assert error is None and said == [
        f"stage2: {run.stage('stage2') / 'recipe.toml'} is missing (the stage was begun "
        "by an older qllava): it continues without checking that the recipe is the one "
        "it started with"
    ]


def test_a_begun_stage_without_a_checkpoint_says_resume_starts_it_over(tmp_path):
    from qllava.recipe import recipe_from_dict
    from qllava.resume import interrupted_note

    run = started_run(tmp_path, ("stage1", "complete"), ("stage2", "begun"), stage2=["stage2.save_steps=0"])
    shutil.rmtree(run.checkpoints("stage2"))
    said, error = check(run, ["stage2"], "stage2.save_steps=0")
    assert error is None and said == [
        "stage2: no checkpoint to continue from (stage2.save_steps = 0 writes none): "
        "--resume starts it over from step 0"
    ]
    recipe = recipe_from_dict(MINIMAL, [f'output.dir="{run.path}"', "stage2.save_steps=0"])
    assert interrupted_note(recipe, ("stage1", "stage2")) == (
        "stage2 has no checkpoint to continue from (stage2.save_steps = 0 writes none), so --resume starts it over "
        "from step 0"
    )
    # save_steps > 0, interrupted before the first checkpoint: the same, with the step it would have come at
    (run.stage("stage2") / "recipe.toml").write_text(
        (run.stage("stage2") / "recipe.toml").read_text().replace("save_steps = 0", "save_steps = 50")
    )
    assert "(the first is written at step 50), so --resume starts it over" in interrupted_note(recipe, ("stage2",))
    # nothing to say: a stage not begun, or one with a checkpoint
    assert interrupted_note(recipe, ("stage1",)) is None
    write_checkpoint(run.checkpoints("stage2"), 4)
    assert interrupted_note(recipe, ("stage2",)) is None


# ---------------------------------------------------------------- through the command, on a trained stage 2


@pytest.fixture(scope="module")
def interrupted(trained_run, tiny_inputs, tmp_path_factory):
    """(run, overrides): stage 2 trained 8 steps with checkpoints at 4 and 8, then left as an interruption leaves it
    (no metrics.json), with checkpoint-8 lacking its optimizer state."""
    from qllava import train
    from qllava.recipe import load_recipe

    run = tmp_path_factory.mktemp("interrupted") / "run"
    shutil.copytree(trained_run / "stage1", run / "stage1")
    overrides = tiny_overrides(tiny_inputs, run) + [*TRAINED_STAGE1, "stage2.save_steps=4", "eval.at=[]"]
    train.finetune(load_recipe(TINY_RECIPE, overrides), stages=("stage2",), say=lambda _: None)
    (run / "stage2" / "metrics.json").unlink()
    (run / "stage2" / "checkpoints" / "checkpoint-8" / "optimizer.pt").unlink()
    return run, overrides


def copied(interrupted, tmp_path):
    run, overrides = interrupted
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", [o.replace(str(run), str(tmp_path / "run")) for o in overrides]


def files(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_finetune_refuses_to_continue_or_build_on_a_stage_with_other_values(interrupted, tmp_path, capsys):
    from qllava.cli import main

    run, overrides = copied(interrupted, tmp_path)
    before = files(run)
    finetune = ["finetune", str(TINY_RECIPE), "--stage", "2", *overrides]
    assert main([*finetune, "--resume", "stage2.learning_rate=1e-5", "stage2.max_steps=20"]) == 2
    out = capsys.readouterr().out
    assert "stage2.learning_rate: 1e-05 here, 0.002 when it started" in out
    assert "stage2.max_steps: 20 here, 8 when it started" in out
    assert (
        "give the values back: stage2.learning_rate=0.002 stage2.max_steps=8. To train with the new values, start "
        "it over: --stage 2 --overwrite" in out
    )
    # the kept stage 1 that stage 2 starts from: with --resume, and with --stage 2 --overwrite (which must not remove
    # stage 2 before refusing)
    for flag in ("--resume", "--overwrite"):
        assert main([*finetune, flag, "stage1.learning_rate=1e-2"]) == 2
        out = capsys.readouterr().out
        assert "stage1.learning_rate: 0.01 here, 0.003 when it was trained" in out
        assert "--overwrite (both stages)" in out
    assert files(run) == before  # nothing written, nothing removed


def test_resume_passes_over_an_incomplete_checkpoint_and_takes_the_new_logging(interrupted, tmp_path, capsys):
    from qllava.cli import main

    run, overrides = copied(interrupted, tmp_path)
    started = (run / "stage2" / "recipe.toml").read_text().replace(str(interrupted[0]), str(run))
    assert (
        main(
            [
                "finetune",
                str(TINY_RECIPE),
                "--stage",
                "2",
                *overrides,
                "--resume",
                "stage2.logging_steps=1",
                "eval.limit=5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    checkpoints = run / "stage2" / "checkpoints"
    assert (
        f"stage2: {checkpoints / 'checkpoint-8'} is not complete (it lacks optimizer.pt): passed over for "
        "checkpoint-4" in out
    )
    assert (
        "stage2: changed since it started, without effect on what it learns: stage2.logging_steps (2 -> 1), "
        "eval.limit (0 -> 5)" in out
    )
    assert f"stage2: resuming from {checkpoints / 'checkpoint-4'}" in out
    history = json.loads((run / "stage2" / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 4, 5, 6, 7, 8]  # logging_steps 1 from the resume
    metrics = json.loads((run / "stage2" / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["resumed_at"] == [4]
    # the record: what was trained (the started values), with the last logging setting
    assert (run / "stage2" / "recipe.toml").read_text() == started.replace(
        "logging_steps = 2\nsave_steps = 4", "logging_steps = 1\nsave_steps = 4"
    ).replace("limit = 0", "limit = 5")


def test_ctrl_c_without_a_checkpoint_says_resume_starts_the_stage_over(
    trained_run, tiny_inputs, tmp_path, capsys, monkeypatch
):
    from qllava import train
    from qllava.cli import main
    from qllava.recipe import load_recipe

    run = fresh_run(trained_run, tmp_path, "no_checkpoint")
    argv = [
        "finetune",
        str(TINY_RECIPE),
        "--stage",
        "2",
        *tiny_overrides(tiny_inputs, run),
        *TRAINED_STAGE1,
        "eval.at=[]",
    ]  # the tiny recipe's save_steps = 0

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_stage", interrupt)
    assert main(argv) == 130
    assert capsys.readouterr().out.endswith(
        "interrupted; stage2 has no checkpoint to continue from (stage2.save_steps = 0 writes none), so --resume "
        f"starts it over from step 0; run it with:\n  qllava {shlex.join([*argv, '--resume'])}\n"
    )
    # the stage stored its recipe when it started
    assert load_recipe(run / "stage2" / "recipe.toml") == load_recipe(TINY_RECIPE, argv[4:])

    resumed_from = []

    def record(recipe, name, model, processor, rows, collator, progress=None, resume_from=None):
        resumed_from.append(resume_from)
        raise RuntimeError("recorded")

    monkeypatch.setattr(train, "train_stage", record)
    with pytest.raises(RuntimeError, match="recorded"):
        main([*argv, "--resume"])
    assert resumed_from == [None]
    assert (
        "stage2: no checkpoint to continue from (stage2.save_steps = 0 writes none): --resume starts it over from "
        "step 0" in capsys.readouterr().out
    )
