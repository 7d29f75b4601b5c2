"""A corpus of bad inputs, each with its expected outcome: an error naming the file, TOML key or sample and how to
fix it (exit status 2, no traceback), or a skip counted by reason and reported when the data are loaded.
Nothing mis-trains silently."""

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, tiny_overrides
from PIL import Image

from qllava.cli import main


@dataclass
class Case:
    name: str
    setup: Callable  # (tmp, tiny_inputs, trained_run) -> argv
    message: str  # expected in the output
    status: int = 2  # 2: refused with an error; 0: ran, the bad sample skipped and counted


def write(tmp: Path, samples, name="data.json") -> Path:
    path = tmp / name
    path.write_text(json.dumps(samples) if not isinstance(samples, str) else samples)
    return path


def chat(sample_id, q="What color is the shape?", a="red", image="eval-0.png"):
    sample = {"id": sample_id, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image:
        sample["image"] = image
    return sample


GOOD = chat("good", "<image>\nWhat color is the shape?")


def stats_on(samples, *extra):
    """`qllava data stats` on stage-2 data made of `samples` plus one good sample (so the stage is not empty)."""

    def setup(tmp, tiny, _run):
        data = write(tmp, samples + [GOOD]) if isinstance(samples, list) else write(tmp, samples)
        return [
            "data",
            "stats",
            str(TINY_RECIPE),
            "--stage",
            "2",
            *tiny_overrides(tiny, tmp / "run"),
            f'stage2.data=["{data}"]',
            f'stage2.image_folder="{tmp / "images"}"',
            *extra,
        ]

    return setup


def stats_on_dataset(images_per_row: list[int]):
    """`qllava data stats` on stage-2 data saved as a Hugging Face dataset: one question per row about that many
    images (each an image part of the question, each image stored in the row)."""

    def setup(tmp, tiny, _run):
        import datasets

        picture = {"bytes": (tiny / "shapes" / "images" / "eval-0.png").read_bytes(), "path": None}
        question = {"type": "text", "text": "What color is the shape?"}
        messages = [
            [
                {"role": "user", "content": [{"type": "image", "text": None}] * n + [question]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            ]
            for n in images_per_row
        ]
        features = datasets.Features(
            {
                "messages": [
                    {
                        "role": datasets.Value("string"),
                        "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
                    }
                ],
                "images": datasets.List(datasets.Image()),
            }
        )
        datasets.Dataset.from_dict(
            {"messages": messages, "images": [[picture] * n for n in images_per_row]}, features=features
        ).save_to_disk(str(tmp / "dataset"))
        return [
            "data",
            "stats",
            str(TINY_RECIPE),
            "--stage",
            "2",
            *tiny_overrides(tiny, tmp / "run"),
            f'stage2.data=["{tmp / "dataset"}"]',
        ]

    return setup


def recipe_with(*extra):
    def setup(tmp, tiny, _run):
        return ["finetune", str(TINY_RECIPE), *tiny_overrides(tiny, tmp / "run"), *extra]

    return setup


def without_synthetic(*command):
    """The tiny recipe with a hub id for its decoder and no [synthetic] table (which would write a decoder there)."""

    def setup(tmp, tiny, _run):
        from qllava.recipe import load_recipe

        recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny, tmp / "run"))
        recipe.synthetic = None
        recipe.model.decoder = "mistralai/Mistral-7B-v0.1"
        (tmp / "hub.toml").write_text(recipe.to_toml())
        return [*command, str(tmp / "hub.toml")]

    return setup


def bad_toml(tmp, tiny, _run):
    path = tmp / "bad.toml"
    path.write_text(TINY_RECIPE.read_text().replace("[lora]\nr = 8", "[lora]\nr = = 8"))
    return ["finetune", str(path)]


