"""A run folder: its layout, which of its stages are complete, and which one is final.

    RUN/stage1, RUN/stage2   each: projector.safetensors, recipe.toml, base.json, processor files (stage 2 also
                             the PEFT adapter), log_history.json, loss.png, checkpoints/, and metrics.json, written
                             last: a stage is complete when it is there
    RUN/metrics.json         each stage's metrics and the held-out scores
    RUN/eval                 answers files of `qllava eval` on the run

finetune claims the folder and writes it; merge, chat, eval and resume ask it which stage to use.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

STAGES = ("stage1", "stage2")


class RunExistsError(FileExistsError):
    pass


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @staticmethod
    def holds_run(path) -> bool:
        """Whether a folder is a run folder (it has a stage folder), as opposed to a model folder."""
        return any((Path(path) / stage).is_dir() for stage in STAGES)

    def stage(self, name: str) -> Path:
        return self.path / name

    def complete(self, name: str) -> bool:
        """A stage's metrics.json is written last: with it, everything else of the stage is there."""
        return (self.stage(name) / "metrics.json").exists()

    def final_stage(self) -> Path:
        """The last stage of the run, which merge, chat and eval use: complete, or an error saying what to do."""
        for name in reversed(STAGES):
            folder = self.stage(name)
            if self.complete(name):
                return folder
            if folder.is_dir():
                raise FileNotFoundError(
                    f"{folder} is not complete (no metrics.json: training stopped before the "
                    "end): finish it with `qllava finetune RECIPE --resume`, or remove it"
                )
        raise FileNotFoundError(
            f"{self.path} is not a qllava run folder: no complete stage1/ or stage2/ (run qllava finetune first)"
        )

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    def checkpoints(self, name: str) -> Path:
        return self.stage(name) / "checkpoints"

    def check_claim(self, stages, overwrite: bool, resume: bool) -> None:
        """Refuse, before any work, to run `stages` over finished ones unless --overwrite or --resume says how."""
        if resume and overwrite:
            raise RunExistsError("--resume continues a run and --overwrite replaces it: pass one of them")
        existing = self._existing(stages)
        if existing and not (overwrite or resume):
            many = len(existing) > 1
            raise RunExistsError(
                f"{', '.join(map(str, existing))} {'exist' if many else 'exists'}: pass --overwrite "
                f"to replace {'them' if many else 'it'}, --resume to continue, or set output.dir to "
                "a new folder"
            )

    def claim(self, stages, overwrite: bool, resume: bool) -> None:
        """Make the folder ready for `stages`. Never overwrite a finished stage silently: --overwrite removes the
        stages about to run, and the answers of `qllava eval` on the run they replace (RUN/eval); --resume keeps
        them."""
        self.check_claim(stages, overwrite, resume)
        existing = self._existing(stages)
        if overwrite and existing:
            for folder in existing + [self.eval_dir]:
                shutil.rmtree(folder, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def _existing(self, stages) -> list[Path]:
        return [self.stage(s) for s in stages if self.stage(s).exists()]
