"""`qllava export --gguf`, checked by llama.cpp itself (release 11434, built by tests/llama_cpp_build.py): the files
load in llama-mtmd-cli, llama-tokenize tokenizes prompts into the ids training used, the image features llama.cpp
computes are transformers' (SigLIP) or exactly what llama.cpp's known class-token defect makes of them (CLIP), and
llama.cpp's greedy answers equal `qllava chat`'s, for the tiny demo run and a SmolLM2-135M + SigLIP run, in f32, f16
and q8_0; q4_k_m through llama-quantize; LLaVA-NeXT's difference measured. Then every refusal, before any file is
written. The tests that need llama.cpp are skipped, saying why, where it cannot be built."""

import json
import os
import re
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import next_recipe
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qllava import cli, export, templates, vision
from qllava.chat import Chat
from qllava.data import encode
from qllava.export import export_gguf
from qllava.inference import load_for_inference

# llama.cpp's image features against transformers', relative to the largest feature: llama.cpp turns the image into
# float16 patches (im2col), attends with float16 keys and values and tabulates GELU in float16. Measured: 1.4e-4 (tiny
# CLIP, against the class-token-last tower), 2.4e-4 (SigLIP, f32 export), 4.1e-4 (SigLIP, f16 export).
TOLERANCE = 2e-3
Q4_K_M_BYTES = 120_000_000  # SmolLM2-135M: F32 540 MB, F16 271 MB, Q8_0 145 MB, Q4_K_M measured 105.5 MB
# (width, height) -> image tokens: (transformers' LLaVA-NeXT, llama.cpp 11434's) on the tiny 64 px tiles. llama.cpp
# encodes the base view (16 tokens) and, for an image larger than a tile, each tile of the grid (16 each), with no
# unpadding and no image_newline; transformers unpads the tiles' features to the image's aspect and ends each row
# with image_newline.
NEXT_TOKENS = {(48, 96): (56, 48), (64, 64): (36, 16), (72, 64): (36, 48), (96, 48): (52, 48), (112, 56): (52, 48)}


def gguf_files(folder: Path) -> tuple[Path, Path]:
    text = next(f for f in folder.glob("*.gguf") if not f.name.startswith("mmproj-"))
    return text, next(folder.glob("mmproj-*.gguf"))


def llama_answer(
    bin_dir: Path, folder: Path, image: Path, question: str, max_new_tokens: int = 8, debug_graph: bool = False
) -> tuple[str, str]:
    """llama-mtmd-cli's greedy answer and all it printed, with the options export prints.

    llama.cpp logs (the answer and the graph debug alike) through a queue that a thread writes out, and exits without
    flushing it: a one-question run (-p) loses the end of its output now and then. So the conversation mode is used,
    each step awaited before the next is typed, and ended only once the answer is out: the image (`/image`), then the
    question, which llama-mtmd-cli renders as -p renders it (the image marker, then the question)."""
    text, mmproj = gguf_files(folder)
    env = {**os.environ, **({"MTMD_DEBUG_GRAPH": "1"} if debug_graph else {})}
    command = [
        str(bin_dir / "llama-mtmd-cli"),
        "-m",
        str(text),
        "--mmproj",
        str(mmproj),
        "--jinja",
        "--temp",
        "0",
        "-n",
        str(max_new_tokens),
        "-c",
        "2048",
        "-t",
        "2",
    ]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    ) as process:
        out, err = Output(process.stdout), Output(process.stderr)
        for line, prompts in ((f"/image {image}", 1), (question, 2)):  # a prompt at start, one after each step
            out.wait_for(PROMPT, prompts, process)
            process.stdin.write(f"{line}\n".encode())
            process.stdin.flush()
        out.wait_for(PROMPT, 3, process)
        process.stdin.close()
        process.wait(timeout=60)
    printed = out.text()
    assert printed.count(PROMPT) >= 3, f"llama-mtmd-cli did not answer: {err.text()[-3000:]}"
    turn = printed.split(PROMPT)[2].split("\n", 1)[1]  # the question as typed, then the features, then the answer
    answer = turn.rsplit("sum = ", 1)[-1].split("\n", 1)[-1] if debug_graph else turn
    return answer.strip(), printed + err.text()


PROMPT = "\n> "


class Output:
    """A process's output stream, read as it comes by a thread."""

    def __init__(self, stream):
        self.chunks = []
        self.thread = threading.Thread(target=lambda: self.chunks.extend(iter(lambda: stream.read1(1 << 16), b"")))
        self.thread.start()

    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for(self, marker: str, count: int, process, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.text().count(marker) < count and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)


