"""qllava eval (batched, resumable, the demo's own scorer, answers files LLaVA's scripts read) and qllava compare."""

import dataclasses
import json

import pytest
from conformance_corpus import WRITERS

from qllava import evaluate as ev
from qllava.cli import main
from qllava.compare import chart, compare, paired_bootstrap
from qllava.data import DataError
from qllava.inference import Loaded, prompt_ids
from qllava.scorers import load_items, score

LLAVA_FIELDS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}  # model_vqa*.py's records


@pytest.fixture
def eval_args(trained_run, tiny_inputs):
    shapes = tiny_inputs / "shapes"
    return dict(model_path=trained_run, benchmark="vqa", data=str(shapes / "eval.json"), images=str(shapes / "images"))


def test_an_interrupted_eval_resumes_without_redoing_answered_questions(eval_args, tmp_path, monkeypatch):
    out = tmp_path / "answers.jsonl"
    asked = []
    real_answer = ev.answer

    def counting(loaded, items, *args, **kwargs):
        asked.extend(i.question_id for i in items)
        return real_answer(loaded, items, *args, **kwargs)

    monkeypatch.setattr(ev, "answer", counting)

    def stop_after_two_batches(done, total):
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(**eval_args, out=out, limit=12, batch_size=4, max_new_tokens=4, progress=stop_after_two_batches)
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(first) == 8 and len(asked) == 8
    with out.open("a") as f:
        f.write('{"question_id": "eval-9", "te')  # a line cut by the kill: ignored, asked again
    result = ev.evaluate(**eval_args, out=out, limit=12, batch_size=4, max_new_tokens=4)
    assert result["asked_now"] == 4 and asked[8:] == ["eval-8", "eval-9", "eval-10", "eval-11"]
    records = [json.loads(line) for line in out.read_text().splitlines()]  # the cut line is gone: JSON lines again
    assert [r["text"] for r in records[:8]] == [r["text"] for r in first] and len(records) == 12
    assert [r["question_id"] for r in records] == [f"eval-{i}" for i in range(12)]
    assert all(
        set(r) == LLAVA_FIELDS
        and r["prompt"] == "<image>\nWhat color is the shape?"
        or r["prompt"].startswith("<image>\n")
        for r in records
    )
    again = ev.evaluate(**eval_args, out=out, limit=12, batch_size=4, max_new_tokens=4)
    assert again["asked_now"] == 0 and again["metrics"] == result["metrics"] and len(asked) == 12
    assert set(result["per_question"]) == {f"eval-{i}" for i in range(12)}


def test_answers_of_another_model_are_refused(eval_args, tmp_path):
    out = tmp_path / "answers.jsonl"
    out.write_text(
        json.dumps(
            {"question_id": "eval-0", "text": "red", "metadata": {"key": "eval-0", "model_fingerprint": "someone-else"}}
        )
        + "\n"
    )
    with pytest.raises(DataError, match="holds answers of another model"):
        ev.evaluate(**eval_args, out=out, limit=2)


def test_the_finetune_scores_are_qllava_evals(trained_run, eval_args):
    """finetune's held-out accuracy after stage 2 is what `qllava eval` gives the saved run, question for question."""
    run_metrics = json.loads((trained_run / "metrics.json").read_text())
    result = ev.evaluate(**eval_args, out=trained_run / "check.jsonl", limit=36, batch_size=36, max_new_tokens=6)
    assert result["metrics"]["accuracy"] == run_metrics["accuracy_stage2"]
    assert result["metrics"]["chance"] == run_metrics["chance"]


