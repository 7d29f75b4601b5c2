"""Reading LLaVA JSON and Hugging Face datasets: what is used, what is skipped and why, caching, images."""

import json
import shutil
from pathlib import Path

import datasets
import pytest
from PIL import Image

from qllava.data import DataError, DataReport, ImageStore, build_stage_dataset, read_conversations
from qllava.recipe import StageConfig
from qllava.vision import ImageGeometry, VisionError, pad_to_square


def write(tmp_path, samples, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(samples))
    return str(path)


def image_file(folder, name="a.png", size=(8, 4), mode="RGB"):
    folder.mkdir(exist_ok=True)
    Image.new(mode, size).save(folder / name)
    return name


def chat(q, a, image=None, sample_id="s"):
    sample = {"id": sample_id, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image:
        sample["image"] = image
    return sample


def test_llava_json_moves_the_image_tag_first_and_keeps_text_only_samples(tmp_path):
    name = image_file(tmp_path / "img")
    path = write(tmp_path, [chat("What is it?\n<image>", "A cat.", name, "a"), chat("Hi", "Hello", None, "b")])
    report = DataReport()
    convs = read_conversations(path, str(tmp_path / "img"), 0, report)
    assert [(c.id, c.image, c.turns[0][1]) for c in convs] == [("a", name, "<image>\nWhat is it?"), ("b", "", "Hi")]
    assert report.skipped == {}


def test_image_without_tag_gets_one_in_the_first_turn(tmp_path):
    name = image_file(tmp_path / "img")
    convs = read_conversations(
        write(tmp_path, [chat("What is it?", "A cat.", name)]), str(tmp_path / "img"), 0, DataReport()
    )
    assert convs[0].turns[0] == ("user", "<image>\nWhat is it?")


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path):
    name = image_file(tmp_path / "img")
    samples = [
        chat("<image>\nq", "a", "missing.png", "no-file"),
        {"id": "no-conv"},
        chat("q", "a <image>", name, "tag-in-answer"),
        chat("<image> q <image>", "a", name, "two-tags"),
        chat("<image> q", "a", None, "tag-no-image"),
        {"id": "bad-role", "conversations": [{"from": "system?", "value": "x"}]},
        chat("ok", "fine", None, "good"),
    ]
    report = DataReport()
    convs = read_conversations(write(tmp_path, samples), str(tmp_path / "img"), 0, report)
    assert [c.id for c in convs] == ["good"]
    assert report.skipped == {
        "image file not found under the image folder (" + str(tmp_path / "img") + ")": 1,
        'no "conversations" list': 1,
        "<image> in an assistant turn": 1,
        "more than one <image> tag (one image per sample)": 1,
        "<image> tag but no image": 1,
        'a turn is not {"from": "human"|"gpt", "value": text}': 1,
    }
    assert report.examples["<image> in an assistant turn"] == ["tag-in-answer"]


@pytest.mark.parametrize(
    "content,message",
    [
        ({"not": "a list"}, "expected a JSON list of LLaVA samples"),
        ("[1, 2", "not valid JSON"),
    ],
)
def test_file_level_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=f"{path}: {message}"):
        read_conversations(str(path), "", 0, DataReport())
    with pytest.raises(DataError, match="nope.json: data file not found"):
        read_conversations(str(tmp_path / "nope.json"), "", 0, DataReport())


def hf_dataset(tmp_path, rows) -> str:
    folder = tmp_path / "hf"
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    return str(folder)


def parts(*items):
    return [{"type": "image", "text": None} if x is None else {"type": "text", "text": x} for x in items]


def test_hugging_face_dataset_with_messages_and_images(tmp_path):
    folder = hf_dataset(
        tmp_path,
        {
            "messages": [
                [
                    {"role": "user", "content": parts(None, "What is it?")},
                    {"role": "assistant", "content": parts("A cat.")},
                ],
                [
                    {"role": "system", "content": parts("be brief")},
                    {"role": "user", "content": parts("Hi")},
                    {"role": "assistant", "content": parts("Hello")},
                ],
            ],
            "images": [[Image.new("RGB", (4, 4), (255, 0, 0))], []],
        },
    )
    from qllava.data import image_source

    where = image_source(folder, "")
    report = DataReport()
    convs = read_conversations(folder, where, 0, report)
    assert [(c.image, c.turns) for c in convs] == [
        ("row:0", [("user", "<image>\nWhat is it?"), ("assistant", "A cat.")]),
        ("", [("user", "Hi"), ("assistant", "Hello")]),
    ]
    assert [c.system for c in convs] == [None, "be brief"]
    assert ImageStore([where]).open(0, "row:0").getpixel((0, 0)) == (255, 0, 0)