def qllava_answer(model, image: Path, question: str, max_new_tokens: int = 8) -> str:
    return Chat(model, image).reply(question, max_new_tokens=max_new_tokens)


def image_features_logged(log: str) -> tuple[np.ndarray, float]:
    """The projector's output as llama.cpp's graph debug prints it: the first and last 3 values of the first and last
    3 image tokens (6 x 6), and the sum of all values."""
    block = next(b for b in log.split("common_debug_cb_eval:") if "mm.2.bias" in b.split("\n", 1)[0])
    rows = re.findall(r"\[([^\[\]]*\.\.\.[^\[\]]*)\]", block)
    values = np.array([[float(x) for x in re.findall(r"-?\d+\.\d+", row)] for row in rows])
    return values, float(re.search(r"sum = (-?[\d.]+)", block).group(1))


def image_tokens_logged(log: str) -> int:
    """How many image tokens llama.cpp fed the decoder: the projector outputs its graph debug printed, each
    {hidden, tokens, 1, 1}."""
    headers = [b.split("\n", 1)[0] for b in log.split("common_debug_cb_eval:") if "mm.2.bias" in b.split("\n", 1)[0]]
    return sum(int(re.search(r"= \{\d+, (\d+), 1, 1\}\s*$", header).group(1)) for header in headers)


def corners(features: torch.Tensor) -> np.ndarray:
    f = features.float().numpy()
    rows = f[[0, 1, 2, -3, -2, -1]]
    return np.concatenate([rows[:, :3], rows[:, -3:]], axis=1)


def transformers_features(loaded, image: Path) -> torch.Tensor:
    """The projected image features of `image` (tokens x hidden), as transformers' LLaVA computes them."""
    pixels = vision.image_inputs(
        [vision.open_image(image)], loaded.processor.image_processor, loaded.image_aspect_ratio
    )["pixel_values"].float()
    with torch.no_grad():
        out = loaded.model.model.get_image_features(pixel_values=pixels).pooler_output
    return torch.cat(list(out)) if isinstance(out, (list, tuple)) else out.reshape(-1, out.shape[-1])


@contextmanager
def class_token_last(model):
    """transformers' CLIP tower as llama.cpp 11434's graph computes it (ggml-org/llama.cpp#25814): the class token
    after the patches, position embeddings added in that order. LLaVA's dropping of the first feature then keeps what
    llama.cpp keeps: the outputs of the patches but the first, and of the class token."""
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model  # a run's model is peft's
    tower = getattr(llava.model.vision_tower, "vision_model", llava.model.vision_tower)
    embeddings = tower.embeddings

    def forward(pixel_values, interpolate_pos_encoding=False):
        weight = embeddings.patch_embedding.weight
        patches = embeddings.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        tokens = torch.cat([patches, embeddings.class_embedding.expand(patches.shape[0], 1, -1)], dim=1)
        return tokens + embeddings.position_embedding.weight[: tokens.shape[1]]

    embeddings.forward = forward
    try:
        yield
    finally:
        del embeddings.forward


def tower_sized(image: Path, size: int, out: Path) -> Path:
    """The image resized to the tower's square: neither llama.cpp nor transformers resizes it again, so features
    compare the models, not two resampling filters."""
    vision.open_image(image).resize((size, size)).save(out)
    return out


