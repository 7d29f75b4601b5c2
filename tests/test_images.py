"""One image policy for every path, and prepared data that follow their images.

- Every image is used upright, as its EXIF orientation says a viewer shows it: every orientation (2-8) in JPEG, PNG,
  WebP and TIFF, through LLaVA JSON, a Hugging Face dataset (stored bytes or a path), and open_image (what chat,
  eval and serve call); equal to transformers' load_image and PIL's exif_transpose. LLaVA-NeXT token counts come
  from the upright size, so a rotated non-square photo trains.
- Prepared LLaVA-NeXT counts follow their image files (an image replaced by another aspect ratio, in place, by
  rename, with its old modification time put back), and the collator checks each image against its count.
- `data stats` reports image tokens min / mean / max and images with an EXIF orientation; `--check-images` decodes
  every image; an image that fails while training says to remove or fix it, then --resume.
- Images over PIL's decompression-bomb warning size: no raw PIL warning, counted by `data stats`.
"""

import io
import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import TINY_RECIPE, next_recipe, tiny_overrides
from PIL import Image, ImageOps

from qllava import model as modeling
from qllava import stats
from qllava.cli import main
from qllava.data import DataError, DataReport, ImageStore, build_stage_dataset, image_source, read_conversations
from qllava.errors import user_message
from qllava.packing import Collator
from qllava.recipe import StageConfig, load_recipe
from qllava.vision import AnyresGeometry, ImageGeometry, image_header, open_image

ORIENTATION = 0x0112
# The stored pixels of an image whose orientation tag is o are the upright picture put through the inverse of the
# tag's meaning (EXIF 2.3, "Orientation"): 2 mirrored left-right, 3 turned 180, 4 mirrored top-bottom, 5 transposed,
# 6 turned 90 clockwise to be upright (so stored turned 90 anticlockwise), 7 transversed, 8 the other quarter turn.
STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
BLOCKS = {
    "top left": (230, 20, 20),
    "top right": (20, 200, 20),
    "bottom left": (20, 20, 230),
    "bottom right": (240, 240, 240),
}