def test_several_images_skip_a_sample_for_one_reason_in_both_formats(tmp_path):
    """LLaVA-1.5 trains on one image per sample: a LLaVA JSON list of paths (LLaVA-OneVision's multi-image samples)
    and a dataset row with several images are skipped for the same reason, counted with their ids."""
    name = image_file(tmp_path / "img")
    samples = [
        chat("<image>\nq", "a", [name, name], "two"),
        chat("<image>\nq", "a", [name], "list-of-one"),
        chat("<image>\nq", "a", name, "one"),
    ]
    report = DataReport()
    convs = read_conversations(write(tmp_path, samples), str(tmp_path / "img"), 0, report)
    assert [c.id for c in convs] == ["one"]
    assert report.skipped == {
        "more than one image (one image per sample)": 1,
        '"image" is not one path (one image per sample)': 1,
    }
    assert report.examples["more than one image (one image per sample)"] == ["two"]
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    turns = [
        {"role": "user", "content": parts(None, None, "Which is red?")},
        {"role": "assistant", "content": parts("The first.")},
    ]
    folder = hf_dataset(tmp_path, {"messages": [turns, turns[:1] + [turns[1]]], "images": [[red, red], [red] * 3]})
    from qllava.data import image_source

    report = DataReport()
    assert read_conversations(folder, image_source(folder, ""), 0, report) == []
    assert report.skipped == {"more than one image (one image per sample)": 2}
    assert report.examples["more than one image (one image per sample)"] == ["hf[0]", "hf[1]"]


def test_hugging_face_dataset_needs_a_messages_column(tmp_path):
    folder = hf_dataset(tmp_path, {"text": ["hello"]})
    from qllava.data import image_source

    with pytest.raises(DataError, match='a Hugging Face dataset needs a "messages" column'):
        image_source(folder, "")


def test_pad_to_square_uses_llavas_mean_colour():
    mean = [0.48145466, 0.4578275, 0.40821073]
    padded = pad_to_square(Image.new("RGB", (6, 2), (255, 255, 255)), mean)
    assert padded.size == (6, 6)
    assert padded.getpixel((0, 0)) == (122, 116, 104) and padded.getpixel((0, 2)) == (255, 255, 255)
    assert padded.getpixel((0, 4)) == (122, 116, 104)


def test_grayscale_rgba_and_palette_images_open_as_rgb(tmp_path):
    for mode in ("L", "RGBA", "P"):
        name = image_file(tmp_path / "img", f"{mode}.png", mode=mode)
        assert ImageStore([str(tmp_path / "img")]).open(0, name).mode == "RGB"


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(VisionError, match="bad.png: cannot be read"):
        ImageStore([str(tmp_path / "img")]).open(0, "bad.png")


@pytest.fixture(scope="module")
def tokenizer(tiny_inputs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_inputs / "mistral")
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def test_stage_dataset_drops_too_long_samples_counts_them_and_is_cached(tmp_path, tokenizer):
    name = image_file(tmp_path / "img")
    long_answer = " ".join(["red"] * 80)
    path = write(tmp_path, [chat("<image>\nq", "red", name, "short"), chat("<image>\nq", long_answer, name, "long")])
    stage = StageConfig(data=[path], image_folder=str(tmp_path / "img"), template="mistral_instruct", max_seq_len=64)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    dataset, images, report = build_stage_dataset(
        stage, tokenizer, image_id, ImageGeometry(16), str(tmp_path / "cache"), "stage2"
    )
    assert dataset["id"] == ["short"] and report.used == 1
    assert report.skipped == {"longer than max_seq_len (64 tokens, image tokens included)": 1}
    assert dataset[0]["input_ids"].count(image_id) == 1 and dataset[0]["image_tokens"] == [16]
    assert dataset[0]["length"] == len(dataset[0]["input_ids"]) - 1 + 16
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 1
    again, _, report_again = build_stage_dataset(
        stage, tokenizer, image_id, ImageGeometry(16), str(tmp_path / "cache"), "stage2"
    )
    assert again["input_ids"] == dataset["input_ids"] and report_again.skipped == report.skipped


