"""What `qllava finetune` may continue or build on, decided before any work is done.

Each stage stores its resolved recipe (RUN/stageN/recipe.toml) when it starts. A stage continued from a checkpoint
must get the values that change what it learns as it started with them: its checkpoints hold that optimizer,
schedule and data position, so a new learning rate or max_steps would be recorded but not trained. A kept stage
that a stage about to train starts from (stage 1, whose projector stage 2 starts from) is checked the same way.
Values that do not change what a stage learns (recipe.NOT_TRAINING, [eval], [data], [output]) may change, and
are named. A checkpoint is used only when it holds every file a resume reads (trainer.checkpoint_problem); newer
incomplete ones are named and passed over.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from .recipe import Recipe, changed_values, load_recipe, toml_override, trains
from .run import RunFolder
from .trainer import checkpoint_problem, checkpoints

RECIPE_FILE = "recipe.toml"


class ResumeError(ValueError):
    """A run that cannot be continued or built on as asked; the message names the keys or files and what to do."""


def store_recipe(recipe: Recipe, stage_dir: Path) -> None:
    """The stage's resolved recipe, written to a private name, then renamed into place."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    partial = stage_dir / f"{RECIPE_FILE}.partial-{os.getpid()}"
    partial.write_text(recipe.to_toml())
    partial.replace(stage_dir / RECIPE_FILE)


def resume_points(recipe: Recipe, run: RunFolder, names, say=print) -> dict[str, Path]:
    """The checkpoint each of the stages `names` continues from (a stage without one starts at step 0): the newest
    complete one, after saying which newer ones are passed over and why. Checkpoints none of which is complete are
    refused, naming the file each lacks."""
    points = {}
    for name in names:
        found = [
            (checkpoint, checkpoint_problem(checkpoint, lora=name == "stage2"))
            for checkpoint in checkpoints(run.checkpoints(name))
        ]
        complete = next((checkpoint for checkpoint, problem in found if problem is None), None)
        passed = [(checkpoint, problem) for checkpoint, problem in found if problem]
        if found and complete is None:
            reasons = "; ".join(f"{checkpoint.name}: {problem}" for checkpoint, problem in passed)
            raise ResumeError(
                f"{run.checkpoints(name)}: no checkpoint there is complete ({reasons}). Put the file "
                f"back, or remove {run.checkpoints(name)} to train {name} again from step 0 "
                "(with --resume; finished stages are kept)"
            )
        for checkpoint, problem in passed:
            if _step(checkpoint) > _step(complete):
                say(f"{name}: {checkpoint} is not complete ({problem}): passed over for {complete.name}")
        if complete:
            points[name] = complete
        elif run.stage(name).is_dir():
            say(f"{name}: {no_checkpoint(recipe, run, name)}: --resume starts it over from step 0")
    return points


def no_checkpoint(recipe: Recipe, run: RunFolder, name: str) -> str:
    """That a begun stage has no checkpoint to continue from, naming the setting that left it without one."""
    save_steps = getattr(_started_recipe(run, name) or recipe, name).save_steps
    why = f"{name}.save_steps = 0 writes none" if not save_steps else f"the first is written at step {save_steps}"
    return f"no checkpoint to continue from ({why})"


def interrupted_note(recipe: Recipe, stages) -> str | None:
    """After Ctrl-C: why --resume would start the unfinished stage over, when it would (it has begun but has no
    checkpoint), else None."""
    run = RunFolder(recipe.run_dir)
    name = next((name for name in stages if not run.complete(name)), None)
    if name is None or not run.stage(name).is_dir() or checkpoints(run.checkpoints(name)):
        return None  # not begun (nothing lost), or --resume continues it (or names what its checkpoint lacks)
    return f"{name} has {no_checkpoint(recipe, run, name)}, so --resume starts it over from step 0"


def check_recipe(recipe: Recipe, run: RunFolder, names, points: dict[str, Path], say=print) -> None:
    """Refuse, naming every key with the value to give back and how to start over instead, to continue a stage from
    its checkpoint with values that change what it learns, or to train stage 2 from a kept stage 1 that was trained
    with other values. Name the other values that changed since a continued stage started."""
    paragraphs, reported = [], set()
    for name in points:
        started = _started_recipe(run, name)
        if started is None:
            say(
                f"{name}: {run.stage(name) / RECIPE_FILE} is missing (the stage was begun by an older qllava): it "
                "continues without checking that the recipe is the one it started with"
            )
            continue
        changed = changed_values(started, recipe)
        differ = [change for change in changed if trains(name, change[0])]
        reported |= {key for key, _, _ in differ}
        if differ:
            start_over = "--stage 2 --overwrite (stage 1 is kept)" if name == "stage2" else "--overwrite"
            paragraphs.append(
                _refusal(
                    f"{run.stage(name)} cannot be continued with this recipe: its checkpoints hold the optimizer, "
                    f"schedule and data position of the values it started with ({run.stage(name) / RECIPE_FILE}), "
                    "and these values, which change what it learns, differ:",
                    differ,
                    "when it started",
                    "continue it",
                    f"train with the new values, start it over: {start_over}",
                )
            )
        others = [
            f"{key} ({_shown(key, old)} -> {_shown(key, new)})" for key, old, new in changed if not trains(name, key)
        ]
        if others and not paragraphs:
            say(f"{name}: changed since it started, without effect on what it learns: {', '.join(others)}")
    if "stage2" in names and "stage1" not in names and recipe.stage2.projector == "stage1" and run.complete("stage1"):
        trained = _started_recipe(run, "stage1")
        differ = (
            [
                change
                for change in changed_values(trained, recipe)
                if trains("stage1", change[0]) and change[0] not in reported
            ]
            if trained
            else []
        )
        if differ:
            paragraphs.append(
                _refusal(
                    f"stage 2 starts from the projector of {run.stage('stage1')}, which was trained with other "
                    f"values than this recipe's ({run.stage('stage1') / RECIPE_FILE}):",
                    differ,
                    "when it was trained",
                    "train stage 2 from it",
                    "use the new values, train stage 1 again: --overwrite (both stages)",
                )
            )
    if paragraphs:
        raise ResumeError("\n".join(paragraphs))


def _refusal(header: str, differ: list, when: str, keep: str, change: str) -> str:
    """The header, a line per key (the value given, the value trained), and both ways on: the values to give back
    to `keep` going, and how to `change` to the new values."""
    lines = [f"  - {key}: {_shown(key, new)} here, {_shown(key, old)} {when}" for key, old, new in differ]
    back = " ".join(_given_back(key, old) for key, old, _ in differ)
    return "\n".join([header, *lines, f"To {keep}, give the values back: {back}. To {change}."])


def _given_back(key: str, value) -> str:
    """How the command line (or the recipe) gives a key its old value back."""
    return f"(remove {key} from the recipe)" if value is None else shlex.quote(toml_override(key, value))


def _shown(key: str, value) -> str:
    return "unset" if value is None else toml_override(key, value).partition("=")[2]


def _started_recipe(run: RunFolder, name: str) -> Recipe | None:
    path = run.stage(name) / RECIPE_FILE
    return load_recipe(path) if path.is_file() else None


def _step(checkpoint: Path | None) -> int:
    return int(checkpoint.name.rpartition("-")[2]) if checkpoint else -1
