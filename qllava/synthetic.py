"""The demo's synthetic visual-question dataset: one coloured shape per picture, written as LLaVA JSON + PNG.

Deterministic from a seed. Stage 1 gets captions ("a red circle on the left"), stage 2 gets 1-3 questions
per image about colour, shape and position (plus a few text-only samples, as LLaVA's mix has), and the
held-out split is drawn from another seed with every (colour, shape, side, question) combination equally
often, so that a model blind to the image scores exactly chance. Nothing downstream knows these are
synthetic: the files are read by the normal LLaVA JSON loader.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from . import tiny

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
QUESTIONS = {
    "color": ("What color is the shape?", tuple(COLORS)),
    "shape": ("What shape is in the image?", SHAPES),
    "position": ("Is the shape on the left or the right?", SIDES),
}
TEXT_ONLY = [
    ("Which colors can the shapes have?", "red, green, blue or yellow"),
    ("Which shapes can appear in the pictures?", "circle, square or triangle"),
    ("Where can the shape be?", "on the left or on the right"),
]
IMAGE_SIZE = (72, 64)  # not square on purpose: LLaVA's "pad" preprocessing is exercised
# LLaVA-NeXT's anyres tiles an image by its aspect ratio: its data come in several (width, height).
NEXT_IMAGE_SIZES = ((72, 64), (96, 48), (48, 96), (64, 64), (112, 56))
SPLIT_SEED_OFFSET = {"train": 0, "eval": 1_000_003}


def write_shapes_dataset(
    data_dir: Path, train_samples: int, eval_samples: int, seed: int, image_sizes=(IMAGE_SIZE,)
) -> dict[str, Path]:
    """Write images/, captions.json (stage 1), questions.json (stage 2), eval.json (held out); return the paths.
    Each picture has one of `image_sizes` (width, height)."""
    data_dir = Path(data_dir)
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + SPLIT_SEED_OFFSET["train"])
    train = [_random_scene(rng, image_sizes) for _ in range(train_samples)]
    captions = [_caption_sample(f"train-{i}", scene) for i, scene in enumerate(train)]
    questions = [_question_sample(f"train-{i}", scene, rng) for i, scene in enumerate(train)]
    questions += [_text_only_sample(f"text-{i}", rng) for i in range(max(1, train_samples // 20))]
    rng.shuffle(questions)
    eval_rng = random.Random(seed + SPLIT_SEED_OFFSET["eval"])
    held_out = [_eval_sample(i, eval_rng, image_sizes) for i in range(eval_samples)]
    for sample, scene in [(c, s) for c, s in zip(captions, train)] + [(e, e.pop("_scene")) for e in held_out]:
        _draw(scene).save(data_dir / "images" / sample["image"])
    paths = {
        "captions": data_dir / "captions.json",
        "questions": data_dir / "questions.json",
        "eval": data_dir / "eval.json",
    }
    for name, samples in (("captions", captions), ("questions", questions), ("eval", held_out)):
        paths[name].write_text(json.dumps(samples, indent=1))
    return paths


def corpus(data_dir: Path) -> list[str]:
    """Every text of the written dataset (for training the tiny tokenizer)."""
    texts = []
    for name in ("captions.json", "questions.json", "eval.json"):
        for sample in json.loads((Path(data_dir) / name).read_text()):
            texts += [turn["value"].replace("<image>", "") for turn in sample["conversations"]]
    return texts


def _random_scene(rng: random.Random, image_sizes=(IMAGE_SIZE,)) -> dict:
    scene = {
        "color": rng.choice(list(COLORS)),
        "shape": rng.choice(SHAPES),
        "side": rng.choice(SIDES),
        "size": rng.randint(18, 26),
        "jitter": (rng.randint(-5, 5), rng.randint(-12, 12)),
        "noise_seed": rng.randrange(1 << 30),
    }
    # One size draws nothing more: the demo's data stay what they were.
    scene["image_size"] = rng.choice(image_sizes) if len(image_sizes) > 1 else image_sizes[0]
    return scene


def _caption_sample(sample_id: str, scene: dict) -> dict:
    caption = f"a {scene['color']} {scene['shape']} on the {scene['side']}"
    return {
        "id": sample_id,
        "image": f"{sample_id}.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": caption},
        ],
    }


def _question_sample(sample_id: str, scene: dict, rng: random.Random) -> dict:
    kinds = rng.sample(list(QUESTIONS), rng.randint(1, 3))
    turns = []
    for i, kind in enumerate(kinds):
        question = QUESTIONS[kind][0]
        turns += [
            {"from": "human", "value": ("<image>\n" if i == 0 else "") + question},
            {"from": "gpt", "value": _answer(scene, kind)},
        ]
    return {"id": sample_id, "image": f"{sample_id}.png", "conversations": turns}


def _text_only_sample(sample_id: str, rng: random.Random) -> dict:
    question, answer = rng.choice(TEXT_ONLY)
    return {"id": sample_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _eval_sample(i: int, rng: random.Random, image_sizes=(IMAGE_SIZE,)) -> dict:
    # Walk every combination in turn so each attribute and question kind is balanced in the split.
    kind = list(QUESTIONS)[i % 3]
    scene = _random_scene(rng, image_sizes)
    scene.update(color=list(COLORS)[(i // 3) % 4], shape=SHAPES[(i // 12) % 3], side=SIDES[(i // 36) % 2])
    question, options = QUESTIONS[kind]
    sample_id = f"eval-{i}"
    return {
        "id": sample_id,
        "image": f"{sample_id}.png",
        "category": kind,
        "options": list(options),
        "conversations": [
            {"from": "human", "value": "<image>\n" + question},
            {"from": "gpt", "value": _answer(scene, kind)},
        ],
        "_scene": scene,
    }


def _answer(scene: dict, kind: str) -> str:
    return {"color": scene["color"], "shape": scene["shape"], "position": scene["side"]}[kind]


def _draw(scene: dict) -> Image.Image:
    width, height = scene["image_size"]
    noise = random.Random(scene["noise_seed"])
    image = Image.new("RGB", (width, height), tuple(235 + noise.randint(-10, 10) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    # Positions scale with the picture (the demo's 72 x 64 keeps them as they were); a shape stays inside.
    r = scene["size"] // 2 * min(width, height) // 64
    cx = (width // 4 if scene["side"] == "left" else 3 * width // 4) + scene["jitter"][0] * width // 72
    cy = height // 2 + scene["jitter"][1] * height // 64
    fill = COLORS[scene["color"]]
    box = (cx - r, cy - r, cx + r, cy + r)
    if scene["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif scene["shape"] == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def prepare(synthetic, vision_tower: str, decoder: str, say=print, llava: str = "") -> None:
    """Write the dataset and tiny checkpoints the recipe names, unless identical ones are already there: the tower
    and the decoder, and with `synthetic.llava_next` a LLaVA-NeXT checkpoint made of them at `llava`.

    A marker file records what was written; a folder without one is never overwritten. Each folder is written
    under a private name and renamed into place, so that a chat, serve or finetune reading it meanwhile never
    finds half a file.
    """
    data_dir = Path(synthetic.data_dir)
    sizes = NEXT_IMAGE_SIZES if synthetic.llava_next else (IMAGE_SIZE,)
    data_key = {
        "version": FORMAT_VERSION,
        "train_samples": synthetic.train_samples,
        "eval_samples": synthetic.eval_samples,
        "seed": synthetic.seed,
        "image_sizes": sizes,
    }
    _provide(
        data_dir,
        data_key,
        f"writing the synthetic shapes dataset to {data_dir} ({synthetic.train_samples} training samples)",
        say,
        lambda folder: write_shapes_dataset(
            folder, synthetic.train_samples, synthetic.eval_samples, synthetic.seed, sizes
        ),
    )
    # A LLaVA-NeXT tower sees small tiles (tiny.NEXT_TILE px), several per picture.
    tower_sizes = {"image_size": tiny.NEXT_TILE, "patch_size": tiny.NEXT_PATCH} if synthetic.llava_next else {}
    vision_key = {"version": FORMAT_VERSION, "kind": synthetic.vision_family, "seed": synthetic.seed, **tower_sizes}
    _provide(
        Path(vision_tower),
        vision_key,
        f"writing a tiny {synthetic.vision_family} vision tower to {vision_tower}",
        say,
        lambda folder: tiny.write_vision_tower(folder, synthetic.seed, synthetic.vision_family, **tower_sizes),
    )
    if synthetic.decoder_family == "smollm2":  # real weights: the same whatever the data
        decoder_key = {"version": FORMAT_VERSION, "kind": "smollm2"}
        write_decoder = tiny.write_smollm2
    else:
        decoder_key = {**data_key, "kind": synthetic.decoder_family}

        def write_decoder(folder):
            tiny.write_decoder(folder, synthetic.decoder_family, corpus(data_dir), synthetic.seed)

    _provide(
        Path(decoder),
        decoder_key,
        f"writing the {synthetic.decoder_family} decoder and tokenizer to {decoder}",
        say,
        write_decoder,
    )
    if synthetic.llava_next:
        next_key = {"version": FORMAT_VERSION, "kind": "llava_next", "vision": vision_key, "decoder": decoder_key}
        _provide(
            Path(llava),
            next_key,
            f"writing a tiny LLaVA-NeXT checkpoint (anyres, {tiny.NEXT_TILE} px tiles) to {llava}",
            say,
            lambda folder: tiny.write_llava_next(folder, Path(vision_tower), Path(decoder), synthetic.seed),
        )


def _provide(folder: Path, key: dict, message: str, say, write) -> None:
    """`folder` as `key` describes it: kept when its marker records that key, else written by `write(path)` to a
    private folder beside it, marked, and renamed into place."""
    key = json.loads(json.dumps(key))  # as the marker reads back: a tuple is a list in JSON
    if _marker(folder) == key:
        return
    _refuse_foreign(folder)
    say(message)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(partial)
        _write_marker(partial, key)
        _swap_in(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _swap_in(new: Path, folder: Path) -> None:
    """Put the folder `new` at `folder`, in place of the one there. A reader sees the old folder or the new one,
    never a mix (between the two renames, none). Another process that put its own in place first wins: what it
    wrote is the same."""
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    try:
        folder.rename(old)
    except FileNotFoundError:
        pass
    try:
        new.rename(folder)
    except OSError:
        if _marker(folder) != _marker(new):  # not another process's identical folder, put in place meanwhile
            raise
    shutil.rmtree(old, ignore_errors=True)


FORMAT_VERSION = 4
MARKER = "qllava_synthetic.json"


def _marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(folder: Path, key: dict) -> None:
    (folder / MARKER).write_text(json.dumps(key))


def _refuse_foreign(folder: Path) -> None:
    if folder.exists() and any(folder.iterdir()) and not (folder / MARKER).exists():
        raise FileExistsError(
            f"{folder} exists and was not written by qllava's [synthetic] step; point the recipe elsewhere or remove it"
        )