def test_empty_dataset_after_filtering_is_an_error(tmp_path, tokenizer):
    path = write(tmp_path, [chat("q", "", None, "empty-answer"), {"id": "x"}, chat("q", "a", None, "y")])
    stage = StageConfig(data=[path], template="plain", max_seq_len=64)
    with pytest.raises(DataError) as e:
        build_stage_dataset(stage, tokenizer, 5, ImageGeometry(16), str(tmp_path / "cache"), "stage1")
    assert str(e.value) == (
        f"stage1: no trainable samples left in {path} (1 an assistant turn is empty; "
        '1 no "conversations" list; 1 the plain template needs an image (it renders only '
        "<image> + caption))"
    )


def test_max_seq_len_shorter_than_an_image(tmp_path, tokenizer):
    stage = StageConfig(data=["x.json"], template="vicuna_v1", max_seq_len=10)
    with pytest.raises(DataError, match="stage1.max_seq_len: 10 is shorter than one image's 16 tokens"):
        build_stage_dataset(stage, tokenizer, 5, ImageGeometry(16), str(tmp_path), "stage1")


ADVERSARIAL = [
    {"id": "a,]", "conversations": [{"from": "human", "value": 'brackets ] [ } { and "quotes", commas,'}]},
    {
        "id": "ü",
        "conversations": [{"from": "gpt", "value": "日本語 😀 \\u00e9 \\\\ \n\t"}],
        "n": [1.5e3, -0, None, True],
    },
    9223372036854775807,
    -9223372036854775807,
    0.1,
    1e-300,
    "a string item",
    [],
    {},
]


@pytest.mark.parametrize("spacing", ["compact", "indented"])
def test_json_list_is_streamed_exactly(tmp_path, spacing):
    """Items decode as json.loads decodes them (strings, escapes, numbers, nesting), whatever the spacing."""
    import qllava.data.formats as formats

    path = tmp_path / "data.json"
    path.write_text(json.dumps(ADVERSARIAL, ensure_ascii=False, indent=2 if spacing == "indented" else None))
    assert list(formats._json_samples(path)) == json.loads(path.read_text())


def test_json_items_cut_by_the_read_buffer_decode_whole(tmp_path):
    """Items longer than the parser's 64 KB buffer, and items cut by it anywhere, decode as json.loads does."""
    import qllava.data.formats as formats

    long = [{"id": str(i), "conversations": [{"from": "gpt", "value": "é" * (i * 997 % 90_000)}]} for i in range(40)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(long, ensure_ascii=False))
    assert list(formats._json_samples(path)) == long


@pytest.mark.parametrize(
    "text,message",
    [
        ('[{"id": 1},]', "not valid JSON (sample 1: unallowed token at this point in JSON text)"),
        ('[{"id": 1} {"id": 2}]', "not valid JSON (after sample 1: expected ',' or ']')"),
        ('[{"id": 1}, {"id": 2}', "not valid JSON (the list is not closed: the file ends after 2 complete samples)"),
        ('[{"id": 1}, {"id": ', "not valid JSON (the list is not closed: the file ends after 1 complete sample)"),
        ("[", "not valid JSON (the list is not closed: the file ends after 0 complete samples)"),
        ('[{"id": 1}, {"id": 2, "x": NaN}]', "not valid JSON (sample 1: invalid char in json text)"),
        ('[{"id": 1}] [{"id": 2}]', "not valid JSON (text after the end of the list)"),
        ('[{"id": 1}, {"id": 9223372036854775808}]', "not valid JSON (sample 1: integer overflow)"),
        (b'[{"id": 1}, {"id": "\xc3("}]', "not valid JSON (sample 1: invalid bytes in UTF8 string)"),
        ('{"id": 1}', 'expected a JSON list of LLaVA samples ({"id", "image", "conversations"}), got a dict'),
        ('"text"', 'expected a JSON list of LLaVA samples ({"id", "image", "conversations"}), got a str'),
        (" \n -1", 'expected a JSON list of LLaVA samples ({"id", "image", "conversations"}), got a float'),
        ("hello", "not valid JSON (expected a list at its start)"),
        ("", "not valid JSON (expected a list at its start)"),
    ],
)
def test_json_errors_name_the_file_and_the_place(tmp_path, text, message):
    import qllava.data.formats as formats

    path = tmp_path / "bad.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError) as e:
        list(formats._json_samples(path))
    assert str(e.value) == f"{path}: {message}"