def test_eval_cli_and_compare(eval_args, trained_run, tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common = [
        "--benchmark",
        "vqa",
        "--data",
        eval_args["data"],
        "--images",
        eval_args["images"],
        "--limit",
        "12",
        "--max-new-tokens",
        "4",
    ]
    assert main(["eval", str(trained_run), *common, "--out", str(a)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["eval", str(trained_run), *common, "--out", str(b), "--batch-size", "5"]) == 0
    assert main(["compare", str(a), str(b.with_name("b.metrics.json")), "--out", str(tmp_path / "cmp")]) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| backbone |" in report and "mistral" in report and "95% CI" in report
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert main(["compare", str(tmp_path / "missing.metrics.json")]) == 2
    assert (
        f"{tmp_path / 'missing.metrics.json'}: no such file (a result is the FILE.metrics.json that qllava eval"
        in " ".join(capsys.readouterr().out.split())
    )


def test_paired_bootstrap():
    first = {str(i): float(i % 2) for i in range(200)}
    second = {str(i): 1.0 for i in range(200)}
    d = paired_bootstrap(first, second)
    assert d["questions"] == 200 and d["mean"] == pytest.approx(0.5)
    assert d["ci95"][0] < 0.5 < d["ci95"][1] and d["ci95"][1] - d["ci95"][0] < 0.2
    same = paired_bootstrap(first, first)
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0]
    assert paired_bootstrap({"a": 1.0}, {"b": 1.0}) == {"questions": 0}


@pytest.mark.parametrize("name", WRITERS)
def test_answers_files_are_the_ones_llava_writes(name, tmp_path, monkeypatch):
    """qllava eval's answers file holds, line for line, what LLaVA's model_vqa*.py writes for the same answers
    (question_id with its JSON type, prompt, text), which official scripts were run on for test_conformance.py."""
    paths = WRITERS[name](tmp_path / "corpus")
    benchmark = {"textvqa": "vqa", "gqa": "vqa"}.get(name, name)
    llava_answers = ev.read_answers(paths["answers"])
    monkeypatch.setattr(ev, "answer", lambda loaded, items, *args, **kw: [llava_answers[i.question_id] for i in items])
    out = tmp_path / "answers.jsonl"
    result = ev.evaluate(
        tmp_path,
        benchmark,
        str(paths["data"]),
        out=out,
        annotations=str(paths["annotations"]),
        batch_size=1000,
        loaded=no_model(),
    )
    ours = [json.loads(line) for line in out.read_text().splitlines()]
    theirs = [json.loads(line) for line in paths["answers"].read_text().splitlines()]
    assert all(set(r) == LLAVA_FIELDS for r in ours)
    fields = ("question_id", "prompt", "text")
    assert [tuple(r[f] for f in fields) for r in ours] == [tuple(r[f] for f in fields) for r in theirs]
    items = load_items(benchmark, str(paths["data"]), str(paths["annotations"]))
    assert result["metrics"] == score(benchmark, items, llava_answers)[0]


def no_model(template: str = "vicuna_v1") -> Loaded:
    """A Loaded for evaluate() calls whose answers are given (ev.answer patched): no model, no context to check."""
    from types import SimpleNamespace

    return Loaded(SimpleNamespace(config=SimpleNamespace()), None, template, "pad", "run")


def write_result(path, per_question, benchmark="vqa", question_set="q1"):
    path.write_text(
        json.dumps(
            {
                "benchmark": benchmark,
                "data": "d",
                "model": {"name": path.name.split(".")[0]},
                "metrics": {"accuracy": sum(per_question.values()) / len(per_question)},
                "per_question": per_question,
                "question_set": question_set,
            }
        )
    )
    return path


def test_compare_pairs_only_results_on_the_same_questions(tmp_path, capsys):
    first = write_result(tmp_path / "a.metrics.json", {"1": 1.0, "2": 0.0, "3": 1.0})
    same = write_result(tmp_path / "b.metrics.json", {"1": 0.0, "2": 0.0, "3": 1.0})
    fewer = write_result(tmp_path / "c.metrics.json", {"1": 1.0, "2": 1.0})
    other_file = write_result(tmp_path / "d.metrics.json", {"1": 1.0, "2": 0.0, "3": 1.0}, question_set="q2")
    other_benchmark = write_result(tmp_path / "e.metrics.json", {"1": 1.0, "2": 0.0, "3": 1.0}, benchmark="pope")
    report = compare([first, same, fewer, other_file, other_benchmark], tmp_path / "cmp")
    d = report["difference_vs_first"]
    assert d["b"]["paired"] and d["b"]["questions"] == 3 and d["b"]["mean"] == pytest.approx(-1 / 3)
    assert d["c"] == {
        "paired": False,
        "reason": "different question sets (2 questions in both, 1 only in the first, 0 only in this one)",
    }
    assert d["d"]["reason"] == "the same question ids with other questions or references (another question file)"
    assert d["e"]["reason"] == "different benchmarks (vqa and pope)"
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "| accuracy | 0.6667 | 0.3333 (-0.3333) | 1.0000 | 0.6667 | 0.6667 |" in md  # no differences unpaired
    assert "- c vs a: not paired, different question sets (2 questions in both" in md and md.count("95% CI") == 1
    chart_axes = chart(report).axes
    assert len(chart_axes) == 2  # the scores, and beside them the paired difference with its 95% interval
    bars = chart_axes[1].containers[0]
    (low, _), (high, _) = bars.lines[2][0].get_segments()[0]
    assert (list(bars.lines[0].get_xdata()), low, high) == ([d["b"]["mean"]], *d["b"]["ci95"])
    assert len(chart(compare([first, fewer])).axes) == 1  # nothing paired: no interval to show
    assert main(["compare", str(first), str(fewer)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "not paired: different question sets (2 questions in both, 1 only in the first" in printed
    assert "(+" not in printed and "95% CI" not in printed


# --- eval settings: negative limits, the settings an answers file was made with, the decoder's context ---


def test_a_negative_limit_is_refused_before_anything_is_written(eval_args, tiny_recipe, tmp_path):
    from qllava.recipe import RecipeError

    out = tmp_path / "answers.jsonl"
    for limit in (-1, -359):
        with pytest.raises(DataError, match=f"limit {limit}: must be >= 0"):
            ev.evaluate(**eval_args, out=out, limit=limit)
    assert not out.exists() and not ev.metrics_file(out).exists()
    with pytest.raises(RecipeError, match=r"eval.limit: must be >= 0 \(0: every question\), got -1"):
        tiny_recipe("eval.limit=-1")
    assert len(ev.first_questions(list(range(5)), 0)) == 5 and ev.first_questions(list(range(5)), 2) == [0, 1]


@pytest.fixture
def given_answers(monkeypatch):
    """ev.answer answering "red" to every question, counting the questions asked."""
    asked = []

    def answer(loaded, items, *args, **kwargs):
        asked.extend(item.question_id for item in items)
        return ["red"] * len(items)

    monkeypatch.setattr(ev, "answer", answer)
    return asked


def _rewrite(path, change):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        change(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_an_answers_file_is_continued_only_with_the_settings_it_was_made_with(
    eval_args, given_answers, tmp_path, capsys
):
    out = tmp_path / "answers.jsonl"
    ev.evaluate(**eval_args, out=out, limit=4, max_new_tokens=4)
    settings = {"max_new_tokens": 4, "template": "mistral_instruct", "image_aspect_ratio": "pad", "blank_images": False}
    assert all(json.loads(line)["metadata"]["settings"] == settings for line in out.read_text().splitlines())
    assert json.loads(ev.metrics_file(out).read_text())["settings"] == settings
    # the same settings continue it: only the new questions are asked
    assert ev.evaluate(**eval_args, out=out, limit=8, max_new_tokens=4)["asked_now"] == 4 and len(given_answers) == 8
    files = {p: p.read_bytes() for p in (out, ev.metrics_file(out))}
    cases = [
        (dict(max_new_tokens=16), None, "max_new_tokens 4 there, 16 now"),
        (
            dict(max_new_tokens=4),
            lambda r: r["metadata"]["settings"].update(template="vicuna_v1"),
            "template 'vicuna_v1' there, 'mistral_instruct' now",
        ),
        (
            dict(max_new_tokens=4),
            lambda r: r["metadata"]["settings"].update(image_aspect_ratio="anyres"),
            "image_aspect_ratio 'anyres' there, 'pad' now",
        ),
        (dict(max_new_tokens=4, blank_images=True), None, "blank_images False there, True now"),
    ]
    for options, change, says in cases:
        if change:
            _rewrite(out, change)
        with pytest.raises(DataError) as refused:
            ev.evaluate(**eval_args, out=out, limit=12, **options)
        message = str(refused.value)
        assert message.startswith(f"{out} holds answers made with other settings") and says in message
        assert "pass another --out (or remove the file)" in message
        if change:
            out.write_bytes(files[out])
        assert {p: p.read_bytes() for p in files} == files and len(given_answers) == 8  # nothing asked, nothing written
    # the same ids asking other questions (another question file): refused too
    _rewrite(
        out, lambda r: r.update(prompt="<image>\nWhat is the weather like?") if r["question_id"] == "eval-2" else None
    )
    with pytest.raises(DataError, match="holds answers to other questions under the same ids \\(1, e.g. eval-2"):
        ev.evaluate(**eval_args, out=out, limit=12, max_new_tokens=4)
    out.write_bytes(files[out])
    # through the command line: one line, exit status 2, the file untouched
    common = ["--benchmark", "vqa", "--data", eval_args["data"], "--images", eval_args["images"], "--out", str(out)]
    assert main(["eval", str(eval_args["model_path"]), *common, "--max-new-tokens", "128"]) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert f"error: {out} holds answers made with other settings (max_new_tokens 4 there, 128 now)" in printed
    assert {p: p.read_bytes() for p in files} == files


def long_questions(tiny_inputs, tmp_path, repeats: dict[int, int]) -> str:
    """The first held-out questions, question i asked `repeats[i]` times over in one message."""
    rows = json.loads((tiny_inputs / "shapes" / "eval.json").read_text())[:4]
    for i, n in repeats.items():
        turn = rows[i]["conversations"][0]
        turn["value"] = "<image>\n" + " ".join([turn["value"].removeprefix("<image>\n")] * n)
    path = tmp_path / "long.json"
    path.write_text(json.dumps(rows))
    return str(path)


def test_questions_beyond_the_decoders_context_are_refused_before_any_answer(
    trained_run, tiny_inputs, tmp_path, given_answers
):
    """The tiny decoder reads 1,024 positions: a question of thousands of tokens, and one that fits only without
    its answer, are named with their lengths before anything is generated or written."""
    images = str(tiny_inputs / "shapes" / "images")
    out = tmp_path / "answers.jsonl"
    data = long_questions(tiny_inputs, tmp_path, {1: 400})
    with pytest.raises(ev.ContextError) as refused:
        ev.evaluate(trained_run, "vqa", data, images, out=out, max_new_tokens=8)
    message = str(refused.value)
    assert message.startswith(
        "1 of 4 questions with an answer of up to 8 new tokens do not fit the decoder's context "
        "of 1,024 positions (its max_position_embeddings), e.g. eval-1 ("
    )
    assert message.endswith("image tokens included: remove them from the question file")
    assert given_answers == [] and not out.exists() and not ev.metrics_file(out).exists()
    # one that fits, but not with its answer: the number of new tokens that still fit is named
    loaded = ev.load_for_inference(trained_run)
    item = _items(eval_args_data(tiny_inputs))[2]
    n, length = 1, 0
    while length < 1024 - 100:  # the question asked n times over: 924..1023 tokens
        n += 1
        asked = dataclasses.replace(item, question=" ".join([item.question] * n))
        length = len(ev.question_prompt(loaded, asked, [(64, 64)]))
    assert length < 1024
    data = long_questions(tiny_inputs, tmp_path, {2: n})
    with pytest.raises(
        ev.ContextError,
        match=f"e.g. eval-2 \\({length:,} tokens\\), image tokens included: remove "
        f"them from the question file, or lower --max-new-tokens to "
        f"{1024 - length} or less",
    ):
        ev.evaluate(trained_run, "vqa", data, images, out=out, max_new_tokens=128, loaded=loaded)
    assert given_answers == [] and not out.exists()
    result = ev.evaluate(trained_run, "vqa", data, images, out=out, max_new_tokens=1024 - length, loaded=loaded)
    assert result["asked_now"] == 4 and len(given_answers) == 4


def eval_args_data(tiny_inputs) -> str:
    return str(tiny_inputs / "shapes" / "eval.json")


def test_answer_itself_never_generates_past_the_context(trained_run, tiny_inputs, tmp_path, monkeypatch):
    """The held-out scoring during finetune goes through answer() without evaluate()'s up-front check."""
    from qllava.recipe import load_recipe

    loaded = prompts_only(trained_run)
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("generated past the context"))
    items = _items(long_questions(tiny_inputs, tmp_path, {0: 400}))
    images = load_recipe(trained_run / "stage2" / "recipe.toml").eval.image_folder
    with pytest.raises(
        ev.ContextError,
        match="question eval-0 is [0-9,]+ tokens \\(image tokens included\\): with up "
        "to 6 new tokens that is more than the decoder's context of 1,024",
    ):
        ev.answer(loaded, items, images, 6)


def prompts_only(run) -> Loaded:
    """A run's processor and config without its weights: prompts are built and checked, nothing can generate."""
    from types import SimpleNamespace

    from qllava import model as modeling
    from qllava.recipe import load_recipe

    stage = run / "stage2"
    recipe = load_recipe(stage / "recipe.toml")
    return Loaded(
        SimpleNamespace(config=modeling.load_llava_config(recipe.model)),
        modeling.stage_processor(stage, recipe.model),
        recipe.stage2.template,
        "pad",
        "run",
    )


def test_chat_and_serve_refuse_a_conversation_beyond_the_context(trained_run, tiny_inputs, monkeypatch, capsys):
    from qllava import chat as chatting
    from qllava import cli, serve

    loaded = prompts_only(trained_run)
    image = tiny_inputs / "shapes" / "images" / "eval-0.png"
    monkeypatch.setattr(chatting, "generate", lambda *a, **k: pytest.fail("generated past the context"))
    chat = chatting.Chat(loaded, image)
    long = "What color is the shape? " * 400
    with pytest.raises(
        ev.ContextError, match="the question with its image is [0-9,]+ tokens .*: ask a shorter question$"
    ):
        chat.reply(long, 16)
    assert chat.turns == []

    # a conversation whose long first answer leaves room for a short answer only: 600..1000 tokens
    def conversation(words: int):
        chat.turns = [("user", "<image>\nWhat color is the shape?"), ("assistant", " ".join(["red"] * words))]
        return len(prompt_ids(loaded, chat.turns + [("user", "And the side?")], [chat.image]))

    one, hundred = conversation(1), conversation(101)
    length = conversation(int((800 - one) / ((hundred - one) / 100)) + 1)
    assert 600 < length < 1000
    with pytest.raises(
        ev.ContextError,
        match=f"the conversation with this question is {length} tokens .*: lower the "
        f"max new tokens to {1024 - length} or less, or start a new conversation",
    ):
        chat.reply("And the side?", 512)
    assert len(chat.turns) == 2
    import gradio as gr

    with pytest.raises(gr.Error, match="the conversation with this question is"):
        serve.check_fits(chat, "And the side?", 512)
    serve.check_fits(chat, "And the side?", 4)  # fits: no message
    # the command: with --prompt an error (exit 2); in a conversation the question is not asked, and it goes on
    monkeypatch.setattr(chatting, "load_for_inference", lambda path: loaded)
    assert cli.main(["chat", str(trained_run), "--image", str(image), "--prompt", long]) == 2
    assert "error: the question with its image is" in " ".join(capsys.readouterr().out.split())
    typed = iter([long, ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(typed))
    assert cli.main(["chat", str(trained_run), "--image", str(image)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "not asked: the question with its image is" in printed and "model>" not in printed


def _items(data: str):
    return load_items("vqa", data)


# --- compare: what a RESULT may be, and what a result lacks ---


def test_compare_finds_the_result_of_a_run_folder_and_names_missing_files_as_given(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    write_result(run / "eval" / "vqa-eval.metrics.json", {"1": 1.0, "2": 0.0})
    other = write_result(tmp_path / "other.metrics.json", {"1": 1.0, "2": 1.0})
    report = compare([run, other])
    assert report["metrics"]["accuracy"] == [0.5, 1.0] and report["difference_vs_first"]["other"]["paired"]
    assert main(["compare", str(run), str(other)]) == 0
    capsys.readouterr()
    cases = {
        "missing answers": ([str(tmp_path / "gone.jsonl")], f"error: {tmp_path / 'gone.jsonl'}: no such answers file"),
        "answers without metrics": (
            [str(tmp_path / "cut.jsonl")],
            f"error: {tmp_path / 'cut.jsonl'}: answers without "
            "their scores (cut.metrics.json is missing): run the qllava eval that wrote them "
            "again",
        ),
        "missing result": (
            [str(tmp_path / "gone.metrics.json")],
            f"error: {tmp_path / 'gone.metrics.json'}: no such file",
        ),
        "run without results": (
            [str(tmp_path / "empty")],
            f"error: {tmp_path / 'empty'}: no evaluation result in "
            f"{tmp_path / 'empty' / 'eval'} (run qllava eval {tmp_path / 'empty'} first",
        ),
    }
    (tmp_path / "cut.jsonl").write_text('{"question_id": 1, "text": "red"}\n')
    (tmp_path / "empty" / "eval").mkdir(parents=True)
    for name, (argv, says) in cases.items():
        assert main(["compare", *argv, "--out", str(tmp_path / "report")]) == 2, name
        printed = " ".join(capsys.readouterr().out.split())
        assert printed.startswith(says), (name, printed)
        assert ".metrics.json: no evaluation result" not in printed
    write_result(run / "eval" / "pope-test.metrics.json", {"1": 1.0}, benchmark="pope")
    assert main(["compare", str(run), str(other)]) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert f"error: {run}: {run / 'eval'} holds 2 evaluation results; name the one to compare: " in printed
    assert "pope-test.metrics.json" in printed and "vqa-eval.metrics.json" in printed
    assert not (tmp_path / "report").exists()


def test_compare_shows_a_dash_for_what_a_result_lacks(tmp_path, capsys):
    first = write_result(tmp_path / "a.metrics.json", {"1": 1.0, "2": 0.0})
    second = write_result(tmp_path / "b.metrics.json", {"1": 1.0, "2": 1.0}, benchmark="pope")
    data = json.loads(second.read_text())
    data["metrics"]["f1"] = 0.5
    data["model"].update(backbone="mistral", steps=None)
    second.write_text(json.dumps(data))
    assert main(["compare", str(first), str(second), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "None" not in printed and "f1" in printed
    f1_row = next(line for line in printed.splitlines() if line.split("│")[1:2] == [" f1 "] or " f1 " in line)
    assert "-" in f1_row and "0.5000" in f1_row
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "None" not in md and "| f1 | - | 0.5000 |" in md and "| steps | - | - |" in md
    assert json.loads((tmp_path / "cmp" / "report.json").read_text())["metrics"]["f1"] == [None, 0.5]