def upright_picture(width=48, height=32) -> Image.Image:
    """A non-square picture with a colour per quarter: any turn or mirror moves a colour."""
    picture = Image.new("RGB", (width, height))
    for (x, y), colour in zip([(0, 0), (1, 0), (0, 1), (1, 1)], BLOCKS.values()):
        picture.paste(colour, (x * width // 2, y * height // 2, (x + 1) * width // 2, (y + 1) * height // 2))
    return picture


def quarters(image: Image.Image) -> list:
    width, height = image.size
    return [
        image.getpixel((x * width // 2 + width // 4, y * height // 2 + height // 4))
        for x, y in [(0, 0), (1, 0), (0, 1), (1, 1)]
    ]


def close(a, b, tolerance=40) -> bool:
    return all(abs(p - q) <= tolerance for pa, pb in zip(a, b) for p, q in zip(pa, pb))


def save_oriented(path: Path, orientation: int, picture=None, fmt=None) -> Path:
    """`picture` (upright) stored as a camera stores it: pixels turned, the turn back written as its orientation."""
    picture = picture or upright_picture()
    stored = picture.transpose(STORED[orientation]) if STORED[orientation] is not None else picture
    fmt = fmt or {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF", ".bmp": "BMP"}[path.suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "TIFF":
        stored.save(path, fmt, tiffinfo={ORIENTATION: orientation})
    else:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        stored.save(path, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def chat(sample_id, image=None, question="<image>\nWhat is it?", answer="a picture"):
    sample = {
        "id": sample_id,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }
    if image:
        sample["image"] = image
    return sample


def write_json(path: Path, samples) -> str:
    path.write_text(json.dumps(samples))
    return str(path)


# ---- item 3: one orientation policy -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_in_every_format_is_used_upright_as_viewers_and_transformers_show_it(
    tmp_path, suffix, orientation
):
    from transformers.image_utils import load_image

    path = save_oriented(tmp_path / f"photo{suffix}", orientation)
    header = image_header(path)
    # PIL turns a TIFF upright itself (as it does for official LLaVA): only the other formats differ from LLaVA.
    turned_by_qllava = 1 if suffix == ".tif" else orientation
    assert (header.problem, header.size, header.orientation) == (None, (48, 32), turned_by_qllava)
    image = open_image(path)
    assert image.size == (48, 32) and image.mode == "RGB"
    assert close(quarters(image), list(BLOCKS.values())), quarters(image)
    # The outside references: PIL's exif_transpose and transformers' load_image (what a llava-hf pipeline opens).
    with Image.open(path) as raw:
        assert np.array_equal(np.asarray(image), np.asarray(ImageOps.exif_transpose(raw).convert("RGB")))
    assert np.array_equal(np.asarray(image), np.asarray(load_image(str(path))))
    # Official LLaVA's loader (Image.open(path).convert("RGB")) gives other pixels exactly where data stats counts.
    with Image.open(path) as raw:
        as_llava = raw.convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(as_llava)) == (header.orientation == 1)


def test_a_phone_portrait_is_turned_a_quarter_clockwise(tmp_path):
    stored = Image.new("RGB", (4, 2), (255, 0, 0))  # a sensor's landscape frame, red on its left column
    stored.paste((0, 0, 255), (1, 0, 4, 2))
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "rotate 90 CW to view": what phones write for a portrait photo
    stored.save(tmp_path / "portrait.png", exif=exif)
    image = open_image(tmp_path / "portrait.png")
    assert image.size == (2, 4)
    assert [image.getpixel((x, 0)) for x in range(2)] == [(255, 0, 0)] * 2  # the left column is now the top row
    assert image.getpixel((0, 3)) == (0, 0, 255)


def png_with_exif_after_the_pixels(path: Path, orientation: int) -> Path:
    """A PNG whose eXIf chunk comes after its image data (where browsers no longer look for it)."""
    buffer = io.BytesIO()
    upright_picture().transpose(STORED[orientation]).save(buffer, "PNG")
    data = buffer.getvalue()
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    body = exif.tobytes()
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])
    return path


def test_a_png_whose_exif_follows_its_pixels_is_read_the_same_from_its_header_and_decoded(tmp_path):
    path = png_with_exif_after_the_pixels(tmp_path / "late.png", 6)
    header, image = image_header(path), open_image(path)
    assert header.size == image.size == (32, 48) and header.orientation == 1  # as stored, in both


def test_a_malformed_exif_block_is_no_orientation_in_every_path(tmp_path):
    path = tmp_path / "bad_exif.jpg"
    upright_picture().save(path, "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")  # first IFD far past the end
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL's "Corrupt EXIF data"
        assert image_header(path).orientation == 1 and open_image(path).size == (48, 32)


def hf_images_dataset(folder: Path, images: list) -> str:
    """A saved Hugging Face dataset of one image question per row; `images` as the datasets library stores them."""
    messages = [
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a picture"}]},
        ]
    ] * len(images)
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
        {"messages": messages, "images": [[image] for image in images]}, features=features
    ).save_to_disk(str(folder))
    return str(folder)


def test_one_photo_is_the_same_pixels_through_llava_json_a_dataset_and_chat(tmp_path):
    from qllava.chat import Chat
    from qllava.inference import Loaded

    photo = save_oriented(tmp_path / "img" / "photo.jpg", 6)
    dataset = hf_images_dataset(
        tmp_path / "hf", [{"bytes": photo.read_bytes(), "path": None}, {"bytes": None, "path": str(photo)}]
    )
    expected = np.asarray(open_image(photo))  # what chat, eval and serve (through Chat) give the model
    assert expected.shape == (32, 48, 3)  # (height, width): upright
    from_json = ImageStore([str(tmp_path / "img")]).open(0, "photo.jpg")
    store = ImageStore([image_source(dataset, "")])
    for image in (from_json, store.open(0, "row:0"), store.open(0, "row:1")):
        assert np.array_equal(np.asarray(image), expected)  # turned once: never twice, never not at all
    # The datasets library, left to decode, turns images itself (after decoding): qllava reads the stored bytes and
    # applies its own policy, once, the same as for files; here both agree.
    assert datasets.load_from_disk(dataset)[0]["images"][0].size == (48, 32)
    chat_image = Chat(Loaded.__new__(Loaded), photo).image
    assert np.array_equal(np.asarray(chat_image), expected)