def llama_tokens(bin_dir: Path, text_file: Path, text: str, bos: bool, tmp_path: Path) -> list[int]:
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(text.encode())
    done = subprocess.run(
        [
            str(bin_dir / "llama-tokenize"),
            "-m",
            str(text_file),
            "-f",
            str(prompt),
            "--ids",
            "--log-disable",
            "--no-escape",
            *([] if bos else ["--no-bos"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_prompts_tokenize_as_trained(bin_dir, folder, loaded, prompts, tmp_path) -> int:
    """Each prompt (user turns with the image first) rendered with the model's template and tokenized as training
    does, equals llama.cpp's tokens of the same text chunks (mtmd tokenizes the text around an image on its own, the
    first chunk with BOS); returns how many prompts were compared."""
    text_file, _ = gguf_files(folder)
    tokenizer = loaded.processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for prompt in prompts:
        rendered = templates.render(
            loaded.template,
            [("user", "<image>\n" + prompt)],
            tokenizer.bos_token or "",
            tokenizer.eos_token,
            generation_prompt=True,
        )
        trained = encode(rendered, tokenizer, image_id)[0]
        chunks = rendered.text.split("<image>")
        ours = (
            llama_tokens(bin_dir, text_file, chunks[0], True, tmp_path)
            + [image_id]
            + llama_tokens(bin_dir, text_file, chunks[1], False, tmp_path)
        )
        assert ours == trained, (prompt, ours, trained)
    return len(prompts)


def held_out(tiny_inputs, n: int) -> list[tuple[Path, str]]:
    samples = json.loads((tiny_inputs / "shapes" / "eval.json").read_text())[:n]
    return [
        (tiny_inputs / "shapes" / "images" / s["image"], s["conversations"][0]["value"].replace("<image>\n", ""))
        for s in samples
    ]


# ---------------------------------------------------------------------------------------------------------------
# Without llama.cpp: the chat template, the refusals.


@pytest.mark.parametrize("template", ["vicuna_v1", "mistral_instruct", "llava_llama_2"])
@pytest.mark.parametrize("marker", ["<__media__>", "<__media_k2F9xQ__>"])
def test_the_gguf_chat_template_renders_llama_cpps_media_markers_as_training_renders_the_image(template, marker):
    # llama-mtmd-cli and llama-server hand the template "MARKER" + the user's text, glued together (the server's marker
    # is random); training put the image first in the turn and a line break after it
    gguf_template = templates.chat_template(template, bos_first=True, media_markers=True)
    render = ImmutableSandboxedEnvironment().from_string(gguf_template).render
    for question in ("What is this?", "\nWhat is this?  ", " What is this?"):
        messages = [{"role": "user", "content": marker + question}]
        expected = templates.render(
            template, [("user", "<image>\n" + question.strip())], "<s>", "</s>", generation_prompt=True
        ).text.replace("<image>", marker)
        assert (
            render(messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True) == "<s>" + expected
        )
    # text without a marker, and later turns, are rendered as the merged checkpoint's own template renders them
    turns = [
        {"role": "user", "content": marker + "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    plain = ImmutableSandboxedEnvironment().from_string(templates.chat_template(template, True)).render
    assert render(messages=turns, bos_token="<s>", eos_token="</s>", add_generation_prompt=True) == plain(
        messages=[{**turns[0], "content": marker + "\nQ1"}, *turns[1:]],
        bos_token="<s>",
        eos_token="</s>",
        add_generation_prompt=True,
    )


def test_the_cli_offers_the_types_export_writes():
    parser = cli._parser()
    export_parser = parser._subparsers._group_actions[0].choices["export"]
    assert next(a for a in export_parser._actions if a.dest == "type").choices == export.GGUF_TYPES


def test_an_unfinished_stage2_an_existing_folder_and_missing_tools_are_refused_before_writing(
    trained_run, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "stage2" / "metrics.json").unlink()
    out = tmp_path / "gguf"
    assert cli.main(["export", str(run), "--gguf", str(out)]) == 2
    err = capsys.readouterr().out
    assert f"{run / 'stage2'} is not complete" in err and "--resume" in err
    shutil.rmtree(run / "stage2")
    assert cli.main(["export", str(run), "--gguf", str(out)]) == 2
    assert "stage 2 has not run" in capsys.readouterr().out
    out.mkdir()
    assert cli.main(["export", str(trained_run), "--gguf", str(out)]) == 2
    assert f"{out} exists: pass --overwrite" in capsys.readouterr().out
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert cli.main(["export", str(trained_run), "--gguf", str(tmp_path / "q4"), "--type", "q4_k_m"]) == 2
    assert "llama-quantize, which is not on PATH" in capsys.readouterr().out
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    assert cli.main(["export", str(trained_run), "--gguf", str(tmp_path / "g")]) == 2
    assert "pip install 'gguf>=0.19'" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf", "run"] and not any(out.iterdir())


def test_without_cmake_or_a_compiler_the_llama_cpp_tests_are_skipped_saying_why(monkeypatch):
    import llama_cpp_build

    monkeypatch.setattr(llama_cpp_build.shutil, "which", lambda tool: None if tool == "cmake" else "/usr/bin/" + tool)
    assert llama_cpp_build.why_not_buildable() == "building llama.cpp needs cmake, not found on PATH"


def test_the_cli_prints_the_files_their_sizes_and_the_command_to_try_them(trained_run, tmp_path, capsys):
    assert cli.main(["export", str(trained_run), "--gguf", str(tmp_path / "gguf"), "--type", "q8_0"]) == 0
    printed = capsys.readouterr().out
    text, mmproj = gguf_files(tmp_path / "gguf")
    assert f"{text}  0.1 MiB" in printed and f"{mmproj}  0.5 MiB" in printed
    assert f"llama-mtmd-cli -m {text} --mmproj {mmproj} --jinja --temp 0 --image IMAGE.jpg" in printed
    assert "note: llama.cpp (release 11434) puts CLIP's class token after the patches" in printed


def test_a_merged_folder_exports_what_its_run_exports(trained_run, merged_fp32, tmp_path):
    import gguf

    for source in (trained_run, merged_fp32):
        export_gguf(source, tmp_path / source.name, gguf_type="f32", say=lambda _: None)
    for run_file, merged_file in zip(gguf_files(tmp_path / trained_run.name), gguf_files(tmp_path / merged_fp32.name)):
        run_gguf, merged_gguf = gguf.GGUFReader(run_file), gguf.GGUFReader(merged_file)
        assert [t.name for t in run_gguf.tensors] == [t.name for t in merged_gguf.tensors]
        for ours, theirs in zip(run_gguf.tensors, merged_gguf.tensors):  # the float32 merge, bit for bit
            assert np.array_equal(ours.data, theirs.data), ours.name
        fields = {k for k in run_gguf.fields if not k.startswith("GGUF.")} - {"general.name"}
        assert all(run_gguf.fields[k].contents() == merged_gguf.fields[k].contents() for k in fields)


def edited_copy(merged: Path, tmp_path: Path, **changes) -> Path:
    """The merged folder with its config.json changed: dotted keys ("text_config.model_type") set to new values."""
    folder = tmp_path / "edited"
    shutil.copytree(merged, folder)
    config = json.loads((folder / "config.json").read_text())
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        node = config
        for part in path:
            node = node[part]
        node[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "changes, refusal",
    [
        ({"text_config.model_type": "qwen2"}, "decoder architecture 'qwen2'"),
        (
            {
                "vision_config": {
                    "model_type": "dinov2",
                    "hidden_size": 128,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "intermediate_size": 256,
                    "image_size": 518,
                    "patch_size": 14,
                }
            },
            "vision tower DINOv2: llama.cpp's LLaVA graph",
        ),
        ({"projector_hidden_act": "silu"}, "projector: silu activation"),
        ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy 'full' with a clip_vision_model"),
        ({"vision_config.hidden_act": "relu"}, "vision tower: activation 'relu'"),
    ],
)
def test_a_model_llama_cpp_cannot_run_is_refused_naming_why(changes, refusal, merged_fp32, tmp_path, capsys):
    folder = edited_copy(merged_fp32, tmp_path, **{k.replace("__", "."): v for k, v in changes.items()})
    assert cli.main(["export", str(folder), "--gguf", str(tmp_path / "out")]) == 2
    assert refusal in capsys.readouterr().out
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.fixture(scope="module")
def merged_fp32(trained_run, tmp_path_factory):
    from qllava.merge import merge

    out = tmp_path_factory.mktemp("export_merged") / "merged"
    merge(trained_run, out, dtype="float32", verify=False, say=lambda _: None)
    return out


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp itself on the exported files.


@pytest.fixture(scope="module")
def tiny_exports(trained_run, llama_cpp, tmp_path_factory):
    """The tiny demo run exported from the run itself (merged on the fly) in f32, f16 and q8_0."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    return {
        t: (root / t, export_gguf(trained_run, root / t, gguf_type=t, say=lambda _: None))
        for t in ("f32", "f16", "q8_0")
    }


def test_the_tiny_demo_export_writes_both_files_and_the_command_to_try_them(tiny_exports):
    import gguf

    folder, report = tiny_exports["f16"]
    text, mmproj = gguf_files(folder)
    assert (text.name, mmproj.name) == ("run-F16.gguf", "mmproj-run-F16.gguf")
    assert [p for p, _ in report["files"]] == [text, mmproj] and all(s > 0 for _, s in report["files"])
    assert report["command"].startswith(f"llama-mtmd-cli -m {text} --mmproj {mmproj} --jinja --temp 0")
    fields = gguf.GGUFReader(mmproj).fields
    assert fields["clip.projector_type"].contents() == "mlp" and fields["clip.vision.image_size"].contents() == 64
    assert fields["clip.vision.feature_layer"].contents() == [1] and fields["clip.use_gelu"].contents() is False
    assert fields["clip.vision.block_count"].contents() == 1  # the layer after the feature layer is not written
    text_fields = gguf.GGUFReader(text).fields
    assert text_fields["tokenizer.ggml.model"].contents() == "llama"
    assert "<__media" in text_fields["tokenizer.chat_template"].contents()
    assert not folder.with_name(folder.name + ".partial").exists()


def test_llama_cpp_tokenizes_the_tiny_demos_prompts_as_training_did(
    tiny_exports, trained_run, tiny_inputs, llama_cpp, tmp_path
):
    loaded = load_for_inference(trained_run)
    prompts = sorted({q for _, q in held_out(tiny_inputs, 72)}) + ["Which shapes can appear in the pictures?"]
    assert assert_prompts_tokenize_as_trained(llama_cpp, tiny_exports["f32"][0], loaded, prompts, tmp_path) == 4


def test_the_tiny_demos_clip_features_in_llama_cpp_are_transformers_with_the_class_token_last(
    tiny_exports, trained_run, tiny_inputs, llama_cpp, tmp_path
):
    loaded = load_for_inference(trained_run, quantized=False)
    image = tower_sized(tiny_inputs / "shapes" / "images" / "eval-0.png", 64, tmp_path / "square.png")
    right = transformers_features(loaded, image)
    with class_token_last(loaded.model):
        shifted = transformers_features(loaded, image)
    scale = right.abs().max().item()
    for gguf_type in ("f32", "f16"):
        _, log = llama_answer(
            llama_cpp, tiny_exports[gguf_type][0], image, "What color is the shape?", 1, debug_graph=True
        )
        logged, total = image_features_logged(log)
        # llama.cpp computes the features of the class-token-last tower (ggml-org/llama.cpp#25814) ...
        assert np.abs(corners(shifted) - logged).max() <= TOLERANCE * scale, gguf_type
        assert abs(shifted.sum().item() - total) <= TOLERANCE * scale * shifted.numel() ** 0.5, gguf_type
        # ... which are far from transformers' own (docs/merge-export.md)
        assert np.abs(corners(right) - logged).max() > 0.1 * scale


def test_llama_cpps_answers_on_the_tiny_demo_are_qllava_chats_given_llama_cpps_image_features(
    tiny_exports, trained_run, tiny_inputs, llama_cpp
):
    loaded = load_for_inference(trained_run, quantized=False)
    questions = held_out(tiny_inputs, 12)
    with class_token_last(loaded.model):
        expected = [qllava_answer(loaded, image, question) for image, question in questions]
    # here the defect does not change an answer: `qllava chat` on the run (4-bit) answers the same
    trained = load_for_inference(trained_run)
    assert [qllava_answer(trained, image, question) for image, question in questions] == expected
    for gguf_type in ("f32", "f16", "q8_0"):
        answers = [
            llama_answer(llama_cpp, tiny_exports[gguf_type][0], image, question)[0] for image, question in questions
        ]
        assert answers == expected, gguf_type


# SmolLM2-135M-Instruct (real weights, 30 layers, byte-level BPE) with a SigLIP tower: no class token, so llama.cpp
# computes transformers' features, and answers as qllava chat does.


@pytest.fixture(scope="module")
def smollm2_exports(smollm2_run, llama_cpp, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2_gguf")
    for gguf_type in ("f32", "f16", "q8_0"):
        export_gguf(smollm2_run[0], root / gguf_type, gguf_type=gguf_type, say=lambda _: None)
    return {gguf_type: root / gguf_type for gguf_type in ("f32", "f16", "q8_0")}


def test_llama_cpp_computes_transformers_image_features_for_a_siglip_tower(
    smollm2_exports, smollm2_run, tiny_inputs, llama_cpp, tmp_path
):
    loaded = load_for_inference(smollm2_run[0], quantized=False)
    image = tower_sized(tiny_inputs / "shapes" / "images" / "eval-0.png", 64, tmp_path / "square.png")
    right = transformers_features(loaded, image)
    scale = right.abs().max().item()
    for gguf_type in ("f32", "f16"):
        _, log = llama_answer(
            llama_cpp, smollm2_exports[gguf_type], image, "What color is the shape?", 1, debug_graph=True
        )
        logged, total = image_features_logged(log)
        assert np.abs(corners(right) - logged).max() <= TOLERANCE * scale, gguf_type
        assert abs(right.sum().item() - total) <= TOLERANCE * scale * right.numel() ** 0.5, gguf_type


def test_llama_cpps_greedy_answers_equal_qllava_chat_on_the_smollm2_run(
    smollm2_exports, smollm2_run, tiny_inputs, llama_cpp
):
    # the run's model in full precision: what the export holds (`qllava chat` on the merged folder answers the same;
    # on the run itself it loads the 4-bit training model, which answered 11 of 12 of these questions alike)
    full = load_for_inference(smollm2_run[0], quantized=False)
    for image, question in held_out(tiny_inputs, 4):
        expected = qllava_answer(full, image, question)
        for gguf_type, folder in smollm2_exports.items():
            assert llama_answer(llama_cpp, folder, image, question)[0] == expected, (gguf_type, question)


ADVERSARIAL = [
    "What is 12345 + 678?",
    "  two  spaces,\ttab\nnewline\n\nblank line  ",
    "café, naïve, 東京, 🙂",
    "It's, they're, we've, I'll; don't.",
    "<|im_end|> and </s> as text",
    "x" * 300,
]


def test_llama_cpp_tokenizes_smollm2_prompts_as_training_did(
    smollm2_exports, smollm2_run, tiny_inputs, llama_cpp, tmp_path
):
    loaded = load_for_inference(smollm2_run[0], quantized=False)
    prompts = sorted({q for _, q in held_out(tiny_inputs, 72)}) + ADVERSARIAL
    assert assert_prompts_tokenize_as_trained(llama_cpp, smollm2_exports["f16"], loaded, prompts, tmp_path) == 9


def test_q4_k_m_is_made_by_llama_quantize_and_runs(smollm2_run, tiny_inputs, llama_cpp, tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("PATH", f"{llama_cpp}{os.pathsep}{os.environ['PATH']}")
    report = export_gguf(smollm2_run[0], tmp_path / "q4", gguf_type="q4_k_m", say=lambda _: None)
    text, mmproj = gguf_files(tmp_path / "q4")
    assert sorted(p.name for p in (tmp_path / "q4").iterdir()) == sorted([text.name, mmproj.name])  # nothing else
    assert gguf.GGUFReader(text).fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert dict(report["files"])[text] < Q4_K_M_BYTES
    image, question = held_out(tiny_inputs, 1)[0]
    llama_answer(llama_cpp, tmp_path / "q4", image, question)  # loads and answers (9 of 12 answers as f16's)


# LLaVA-NeXT: llama.cpp's anyres is not transformers': measured, and the measure held.


@pytest.fixture(scope="module")
def next_run(next_inputs, tmp_path_factory):
    from qllava import train

    run = tmp_path_factory.mktemp("next_export") / "run"
    train.finetune(
        next_recipe(next_inputs, run, "stage1.max_steps=3", "stage2.max_steps=6", "eval.at=[]"), say=lambda _: None
    )
    return run


def test_llava_next_exports_its_grid_and_newline_and_llama_cpp_tiles_images_its_own_way(
    next_run, next_inputs, llama_cpp, tmp_path
):
    import gguf

    export_gguf(next_run, tmp_path / "next", gguf_type="f32", say=lambda _: None)
    _, mmproj = gguf_files(tmp_path / "next")
    reader = gguf.GGUFReader(mmproj)
    # transformers lists (height, width) pinpoints, llama.cpp reads (width, height) pairs
    assert reader.fields["clip.vision.image_grid_pinpoints"].contents() == [128, 64, 64, 128]
    assert reader.fields["clip.vision.mm_patch_merge_type"].contents() == "spatial_unpad"
    assert "v.image_newline" in {t.name for t in reader.tensors}
    loaded = load_for_inference(next_run)
    images = {}
    for image, _ in held_out(next_inputs, 24):
        images.setdefault(vision.image_header(image).size, image)
    counts = {}
    for size, image in sorted(images.items()):
        _, log = llama_answer(llama_cpp, tmp_path / "next", image, "What color is the shape?", 1, debug_graph=True)
        counts[size] = (loaded.geometry.tokens_of(size), image_tokens_logged(log))
    # llama.cpp: the base view (16 tokens) and, for an image larger than a tile, its tiles (16 each), no unpadding,
    # no image_newline; transformers: the base view, the tiles unpadded to the image's aspect, a newline per row
    assert counts == NEXT_TOKENS