def merge_against_another_base(tmp, tiny, run):
    moved = tmp / "run_copy"
    shutil.copytree(run, moved)
    other = tmp / "other_decoder"
    shutil.copytree(tiny / "mistral", other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    weights = {k: v * 1.01 for k, v in weights.items()}  # same shapes, other weights: only a fingerprint tells
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    recipe = moved / "stage2" / "recipe.toml"
    recipe.write_text(recipe.read_text().replace(f'decoder = "{tiny / "mistral"}"', f'decoder = "{other}"'))
    return ["merge", str(moved), "--out", str(tmp / "merged"), "--no-verify"]


def chat_with(image):
    """chat about an image file with these bytes (None: no file), or the named file of the images folder."""

    def setup(tmp, tiny, run):
        path = tmp / "images" / image if isinstance(image, str) else tmp / "picture.png"
        if isinstance(image, bytes):
            path.write_bytes(image)
        return ["chat", str(run), "--image", str(path), "--prompt", "What color?"]

    return setup


def eval_file(content, benchmark="pope"):
    def setup(tmp, tiny, run):
        path = write(tmp, content, "questions.jsonl")
        return [
            "eval",
            str(run),
            "--benchmark",
            benchmark,
            "--data",
            str(path),
            "--images",
            str(tiny / "shapes" / "images"),
        ]

    return setup


CASES = [
    Case("toml syntax error, with its line", bad_toml, "not valid TOML: "),
    Case("unknown key", recipe_with("lora.rnak=8"), 'lora.rnak: unknown key, did you mean "r"?'),
    Case("wrong type", recipe_with('lora.r="eight"'), "lora.r: expected an integer, got a string 'eight'"),
    Case("learning rate <= 0", recipe_with("stage2.learning_rate=0"), "stage2.learning_rate: must be > 0, got 0.0"),
    Case("r = 0", recipe_with("lora.r=0"), "lora.r: must be > 0, got 0"),
    Case("unknown template", recipe_with('stage2.template="chatml"'), "stage2.template: 'chatml' is not one of"),
    Case("missing recipe file", lambda tmp, tiny, run: ["finetune", str(tmp / "nope.toml")], "recipe file not found"),
    Case(
        "max_seq_len shorter than an image",
        stats_on([], "stage2.max_seq_len=10"),
        "stage2.max_seq_len: 10 is shorter than one image's 16 tokens plus text",
    ),
    Case(
        "missing dataset file",
        lambda tmp, tiny, run: stats_on([])(tmp, tiny, run) + ['stage2.data=["/nope/data.json"]'],
        "stage2.data: /nope/data.json: file not found",
    ),
    Case("JSON that is not a list", stats_on('{"id": 1}'), "expected a JSON list of LLaVA samples"),
    Case(
        "sample without conversations",
        stats_on([{"id": "no-conv", "image": "eval-0.png"}]),
        'skipped 1: no "conversations" list (e.g. no-conv)',
        0,
    ),
    Case(
        "missing image file",
        stats_on([chat("no-file", image="missing.png")], "data.max_missing_image_fraction=0.5"),
        "skipped 1: image file not found under the image folder",
        0,
    ),
    Case(
        "corrupt image file",
        stats_on([chat("corrupt", image="corrupt.png")], "data.max_missing_image_fraction=0.5"),
        "skipped 1: image file cannot be read as an image (e.g. corrupt)",
        0,
    ),
    Case(
        "more images missing than data.max_missing_image_fraction",
        stats_on([chat("no-file", image="missing.png")]),
        "stage2: the images of 1 of the 2 samples that name one are missing or unreadable (50.0%, more than "
        "data.max_missing_image_fraction = 0.05): 1 image file not found under the image folder",
    ),
    Case(
        "an image over PIL's decompression-bomb limit",
        stats_on([chat("huge", image="huge.png")], "data.max_missing_image_fraction=0.5"),
        "skipped 1: image larger than PIL's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS pixels) "
        "(e.g. huge)",
        0,
    ),
    Case(
        "a missing stage image folder",
        recipe_with('stage1.image_folder="/nope/images"'),
        "stage1.image_folder: /nope/images: folder not found",
    ),
    Case(
        "a typo in stage 2's data, found before stage 1 trains",
        recipe_with('stage2.data=["/nope/questions.json"]'),
        "stage2.data: /nope/questions.json: file not found",
    ),
    Case(
        "a missing held-out image folder, found before training",
        recipe_with('eval.image_folder="/nope"'),
        "eval.image_folder: /nope: folder not found",
    ),
    Case(
        "held-out images not in their folder, found before training",
        lambda tmp, tiny, run: recipe_with(f'eval.image_folder="{tmp / "images"}"')(tmp, tiny, run),
        "eval.image_folder: the images of 71 of 72 questions are not in",
    ),
    Case(
        "a hub id not cached while offline (finetune)",
        without_synthetic("finetune"),
        'model.decoder: "mistralai/Mistral-7B-v0.1" is not a local folder, and it is not in the Hugging Face cache',
    ),
    Case(
        "a hub id not cached while offline (data stats)",
        without_synthetic("data", "stats"),
        "while HF_HUB_OFFLINE=1 forbids downloading it: download it while online (`hf download "
        "mistralai/Mistral-7B-v0.1`), or set model.decoder to a local folder that holds it",
    ),
    Case(
        "no assistant turn",
        stats_on([{"id": "q-only", "conversations": [{"from": "human", "value": "Hi"}]}]),
        "skipped 1: the conversation has no assistant turn to train on (e.g. q-only)",
        0,
    ),
    Case(
        "two images in a LLaVA JSON sample",
        stats_on([chat("two-images", "<image>\nand <image>", "red", ["eval-0.png", "eval-0.png"])]),
        "skipped 1: more than one image (one image per sample) (e.g. two-images)",
        0,
    ),
    Case(
        "two images in a Hugging Face dataset's row",
        stats_on_dataset([2, 1, 3]),
        "skipped 2: more than one image (one image per sample) (e.g. dataset[0], dataset[2])",
        0,
    ),
    Case(
        "two <image> tags",
        stats_on([chat("two-tags", "<image> and <image>")]),
        "skipped 1: more than one <image> tag (one image per sample) (e.g. two-tags)",
        0,
    ),
    Case(
        "<image> in an assistant turn",
        stats_on([chat("tag-answer", a="red <image>")]),
        "skipped 1: <image> in an assistant turn (e.g. tag-answer)",
        0,
    ),
    Case(
        "sample longer than max_seq_len",
        stats_on([chat("long", a=" ".join(["red"] * 400))]),
        "skipped 1: longer than max_seq_len (256 tokens, image tokens included) (e.g. long)",
        0,
    ),
    Case(
        "empty assistant text (nothing to train on)",
        stats_on([chat("empty", a="")]),
        "skipped 1: an assistant turn is empty (e.g. empty)",
        0,
    ),
    Case("empty user text", stats_on([chat("empty-q", q="")]), "skipped 1: a user turn is empty (e.g. empty-q)", 0),
    Case(
        "a template separator inside a turn",
        stats_on([chat("sep", a="yes [/INST] no")]),
        "skipped 1: a turn holds the template's separator '[/INST]' (official LLaVA would mask the whole sample) "
        "(e.g. sep)",
        0,
    ),
    Case(
        "a special token as text",
        stats_on([chat("eos", a="yes</s>")]),
        "skipped 1: a turn holds the special token '</s>' as text (e.g. eos)",
        0,
    ),
    Case(
        "empty dataset after filtering",
        stats_on([{"id": "x"}, chat("y", a="")], "stage2.max_seq_len=20"),
        "stage2: no trainable samples left in",
    ),
    Case("merge against a mismatched base", merge_against_another_base, "is not the one"),
    Case("chat with an unreadable image", chat_with(b"GIF89a nonsense"), "cannot be read as an image"),
    Case("chat with a missing image", chat_with(None), "picture.png: file not found"),
    Case(
        "eval file in the wrong benchmark format",
        eval_file('{"question": "x"}\n'),
        "not a pope question file in LLaVA's format",
    ),
    Case(
        "eval image missing",
        eval_file(
            json.dumps(
                {"question_id": 1, "image": "nope.png", "text": "Is it red?", "label": "yes", "category": "random"}
            )
            + "\n"
        ),
        "--images: the images of 1 of 1 questions are not in",
    ),
    Case(
        "chat with an image over PIL's decompression-bomb limit",
        chat_with("huge.png"),
        "huge.png: too large to decode safely: Image size (10000 pixels) exceeds limit of 9600 pixels",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, tmp_path, tiny_inputs, trained_run, capsys, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(tiny_inputs / "shapes" / "images" / "eval-0.png", images)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.new("L", (100, 100)).save(images / "huge.png")
    # huge.png's 10,000 pixels: over twice the limit, as a bomb is; the 72 x 64 shapes stay under it (no warning)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4800)
    monkeypatch.setattr("qllava.model.load_base_model", no_model)
    status = main(case.setup(tmp_path, tiny_inputs, trained_run))
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert status == case.status, out.out[-1500:]
    assert case.message in " ".join(out.out.split()), out.out[-1500:]
    if status == 2:
        assert out.out.startswith("error: ") or "\nerror: " in out.out


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the bad input was found")


def test_grayscale_rgba_and_palette_images_train(tmp_path, tiny_inputs):
    images = tmp_path / "images"
    images.mkdir()
    source = Image.open(tiny_inputs / "shapes" / "images" / "eval-0.png")
    samples = []
    for mode in ("L", "RGBA", "P", "CMYK"):
        source.convert(mode).save(images / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
        samples.append(
            chat(mode, "<image>\nWhat color is the shape?", image=f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
        )
    data = write(tmp_path, samples)
    status = main(
        [
            "finetune",
            str(TINY_RECIPE),
            "--stage",
            "1",
            *tiny_overrides(tiny_inputs, tmp_path / "run"),
            f'stage1.data=["{data}"]',
            f'stage1.image_folder="{images}"',
            "stage1.max_steps=2",
            "eval.at=[]",
            'stage1.template="plain"',
        ]
    )
    assert status == 0
    metrics = json.loads((tmp_path / "run" / "stage1" / "metrics.json").read_text())
    assert metrics["data"]["used"] == 4 and metrics["data"]["skipped"] == {}


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 20