def test_a_bad_sample_far_into_the_file_is_named_by_its_index(tmp_path):
    import qllava.data.formats as formats

    samples = [json.dumps(chat(f"q{i}", "a" * 100, None, str(i))) for i in range(5000)]
    samples[4321] = samples[4321].replace('"from"', "'from'")
    path = tmp_path / "data.json"
    path.write_text("[" + ",\n".join(samples) + "]")
    read = []
    with pytest.raises(DataError, match=r"data.json: not valid JSON \(sample 4321: invalid char in json text\)$"):
        for sample in formats._json_samples(path):
            read.append(sample["id"])
    assert read == [str(i) for i in range(4321)]


def test_json_is_read_as_a_stream_not_whole(tmp_path):
    import qllava.data.formats as formats

    path = write(tmp_path, [chat(f"q{i}", "a" * 200, None, str(i)) for i in range(2000)])
    items = formats._json_samples(Path(path))
    assert next(items)["id"] == "0"
    assert items.gi_frame.f_locals["f"].tell() <= 1 << 16 < Path(path).stat().st_size // 4  # one 64 KB buffer read


def mix(tmp_path, n=23):
    """Image and text-only samples, some skipped (missing image, empty answer), in one LLaVA JSON file."""
    name = image_file(tmp_path / "img")
    samples = []
    for i in range(n):
        if i % 7 == 3:
            samples.append(chat("<image>\nq", "a", "missing.png", f"m{i}"))
        elif i % 5 == 4:
            samples.append(chat("q", "", None, f"e{i}"))
        else:
            samples.append(
                chat(
                    f"<image>\nwhat is {i}?" if i % 2 else f"hello {i}",
                    f"answer {i} " * (i % 4 + 1),
                    name if i % 2 else None,
                    f"s{i}",
                )
            )
    return write(tmp_path, samples)


def test_parallel_preparation_equals_one_process(tmp_path, tokenizer, monkeypatch):
    """Jobs of 4 samples in 2 processes give the same samples, in file order, and the same report as 1 process."""
    import qllava.data.formats as formats

    monkeypatch.setattr(formats, "JOB_SAMPLES", 4)
    stage = StageConfig(data=[mix(tmp_path)], image_folder=str(tmp_path / "img"), template="vicuna_v1", max_seq_len=256)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    one, _, report_one = build_stage_dataset(
        stage, tokenizer, image_id, ImageGeometry(16), str(tmp_path / "c1"), "stage2", num_proc=1
    )
    two, _, report_two = build_stage_dataset(
        stage, tokenizer, image_id, ImageGeometry(16), str(tmp_path / "c2"), "stage2", num_proc=2
    )
    assert one.to_dict() == two.to_dict() and len(one) == 16
    assert one["id"] == [f"s{i}" for i in range(23) if i % 7 != 3 and i % 5 != 4]
    assert (report_two.preparation["processes"], report_one.preparation["processes"]) == (2, 1)
    strip = lambda r: {**r.to_dict(), "preparation": None}  # noqa: E731
    assert strip(report_one) == strip(report_two)
    assert report_one.skipped == {
        "image file not found under the image folder (" + str(tmp_path / "img") + ")": 3,
        "an assistant turn is empty": 4,
    }
    assert report_one.with_image == sum(1 for i in one["image"] if i)


def prepare(stage, tokenizer, cache):
    return build_stage_dataset(
        stage, tokenizer, tokenizer.convert_tokens_to_ids("<image>"), ImageGeometry(16), str(cache), "stage2"
    )


def test_cache_follows_the_data_file(tmp_path, tokenizer):
    path = mix(tmp_path)
    stage = StageConfig(data=[path], image_folder=str(tmp_path / "img"), template="vicuna_v1", max_seq_len=256)
    first, _, report = prepare(stage, tokenizer, tmp_path / "cache")
    again, _, report_again = prepare(stage, tokenizer, tmp_path / "cache")
    assert (report.cached, report_again.cached) == (False, True) and again["id"] == first["id"]
    samples = json.loads(Path(path).read_text())
    Path(path).write_text(json.dumps(samples[:5]))
    changed, _, report_changed = prepare(stage, tokenizer, tmp_path / "cache")
    assert not report_changed.cached and len(changed) < len(first)