@pytest.fixture(scope="module")
def next_setup(next_inputs, tmp_path_factory):
    recipe = next_recipe(next_inputs, tmp_path_factory.mktemp("next_orientation") / "run")
    processor = modeling.build_processor(recipe.model)
    geometry = modeling.image_geometry(modeling.load_llava_config(recipe.model), processor.image_processor)
    return recipe, processor, geometry


def test_a_rotated_non_square_photo_trains_in_llava_next_from_a_dataset_and_from_llava_json(next_setup, tmp_path):
    recipe, processor, geometry = next_setup
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    photo = save_oriented(tmp_path / "img" / "photo.jpg", 6, upright_picture(64, 128))  # stored 128 x 64
    upright_tokens, stored_tokens = geometry.tokens_of((64, 128)), geometry.tokens_of((128, 64))
    assert upright_tokens != stored_tokens
    dataset_dir = hf_images_dataset(tmp_path / "hf", [{"bytes": photo.read_bytes(), "path": None}])
    json_file = write_json(tmp_path / "data.json", [chat("photo", "photo.jpg")])
    model = modeling.load_base_model(recipe, processor, quantized=False).eval()
    for data in (dataset_dir, json_file):
        stage = StageConfig(
            data=[data],
            image_folder=str(tmp_path / "img"),
            template="mistral_instruct",
            max_seq_len=512,
            image_aspect_ratio="anyres",
        )
        samples, images, report = build_stage_dataset(
            stage, tokenizer, image_id, geometry, str(tmp_path / "cache"), "stage2"
        )
        assert samples[0]["image_tokens"] == [upright_tokens] and report.oriented_images == 1
        batch = Collator(images, processor.image_processor, "anyres", tokenizer.pad_token_id, image_id).batch(
            [[samples[0]]]
        )
        assert batch["image_sizes"].tolist() == [[128, 64]]  # (height, width): upright
        with torch.no_grad():  # the model takes as many image features as the sample has image tokens
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        assert logits.shape[1] == samples[0]["length"]


