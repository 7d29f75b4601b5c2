"""What kind of folder a path is, and what to pass instead when a command or a recipe key is given the wrong kind.

Users mix up qllava's folders: a run (RUN with stage1/, stage2/), a stage of a run (RUN/stage2), a merged model
(`qllava merge`'s output: config.json + qllava.json), a llava-hf checkpoint, a decoder, a vision tower. Each is
told apart from its files (config.json's model_type and architectures; no weights are read), so that a wrong one
is one line saying what it is and what to pass, before anything is loaded, instead of a library's traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .run import STAGES, RunFolder

LLAVA_TYPES = ("llava", "llava_next")
VISION_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model", "dinov2")
QLLAVA_FILE = "qllava.json"
"""What `qllava merge` writes beside the weights (template, image settings, the source run)."""

RUN_HINT = "a run folder written by qllava finetune (runs/NAME)"
MODEL_HINT = "a run folder (runs/NAME) or a merged one (qllava merge RUN --out DIR)"


class FolderError(ValueError):
    """A path that is not the kind of folder the command or recipe key takes."""


@dataclass(frozen=True)
class Folder:
    path: Path
    kind: str
    """run, stage, merged, llava, decoder, vision_tower, checkpoint (another model), file, missing or other."""
    model_type: str = ""

    @property
    def run(self) -> Path:
        """The run folder a run or a stage belongs to."""
        return self.path.parent if self.kind == "stage" else self.path

    def describe(self) -> str:
        """What the folder is, as a sentence's object: "a decoder checkpoint (mistral)"."""
        return {
            "run": "a qllava run",
            "stage": f"{self.path.name} of the qllava run {self.path.parent}",
            "merged": "a merged qllava model (written by qllava merge)",
            "llava": f"a LLaVA checkpoint ({self.model_type})",
            "decoder": f"a decoder checkpoint ({self.model_type})",
            "vision_tower": f"a vision tower checkpoint ({self.model_type})",
            "checkpoint": f"a {self.model_type} checkpoint, not a LLaVA model",
            "file": "a file, not a folder",
            "missing": "not found",
            "other": "neither a qllava run (no stage1/ or stage2/) nor a model folder (no config.json)",
        }[self.kind]


def folder_kind(path: str | Path) -> Folder:
    """The kind of folder at `path`, from its layout and its config.json alone."""
    path = Path(path)
    if not path.exists():
        return Folder(path, "missing")
    if not path.is_dir():
        return Folder(path, "file")
    if RunFolder.holds_run(path):
        return Folder(path, "run")
    if path.name in STAGES and RunFolder.holds_run(path.parent):
        return Folder(path, "stage")
    if not (path / "config.json").is_file():
        return Folder(path, "other")
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError:
        return Folder(path, "other")
    model_type = str(config.get("model_type", "?"))
    return Folder(path, _model_kind(path, config, model_type), model_type)


def _model_kind(path: Path, config: dict, model_type: str) -> str:
    if model_type in LLAVA_TYPES:
        return "merged" if (path / QLLAVA_FILE).is_file() else "llava"
    if "text_config" in config:  # another vision-language model
        return "checkpoint"
    if "vision_config" in config or model_type in VISION_TYPES or model_type.endswith("_vision_model"):
        return "vision_tower"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or ()):
        return "decoder"
    return "checkpoint"


def check_model_folder(path: str | Path) -> Folder:
    """A folder chat, eval and serve can load (a run, a merged folder, a llava-hf checkpoint), or FolderError
    saying what it is and what to pass."""
    folder = folder_kind(path)
    if folder.kind in ("run", "merged", "llava"):
        return folder
    if folder.kind == "stage":
        advice = f"pass the run folder, {folder.run}"
    elif folder.kind in ("decoder", "vision_tower"):
        key = "model.decoder" if folder.kind == "decoder" else "model.vision_tower"
        advice = f"pass {MODEL_HINT}; this checkpoint goes in a recipe's {key}"
    else:
        advice = f"pass {MODEL_HINT}, or a llava-hf checkpoint"
    raise FolderError(f"{folder.path} is {folder.describe()}: {advice}")


def check_run_folder(path: str | Path) -> Folder:
    """A run folder `qllava merge` can merge, or FolderError saying what the folder is and what to pass."""
    folder = folder_kind(path)
    if folder.kind == "run":
        return folder
    if folder.kind == "stage":
        advice = f"merge the whole run: qllava merge {folder.run} --out DIR"
    elif folder.kind == "merged":
        source = _merged_from(folder.path)
        advice = "it is merged already: chat, eval and serve take it as it is" + (
            f"; to merge again, pass its run, {source}" if source else ""
        )
    elif folder.kind == "llava":
        advice = "there is nothing to merge: chat, eval and serve take it as it is"
    else:
        advice = f"merge takes {RUN_HINT}"
    raise FolderError(f"{folder.path} is {folder.describe()}: {advice}")


# The recipe key each kind of checkpoint belongs in.
RECIPE_KEYS = {
    "decoder": "model.decoder",
    "vision_tower": "model.vision_tower",
    "llava": "model.llava",
    "merged": "model.llava",
}


def recipe_folder_problem(name: str, key: str) -> str | None:
    """Why the local folder a recipe's `key` (llava, decoder, vision_tower) names is the wrong kind, or None.
    Hub ids, missing folders and checkpoints of unknown kinds are left to the loaders' own checks."""
    if key not in ("llava", "decoder", "vision_tower"):  # image_processor may be any of them
        return None
    folder = folder_kind(name)
    if folder.kind in ("missing", "file", "other", "checkpoint") or RECIPE_KEYS.get(folder.kind) == f"model.{key}":
        return None
    if folder.kind in ("run", "stage"):
        advice = f"merge it first (qllava merge {folder.run} --out DIR), then point model.llava at the merged folder"
    else:
        advice = f"set it as {RECIPE_KEYS[folder.kind]}"
        if key == "llava":
            advice += " and leave model.llava empty"
        elif folder.kind in ("llava", "merged"):
            advice += " (model.decoder and model.vision_tower are then not used)"
    return f"{name} is {folder.describe()}: {advice}"


def check_recipe_folders(cfg) -> None:
    """FolderError naming the first [model] key (`cfg`: a ModelConfig) that points at the wrong kind of folder."""
    keys = ["llava"] if cfg.llava else ["decoder", "vision_tower"]
    for key in keys:
        problem = recipe_folder_problem(getattr(cfg, key), key)
        if problem:
            raise FolderError(f"model.{key}: {problem}")


def _merged_from(path: Path) -> str:
    try:
        return str(json.loads((path / QLLAVA_FILE).read_text()).get("source_run", ""))
    except (OSError, ValueError):
        return ""
