"""qllava eval (batched, resumable, the demo's own scorer, answers files LLaVA's scripts read) and qllava compare."""

import json

import pytest

from conformance_corpus import WRITERS
from qllava import evaluate as ev
from qllava.cli import main
from qllava.compare import chart, compare, paired_bootstrap
from qllava.data import DataError
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
    assert all(set(r) == LLAVA_FIELDS and r["prompt"] == "<image>\nWhat color is the shape?" or
               r["prompt"].startswith("<image>\n") for r in records)
    again = ev.evaluate(**eval_args, out=out, limit=12, batch_size=4, max_new_tokens=4)
    assert again["asked_now"] == 0 and again["metrics"] == result["metrics"] and len(asked) == 12
    assert set(result["per_question"]) == {f"eval-{i}" for i in range(12)}


def test_answers_of_another_model_are_refused(eval_args, tmp_path):
    out = tmp_path / "answers.jsonl"
    out.write_text(json.dumps({"question_id": "eval-0", "text": "red",
                               "metadata": {"key": "eval-0", "model_fingerprint": "someone-else"}}) + "\n")
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
    common = ["--benchmark", "vqa", "--data", eval_args["data"], "--images", eval_args["images"], "--limit", "12",
              "--max-new-tokens", "4"]
    assert main(["eval", str(trained_run), *common, "--out", str(a)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["eval", str(trained_run), *common, "--out", str(b), "--batch-size", "5"]) == 0
    assert main(["compare", str(a), str(b.with_name("b.metrics.json")), "--out", str(tmp_path / "cmp")]) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| backbone |" in report and "mistral" in report and "95% CI" in report
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert main(["compare", str(tmp_path / "missing.metrics.json")]) == 2
    assert "no evaluation result (run qllava eval first" in capsys.readouterr().out


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
    result = ev.evaluate(tmp_path, benchmark, str(paths["data"]), out=out, annotations=str(paths["annotations"]),
                         batch_size=1000, loaded=object())
    ours = [json.loads(line) for line in out.read_text().splitlines()]
    theirs = [json.loads(line) for line in paths["answers"].read_text().splitlines()]
    assert all(set(r) == LLAVA_FIELDS for r in ours)
    fields = ("question_id", "prompt", "text")
    assert [tuple(r[f] for f in fields) for r in ours] == [tuple(r[f] for f in fields) for r in theirs]
    items = load_items(benchmark, str(paths["data"]), str(paths["annotations"]))
    assert result["metrics"] == score(benchmark, items, llava_answers)[0]


def write_result(path, per_question, benchmark="vqa", question_set="q1"):
    path.write_text(json.dumps({"benchmark": benchmark, "data": "d", "model": {"name": path.name.split(".")[0]},
                                "metrics": {"accuracy": sum(per_question.values()) / len(per_question)},
                                "per_question": per_question, "question_set": question_set}))
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
    assert d["c"] == {"paired": False, "reason": "different question sets (2 questions in both, 1 only in the "
                                                 "first, 0 only in this one)"}
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