def test_an_image_added_after_a_skip_is_picked_up(tmp_path, tokenizer):
    path = mix(tmp_path)
    stage = StageConfig(data=[path], image_folder=str(tmp_path / "img"), template="vicuna_v1", max_seq_len=256)
    before, _, report = prepare(stage, tokenizer, tmp_path / "cache")
    assert report.skipped["image file not found under the image folder (" + str(tmp_path / "img") + ")"] == 3
    image_file(tmp_path / "img", "missing.png")
    after, _, report_after = prepare(stage, tokenizer, tmp_path / "cache")
    assert not report_after.cached and len(after) == len(before) + 3
    assert not any("image file" in reason for reason in report_after.skipped)


def test_a_hugging_face_dataset_saved_again_in_place_is_prepared_again(tmp_path, tokenizer):
    rows = {"messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]] * 3}
    folder = hf_dataset(tmp_path, rows)
    stage = StageConfig(data=[folder], template="vicuna_v1", max_seq_len=256)
    first, _, _ = prepare(stage, tokenizer, tmp_path / "cache")
    (Path(folder) / "cache-1234.arrow").write_bytes(b"a transform's cache file, not the dataset")
    assert prepare(stage, tokenizer, tmp_path / "cache")[2].cached
    rows["messages"] = rows["messages"][:2]
    datasets.Dataset.from_dict(rows).save_to_disk(folder + ".new")
    shutil.rmtree(folder)
    shutil.move(folder + ".new", folder)
    second, _, report = prepare(stage, tokenizer, tmp_path / "cache")
    assert not report.cached and (len(first), len(second)) == (3, 2)


def pictures(tmp_path, n):
    """n samples, each with its own image file in tmp_path/img."""
    names = [image_file(tmp_path / "img", f"p{i}.png") for i in range(n)]
    return write(tmp_path, [chat("<image>\nWhat is it?", f"thing {i}", name, f"p{i}") for i, name in enumerate(names)])


def test_an_image_removed_after_preparation_is_counted_missing_not_a_crash_in_training(tmp_path, tokenizer):
    stage = StageConfig(
        data=[pictures(tmp_path, 4)], image_folder=str(tmp_path / "img"), template="vicuna_v1", max_seq_len=256
    )
    first, _, _ = prepare(stage, tokenizer, tmp_path / "cache")
    (tmp_path / "img" / "unrelated.txt").write_text("a file added beside the images")
    again, _, report = prepare(stage, tokenizer, tmp_path / "cache")
    assert report.cached and len(again) == 4  # the folder changed, but every image used is still there
    (tmp_path / "img" / "p1.png").unlink()
    after, images, report = prepare(stage, tokenizer, tmp_path / "cache")
    assert not report.cached and after["id"] == ["p0", "p2", "p3"]
    assert report.skipped == {"image file not found under the image folder (" + str(tmp_path / "img") + ")": 1}
    assert all(images.open(s["source"], s["image"]).mode == "RGB" for s in after)  # what training would open


def test_a_hugging_face_dataset_saved_over_itself_with_fewer_rows_is_prepared_again(tmp_path, tokenizer):
    rows = {
        "messages": [[{"role": "user", "content": parts(None, "Hi")}, {"role": "assistant", "content": parts("A")}]]
        * 3,
        "images": [[Image.new("RGB", (4, 4), (255, 0, 0))]] * 3,
    }
    folder = hf_dataset(tmp_path, rows)
    stage = StageConfig(data=[folder], template="vicuna_v1", max_seq_len=256)
    assert len(prepare(stage, tokenizer, tmp_path / "cache")[0]) == 3
    datasets.Dataset.from_dict({k: v[:2] for k, v in rows.items()}).save_to_disk(folder)  # in place
    second, images, report = prepare(stage, tokenizer, tmp_path / "cache")
    assert not report.cached and second["image"] == ["row:0", "row:1"]
    assert [images.open(s["source"], s["image"]).getpixel((0, 0)) for s in second] == [(255, 0, 0)] * 2


def test_a_stage_whose_images_are_mostly_missing_stops_with_the_counts(tmp_path, tokenizer):
    path = pictures(tmp_path, 20)
    for i in range(1, 20):  # an image folder that holds 1 of the 20 images: the wrong folder
        (tmp_path / "img" / f"p{i}.png").unlink()
    stage = StageConfig(data=[path], image_folder=str(tmp_path / "img"), template="vicuna_v1", max_seq_len=256)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    with pytest.raises(DataError) as error:
        build_stage_dataset(
            stage,
            tokenizer,
            image_id,
            ImageGeometry(16),
            str(tmp_path / "cache"),
            "stage1",
            max_missing_image_fraction=0.05,
        )
    assert str(error.value) == (
        "stage1: the images of 19 of the 20 samples that name one are missing or unreadable (95.0%, more than "
        "data.max_missing_image_fraction = 0.05): 19 image file not found under the image folder ("
        f"{tmp_path / 'img'}) (e.g. p1, p2, p3). Check stage1.image_folder and the images, or raise "
        "data.max_missing_image_fraction to train without them"
    )
    for i in range(1, 19):
        image_file(tmp_path / "img", f"p{i}.png")
    dataset, _, report = build_stage_dataset(
        stage,
        tokenizer,
        image_id,
        ImageGeometry(16),
        str(tmp_path / "cache"),
        "stage1",
        max_missing_image_fraction=0.05,
    )
    assert (len(dataset), report.unusable_images, report.named_images) == (19, 1, 20)  # 5% missing: allowed


def test_a_system_message_is_the_templates_system_prompt_or_counted_as_left_out(tmp_path, tokenizer):
    from qllava import templates
    from qllava.data import tokenize_conversation

    folder = hf_dataset(
        tmp_path,
        {
            "messages": [
                [
                    {"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "Colour?"},
                    {"role": "assistant", "content": "Red"},
                ],
                [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red"}],
                [
                    {"role": "user", "content": "Hi"},
                    {"role": "system", "content": "late"},
                    {"role": "assistant", "content": "Yo"},
                ],
            ]
        },
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    turns = [("user", "Colour?"), ("assistant", "Red")]
    for template, system in (
        ("vicuna_v1", "Answer in one word."),
        ("llava_llama_2", "Answer in one word."),
        ("mistral_instruct", None),
    ):
        stage = StageConfig(data=[folder], template=template, max_seq_len=256)
        dataset, _, report = prepare(stage, tokenizer, tmp_path / "cache")
        assert dataset["input_ids"][0] == tokenize_conversation(turns, template, tokenizer, image_id, system)[0]
        assert dataset["input_ids"][1] == tokenize_conversation(turns, template, tokenizer, image_id)[0]
        assert report.skipped == {"a system message after the conversation started": 1}
        left_out = (
            {f"system message left out: the {template} template has no system prompt": 1} if system is None else {}
        )
        assert report.left_out == left_out
    rendered = templates.render("vicuna_v1", turns, "<s>", "</s>", system="Answer in one word.")
    assert rendered.text == "Answer in one word. USER: Colour? ASSISTANT: Red</s>"
    rendered = templates.render("llava_llama_2", turns, "<s>", "</s>", system="Be brief.")
    assert rendered.text == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nColour? [/INST] Red </s>"
    with pytest.raises(templates.TemplateError, match="the plain template has no system prompt to replace"):
        templates.render("plain", [("user", "<image>"), ("assistant", "a cat")], "<s>", "</s>", system="x")


def test_a_16_bit_png_is_scaled_not_white(tmp_path):
    import numpy as np

    from qllava.vision import open_image

    values = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = open_image(tmp_path / "deep.png")
    assert [image.getpixel(xy) for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [
        (0, 0, 0),
        (64, 64, 64),
        (128, 128, 128),
        (255, 255, 255),
    ]
    Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32)).save(tmp_path / "float.tif")
    assert [open_image(tmp_path / "float.tif").getpixel((x, 0)) for x in (0, 1)] == [(0, 0, 0), (128, 128, 128)]


def test_an_image_over_the_decompression_bomb_limit_is_a_counted_skip_and_a_clear_error(
    tmp_path, tokenizer, monkeypatch
):
    from qllava.vision import open_image

    path = pictures(tmp_path, 2)
    Image.new("L", (100, 100)).save(tmp_path / "img" / "p1.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 10,000 pixels: over twice the limit, as a bomb is
    report = DataReport()
    convs = read_conversations(path, str(tmp_path / "img"), 0, report)
    assert [c.id for c in convs] == ["p0"]
    assert report.skipped == {
        "image larger than PIL's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS pixels)": 1
    }
    with pytest.raises(
        VisionError,
        match=r"p1.png: too large to decode safely: Image size \(10000 pixels\) exceeds "
        r"limit of 8000 pixels",
    ):
        open_image(tmp_path / "img" / "p1.png")
