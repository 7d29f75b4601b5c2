"""The files a command will read, checked before it loads any model: every stage's data files and image folder,
the held-out questions, and the model checkpoints. A typo in stage 2's data must not surface after hours of stage 1,
nor a hub id that cannot be read offline as a raw traceback. Every problem is reported at once, each naming its
recipe key and the fix (RecipeError)."""

from __future__ import annotations

import re
from pathlib import Path

from .folders import recipe_folder_problem
from .recipe import Recipe, RecipeError

# A hub id: "name" or "owner/name", no path syntax (a relative path with more parts is a missing local folder).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.fullmatch(name))


def check_inputs(recipe: Recipe, stages, weights: bool = True) -> None:
    """RecipeError listing every missing input of the stages about to run. `weights`: the model weights are
    loaded (finetune), not only the tokenizer and configs (data stats)."""
    problems = []
    for name in stages:
        cfg = getattr(recipe, name)
        problems += [f"{name}.data: {problem}" for path in cfg.data if (problem := data_problem(path))]
        if cfg.image_folder and not Path(cfg.image_folder).is_dir():
            problems.append(f"{name}.image_folder: {cfg.image_folder}: folder not found")
    if weights and recipe.eval.at:
        if not Path(recipe.eval.data).is_file():
            problems.append(f"eval.data: {recipe.eval.data}: file not found")
        if recipe.eval.image_folder and not Path(recipe.eval.image_folder).is_dir():
            problems.append(f"eval.image_folder: {recipe.eval.image_folder}: folder not found")
    problems += model_problems(recipe, weights)
    if problems:
        raise RecipeError(recipe.source, problems)


def data_problem(path: str) -> str | None:
    """Why a stage's data file cannot be read: a LLaVA JSON file, a dataset saved with save_to_disk, or a hub
    dataset (read when online)."""
    from .data import is_llava_json

    local = Path(path)
    if is_llava_json(path):
        return None if local.is_file() else f"{path}: file not found"
    if local.is_dir():
        return (
            None
            if any((local / f).exists() for f in ("dataset_info.json", "dataset_dict.json"))
            else f"{path}: not a dataset saved with save_to_disk (no dataset_info.json) nor a .json/.jsonl file"
        )
    if local.exists() or not is_hub_id(path):
        return f"{path}: not found (a LLaVA .json/.jsonl file or a dataset folder)"
    if _offline():
        return (
            f"{path}: not a local file or folder, and HF_HUB_OFFLINE=1 forbids reading it from the hub: save it "
            "with save_to_disk while online and point the recipe at that folder"
        )
    return None


def model_problems(recipe: Recipe, weights: bool) -> list[str]:
    """Model checkpoints of the recipe that cannot be read. Without `weights`, the vision tower of the shipped
    recipes is not needed (its config and image processor ship with qllava)."""
    from .model import PACKAGED_CONFIGS

    cfg = recipe.model
    keys = ["llava"] if cfg.llava else ["vision_tower", "decoder"]
    if cfg.image_processor:
        keys.append("image_processor")
    if not weights and not cfg.llava and not cfg.image_processor and cfg.vision_tower in PACKAGED_CONFIGS:
        keys.remove("vision_tower")
    return [f"model.{key}: {problem}" for key in keys if (problem := checkpoint_problem(getattr(cfg, key), key))]


def checkpoint_problem(name: str, key: str) -> str | None:
    """Why a checkpoint (a local folder or a hub id) cannot be loaded, or None."""
    if Path(name).is_dir():
        return recipe_folder_problem(name, key)
    if Path(name).exists() or not is_hub_id(name):
        return f"{name}: folder not found"
    return _offline_problem(name, key)


def _offline_problem(repo: str, key: str) -> str | None:
    """A hub id is fine online (downloaded when loaded); offline, it must be in the Hugging Face cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("config.json", "preprocessor_config.json"))
    if cached or not _offline():
        return None
    return (
        f'"{repo}" is not a local folder, and it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) '
        f"while HF_HUB_OFFLINE=1 forbids downloading it: download it while online (`hf download {repo}`), or "
        f"set model.{key} to a local folder that holds it"
    )


def _offline() -> bool:
    from huggingface_hub import is_offline_mode

    return is_offline_mode()