def test_data_stats_counts_the_images_with_an_exif_orientation(tiny_inputs, tmp_path, capsys):
    images = tmp_path / "img"
    samples = [chat(f"turned-{o}", save_oriented(images / f"o{o}.jpg", o).name) for o in range(2, 9)]
    samples += [chat("tag-1", save_oriented(images / "o1.jpg", 1).name)]
    upright_picture().save(images / "plain.png")
    samples += [chat("plain", "plain.png"), chat("text-only", question="Hello?")]
    data = write_json(tmp_path / "data.json", samples)
    argv = [
        "data",
        "stats",
        str(TINY_RECIPE),
        "--stage",
        "2",
        *tiny_overrides(tiny_inputs, tmp_path / "run"),
        f'stage2.data=["{data}"]',
        f'stage2.image_folder="{images}"',
        f'data.cache_dir="{tmp_path / "cache"}"',
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "images turned upright by their EXIF orientation" in out
    assert (
        "7 images with an EXIF orientation, used upright as a viewer shows them (e.g. turned-2, turned-3, "
        "turned-4)" in out
    )
    recipe = load_recipe(TINY_RECIPE, argv[5:])
    figures = stats.stage_stats(recipe, "stage2")
    assert (figures["oriented_images"], figures["samples"], figures["with_image"]) == (7, 10, 9)


# ---- item 4: prepared LLaVA-NeXT counts follow their image files ------------------------------------------------

NEXT = AnyresGeometry(tile=64, patch=16, grid_pinpoints=((64, 128), (128, 64)), base_tokens=16)
"""tiny_next's geometry: an 8 x 4 image takes 52 tokens, a 4 x 8 one 28."""


def bmp(path: Path, size) -> Path:
    """A 24-bit BMP: an 8 x 4 and a 4 x 8 one have the same number of bytes."""
    Image.new("RGB", size, (90, 10, 10)).save(path, "BMP")
    return path


def replace_in_place(path: Path, size) -> None:
    data = io.BytesIO()
    Image.new("RGB", size, (10, 90, 10)).save(data, "BMP")
    with open(path, "r+b") as f:  # the same inode, the folder untouched
        f.write(data.getvalue())


def replace_keeping_the_time(path: Path, size) -> None:
    before = path.stat()
    replace_in_place(path, size)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def replace_by_rename_keeping_the_time(path: Path, size) -> None:
    before = path.stat()
    bmp(path.with_suffix(".tmp"), size)
    os.utime(path.with_suffix(".tmp"), ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(path.with_suffix(".tmp"), path)


def copy_over_keeping_the_time(path: Path, size) -> None:  # cp -p new old
    bmp(path.parent.parent / "new.bmp", size)
    shutil.copy2(path.parent.parent / "new.bmp", path)


@pytest.fixture
def next_tokenizer(tiny_inputs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_inputs / "mistral")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


def bmp_stage(tmp_path: Path, n=3) -> StageConfig:
    images = tmp_path / "img"
    images.mkdir()
    names = [bmp(images / f"p{i}.bmp", (8, 4)).name for i in range(n)]
    data = write_json(tmp_path / "data.json", [chat(f"p{i}", name) for i, name in enumerate(names)])
    return StageConfig(data=[data], image_folder=str(images), template="vicuna_v1", max_seq_len=256)


def prepare(stage, tokenizer, tmp_path, geometry=NEXT):
    return build_stage_dataset(
        stage, tokenizer, tokenizer.convert_tokens_to_ids("<image>"), geometry, str(tmp_path / "cache"), "stage2"
    )


@pytest.mark.parametrize(
    "replace",
    [replace_in_place, replace_keeping_the_time, replace_by_rename_keeping_the_time, copy_over_keeping_the_time],
)
def test_an_image_replaced_by_another_aspect_ratio_makes_the_data_prepared_again(tmp_path, next_tokenizer, replace):
    stage = bmp_stage(tmp_path)
    first, _, report = prepare(stage, next_tokenizer, tmp_path)
    assert first["image_tokens"] == [[52]] * 3 and not report.cached
    assert prepare(stage, next_tokenizer, tmp_path)[2].cached
    folder_time = (tmp_path / "img").stat().st_mtime_ns
    size = (tmp_path / "img" / "p1.bmp").stat().st_size
    replace(tmp_path / "img" / "p1.bmp", (4, 8))
    assert (tmp_path / "img" / "p1.bmp").stat().st_size == size
    if replace is not replace_by_rename_keeping_the_time:
        assert (tmp_path / "img").stat().st_mtime_ns == folder_time  # nothing but the file itself tells
    again, images, report = prepare(stage, next_tokenizer, tmp_path)
    assert not report.cached and again["image_tokens"] == [[52], [28], [52]]
    assert [images.open_sample(s).size for s in again] == [(8, 4), (4, 8), (8, 4)]


def test_with_a_fixed_count_image_files_are_not_stamped_or_checked(tmp_path, next_tokenizer):
    stage = bmp_stage(tmp_path)
    first, _, _ = prepare(stage, next_tokenizer, tmp_path, ImageGeometry(16))
    assert first["image_stamp"] == [0] * 3 and first["image_file"] == [""] * 3
    replace_in_place(tmp_path / "img" / "p1.bmp", (4, 8))
    assert prepare(stage, next_tokenizer, tmp_path, ImageGeometry(16))[2].cached  # 16 tokens whatever its size


def test_the_collator_checks_each_image_against_its_count_and_names_the_file(tmp_path, next_tokenizer):
    stage = bmp_stage(tmp_path)
    samples, images, _ = prepare(stage, next_tokenizer, tmp_path)
    collator = Collator(images, None, "anyres", 0, next_tokenizer.convert_tokens_to_ids("<image>"))
    replace_keeping_the_time(tmp_path / "img" / "p1.bmp", (4, 8))  # while training runs
    expected = (
        f"image {tmp_path / 'img' / 'p1.bmp'}: its 4x8 pixels (upright) make 28 image tokens, but sample p1 "
        "was prepared for 52: the file changed after the data were prepared: run the same command again "
        "with --resume: the data are prepared again from the images as they are now"
    )
    with pytest.raises(DataError) as error:
        collator.image_inputs([samples[0], samples[1]])
    assert str(error.value) == expected
    # In a DataLoader worker (as on a GPU), torch re-raises it with the worker's traceback: the user reads one line.
    loader = torch.utils.data.DataLoader(
        [[samples[1]]], batch_size=1, num_workers=1, collate_fn=lambda rows: collator.image_inputs(rows[0])
    )
    with pytest.raises(DataError) as error:
        next(iter(loader))
    assert "Traceback" in str(error.value) and user_message(error.value) == expected


# ---- item 11: image tokens per image, min / mean / max -------------------------------------------------------------


def test_data_stats_reports_the_range_of_image_tokens(next_setup, tiny_recipe):
    recipe, processor, geometry = next_setup
    figures = stats.stage_stats(recipe, "stage2")
    convs = read_conversations(recipe.stage2.data[0], recipe.stage2.image_folder, 0, DataReport())
    counts = []
    for conv in convs:
        if conv.image:
            with Image.open(os.path.join(recipe.stage2.image_folder, conv.image)) as image:  # the files themselves
                counts.append(geometry.tokens_of(image.size))
    assert figures["image_tokens"] == {
        "min": min(counts),
        "mean": pytest.approx(sum(counts) / len(counts)),
        "max": max(counts),
    }
    assert min(counts) < max(counts)  # the largest image's count is not every image's
    assert stats.stage_stats(tiny_recipe(), "stage2")["image_tokens"] == {"min": 16, "mean": 16.0, "max": 16}


# ---- item 8: a file cut short is found before training, and said plainly during it ---------------------------------


def cut_short(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def test_data_stats_check_images_decodes_every_image_and_names_each_broken_file(
    tiny_inputs, tmp_path, capsys, monkeypatch
):
    images = tmp_path / "img"
    names = [save_oriented(images / f"good{i}.png", 1, upright_picture(96, 64)).name for i in range(5)]
    cut_png = cut_short(save_oriented(images / "cut.png", 1, Image.effect_noise((96, 64), 50).convert("RGB")))
    cut_jpg = cut_short(save_oriented(images / "cut.jpg", 1, Image.effect_noise((96, 64), 50).convert("RGB")))
    samples = [chat(f"good{i}", name) for i, name in enumerate(names)]
    samples += [chat("png-cut", "cut.png"), chat("jpg-cut", "cut.jpg"), chat("jpg-cut-again", "cut.jpg")]
    data = write_json(tmp_path / "data.json", samples)
    argv = [
        "data",
        "stats",
        str(TINY_RECIPE),
        "--stage",
        "2",
        *tiny_overrides(tiny_inputs, tmp_path / "run"),
        f'stage2.data=["{data}"]',
        f'stage2.image_folder="{images}"',
        f'data.cache_dir="{tmp_path / "cache"}"',
        "data.num_proc=2",
    ]
    assert main(argv) == 0  # their headers read fine
    capsys.readouterr()
    monkeypatch.setattr(stats, "CHECK_CHUNK", 2)  # several pieces of work, in 2 processes
    assert main(argv + ["--check-images"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "stage2: 7 images decoded in" in out and "2 cannot be used" in out  # each file decoded once
    assert f"image {cut_png}: cannot be read as an image (" in out and "the image of sample png-cut" in out
    assert f"image {cut_jpg}: cannot be read as an image (" in out and "the image of sample jpg-cut" in out
    assert (
        "error: 2 image file(s) cannot be used as training would use them (listed above): remove or fix each "
        "one, then train"
    ) in out
    assert not (tmp_path / "run").exists()


def test_an_image_cut_short_stops_training_with_what_to_do_and_resume_continues(tiny_inputs, tmp_path, capsys):
    shapes = tiny_inputs / "shapes"
    images = tmp_path / "img"
    shutil.copytree(shapes / "images", images)
    questions = json.loads((shapes / "questions.json").read_text())[:6]
    cut = cut_short(images / questions[2]["image"])
    data = write_json(tmp_path / "questions.json", questions)
    argv = [
        "finetune",
        str(TINY_RECIPE),
        *tiny_overrides(tiny_inputs, tmp_path / "run"),
        f'stage2.data=["{data}"]',
        f'stage2.image_folder="{images}"',
        f'data.cache_dir="{tmp_path / "cache"}"',
        "eval.at=[]",
        "stage1.max_steps=2",
        "stage2.max_steps=2",
        "stage2.max_seq_len=512",
        "data.dataloader_num_workers=1",
        "data.max_missing_image_fraction=0.9",
    ]
    assert main(argv) == 2
    out = capsys.readouterr().out
    error = out[out.index("error:") :]
    assert error.count("\n") == 1 and "Traceback" not in error  # one line, though a worker process raised it
    assert f"image {cut}: cannot be read as an image (" in " ".join(error.split())
    assert (
        "remove or fix the file, then run the same command with --resume (a sample whose image is missing is "
        "skipped and counted)"
    ) in " ".join(error.split())
    trained = (tmp_path / "run" / "stage1" / modeling.PROJECTOR_FILE).stat().st_mtime_ns
    cut.unlink()
    assert main(argv + ["--resume"]) == 0
    assert (tmp_path / "run" / "stage1" / modeling.PROJECTOR_FILE).stat().st_mtime_ns == trained  # kept
    metrics = json.loads((tmp_path / "run" / "stage2" / "metrics.json").read_text())
    assert "image file not found" in json.dumps(metrics)


# ---- item 14: images over PIL's decompression-bomb warning size --------------------------------------------------


def test_large_images_bring_no_raw_pil_warning_and_are_counted(tiny_inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # scaled down: 89 MP (warning) and 179 MP (error)
    images = tmp_path / "img"
    images.mkdir()
    Image.new("RGB", (80, 70)).save(images / "large.png")  # 5,600 pixels: over the warning size, under 2x
    Image.new("RGB", (100, 110)).save(images / "bomb.png")  # 11,000: over twice the limit
    Image.new("RGB", (40, 40)).save(images / "small.png")
    data = write_json(
        tmp_path / "data.json", [chat("large", "large.png"), chat("bomb", "bomb.png"), chat("small", "small.png")]
    )
    recipe = load_recipe(
        TINY_RECIPE,
        tiny_overrides(tiny_inputs, tmp_path / "run")
        + [
            f'stage2.data=["{data}"]',
            f'stage2.image_folder="{images}"',
            f'data.cache_dir="{tmp_path / "cache"}"',
            "data.max_missing_image_fraction=0.5",
        ],
    )
    with warnings.catch_warnings(record=True) as caught:
        figures = stats.stage_stats(recipe, "stage2")
        assert image_header(images / "large.png").large and open_image(images / "large.png").size == (80, 70)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)], [str(w) for w in caught]
    assert (figures["large_images"], figures["large_images_examples"], figures["samples"]) == (1, ["large"], 2)
    assert figures["skipped"] == {
        "image larger than PIL's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS pixels)": 1
    }
