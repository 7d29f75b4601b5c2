"""The four benchmarks' parsing and metrics on hand-computed cases, including LLaVA's quirks."""

import json

import pytest

from qllava.data import DataError
from qllava.scorers import (
    EvalItem,
    load_items,
    normalize_answer,
    parse_letter,
    parse_mme,
    parse_yes_no,
    question_keys,
    score,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "text,n,expected",
    [
        ("B", 4, 1),  # the letter alone
        ("B. New Hampshire", 4, 1),  # "X. " prefix
        ("The answer is C.", 4, 2),  # LLaVA's regex
        ("The answer is C", 4, -1),  # the regex needs a character after the letter
        ("The answer is A. The answer is B.", 4, -1),  # two matches: FAILED
        ("E", 4, -1),  # a letter beyond the choices
        ("b", 4, -1),  # lower case is not a letter option
        ("A.", 4, -1),  # too short for "X. "
        ("I think it is B", 4, -1),
        ("", 4, -1),
        ("BC", 4, -1),
        ("AB", 4, -1),  # the letter must be one option, not a substring of "ABCDE"
        (" B", 4, -1),
        ("B ", 4, -1),
    ],
)
def test_scienceqa_answer_parsing(text, n, expected):
    assert parse_letter(text, n) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("There is no dog in the image.", "no"),
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("NO", "yes"),
        ("", "yes"),  # case-sensitive words: LLaVA reads these as yes
        ("The answer is not clear", "no"),
    ],
)
def test_pope_yes_no_parsing(text, expected):
    assert parse_yes_no(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [("yes", "yes"), ("No.", "no"), ("Yes, it is", "yes"), ("none of them", "no"), ("the answer is yes", "other")],
)
def test_mme_parsing(text, expected):
    assert parse_mme(text) == expected


def test_vqa_normalization_and_accuracy():
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("The Cat's toy") == "cat 's toy"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("dont") == "don't"
    answers = ["2"] * 3 + ["two"] + ["3"] * 6  # "two" normalizes to "2": four humans said it
    assert vqa_accuracy("two", answers) == pytest.approx(1.0)
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    one = ["red"] + ["blue"] * 9
    assert vqa_accuracy("red", one) == pytest.approx(0.3)  # min(0/3,1) once, min(1/3,1) nine times, / 10
    two = ["red"] * 2 + ["blue"] * 8
    assert vqa_accuracy("Red.", two) == pytest.approx(0.6)
    assert vqa_accuracy("green", two) == 0.0


def test_scienceqa_metrics_by_category():
    problems = {
        "1": {"subject": "natural science", "hint": "", "image": "image.png", "grade": "grade3"},
        "2": {"subject": "social science", "hint": "some text", "image": None, "grade": "grade8"},
        "3": {"subject": "language science", "hint": "", "image": None, "grade": "grade10"},
    }
    items = [
        EvalItem(pid, "q", "1/image.png" if pid == "1" else "", "", ref, {"n_choices": 4, "problem": problems[pid]})
        for pid, ref in (("1", 0), ("2", 1), ("3", 2))
    ]
    metrics, per_q = score("scienceqa", items, {"1": "A", "2": "The answer is B.", "3": "The answer is D."})
    assert per_q == {"1": 1.0, "2": 1.0, "3": 0.0}
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert (metrics["accuracy_NAT"], metrics["accuracy_SOC"], metrics["accuracy_LAN"]) == (1.0, 1.0, 0.0)
    assert (metrics["accuracy_IMG"], metrics["accuracy_TXT"], metrics["accuracy_NO"]) == (1.0, 1.0, 0.0)
    assert (metrics["accuracy_G1-6"], metrics["accuracy_G7-12"]) == (1.0, 0.5)
    assert metrics["accuracy_IMG_question"] == 1.0


def test_pope_metrics():
    labels = ["yes", "yes", "no", "no", "yes"]
    preds = ["Yes", "No", "Yes", "No, it is not", "Yes."]
    items = [EvalItem(str(i), "q", "img", "random", lab) for i, lab in enumerate(labels)]
    metrics, per_q = score("pope", items, {str(i): p for i, p in enumerate(preds)})
    # TP = 2 (0, 4), FN = 1 (1), FP = 1 (2), TN = 1 (3)
    assert metrics["accuracy_random"] == pytest.approx(3 / 5)
    assert metrics["precision_random"] == pytest.approx(2 / 3) and metrics["recall_random"] == pytest.approx(2 / 3)
    assert metrics["f1_random"] == pytest.approx(2 / 3) and metrics["yes_ratio_random"] == pytest.approx(3 / 5)
    assert metrics["f1"] == metrics["f1_random"] and sum(per_q.values()) == 3


def test_mme_acc_plus_and_totals():
    items = [
        EvalItem("a#0", "q", "1.png", "existence", "yes"),
        EvalItem("a#1", "q", "1.png", "existence", "no"),
        EvalItem("b#2", "q", "2.png", "existence", "yes"),
        EvalItem("b#3", "q", "2.png", "existence", "no"),
        EvalItem("c#4", "q", "3.png", "code_reasoning", "no"),
        EvalItem("c#5", "q", "3.png", "code_reasoning", "yes"),
    ]
    answers = {"a#0": "Yes", "a#1": "No", "b#2": "Yes", "b#3": "Yes", "c#4": "no", "c#5": "yes"}
    metrics, _ = score("mme", items, answers)
    assert metrics["acc_existence"] == 0.75 and metrics["acc_plus_existence"] == 0.5
    assert metrics["score_existence"] == pytest.approx(125.0)
    assert metrics["perception"] == pytest.approx(125.0) and metrics["cognition"] == pytest.approx(200.0)


def test_unanswered_questions_count_as_wrong():
    items = [EvalItem("1", "q", "", "", "red"), EvalItem("2", "q", "", "", "blue")]
    metrics, per_q = score("vqa", items, {"1": "Red"})
    assert per_q == {"1": 1.0, "2": 0.0} and metrics["accuracy"] == 0.5


def test_question_files_in_llavas_formats(tmp_path):
    sqa = tmp_path / "llava_test_CQM-A.json"
    sqa.write_text(
        json.dumps(
            [
                {
                    "id": "7",
                    "image": "7/image.png",
                    "conversations": [
                        {
                            "from": "human",
                            "value": "Context: N/A\nQuestion: Which?\nOptions: (A) x (B) y (C) z\n<image>",
                        },
                        {"from": "gpt", "value": "The answer is B."},
                    ],
                }
            ]
        )
    )
    item = load_items("scienceqa", str(sqa))[0]
    assert item.question == (
        "Context: N/A\nQuestion: Which?\nOptions: (A) x (B) y (C) z\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert (item.reference, item.meta["n_choices"], item.image) == (1, 3, "7/image.png")
    pope = tmp_path / "llava_pope_test.jsonl"
    pope.write_text(
        "\n".join(
            json.dumps(
                {
                    "question_id": q,
                    "image": "x.jpg",
                    "category": c,
                    "text": "Is there a dog?\nAnswer the question using a single word or phrase.",
                }
            )
            for q, c in ((1, "adversarial"), (2, "adversarial"), (10000001, "random"))
        )
    )
    ann = tmp_path / "pope_ann"
    ann.mkdir()
    (ann / "coco_pope_adversarial.json").write_text(
        '{"question_id": 1, "label": "yes"}\n{"question_id": 2, "label": "no"}\n'
    )
    (ann / "coco_pope_random.json").write_text('{"question_id": 1, "label": "no"}\n')
    items = load_items("pope", str(pope), str(ann))
    assert [(i.category, i.reference) for i in items] == [
        ("adversarial", "yes"),
        ("adversarial", "no"),
        ("random", "no"),
    ]
    assert items[0].question.count("Answer the question") == 1  # the suffix is already in LLaVA's file


def test_wrong_format_is_a_clear_error(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match=r"q.jsonl: not a pope question file in LLaVA's format \(KeyError"):
        load_items("pope", str(bad), None)
    with pytest.raises(DataError, match="unknown benchmark 'gqa': one of scienceqa, pope, vqa, mme"):
        load_items("gqa", str(bad))
    with pytest.raises(DataError, match="nope.json: question file not found"):
        load_items("vqa", str(tmp_path / "nope.json"))


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_scienceqa_without_problems_json_reads_llava_15_choice_lines(tmp_path):
    """LLaVA-1.5's llava_test_CQM-A.json: "A. text" lines (a choice may span lines) and the letter as gpt turn."""
    sqa = tmp_path / "llava_test_CQM-A.json"
    sqa.write_text(
        json.dumps(
            [
                {
                    "id": "512",
                    "conversations": [
                        {
                            "from": "human",
                            "value": "Which closing is correct for a letter?\nA. See you soon,\nJanet\n"
                            "B. See You Soon,\nJanet",
                        },
                        {"from": "gpt", "value": "A"},
                    ],
                },
                {
                    "id": "5",
                    "image": "5/image.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nContext: A. Smith's test.\nWhich?\nA. x\nB. y\nC. z"},
                        {"from": "gpt", "value": "C"},
                    ],
                },
            ]
        )
    )
    items = load_items("scienceqa", str(sqa))
    assert [(i.meta["n_choices"], i.reference) for i in items] == [(2, 0), (3, 2)]
    assert (
        items[1].prompt
        == "<image>\nContext: A. Smith's test.\nWhich?\nA. x\nB. y\nC. z\n"
        + "Answer with the option's letter from the given choices directly."
    )
    assert (items[0].source_id, items[0].prompt.startswith("Which closing")) == ("512", True)
    _, per_q = score("scienceqa", items, {"512": "A", "5": "The answer is D."})
    assert per_q == {"512": 1.0, "5": 0.0}


def test_a_file_that_is_not_scienceqa_is_an_error_not_a_perfect_score(tmp_path):
    held_out = tmp_path / "eval.json"  # a VQA file: its gpt turn names no choice
    held_out.write_text(
        json.dumps(
            [
                {
                    "id": "eval-0",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat color is the shape?"},
                        {"from": "gpt", "value": "red"},
                    ],
                }
            ]
        )
    )
    with pytest.raises(
        DataError,
        match=r"eval.json: question 'eval-0': the reference 'red' names none of its 0 "
        r"choices",
    ):
        load_items("scienceqa", str(held_out))
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps({"1": {"choices": ["x", "y"], "answer": 0}}))
    with pytest.raises(DataError, match="problems.json: no problem 'eval-0', which .*eval.json asks"):
        load_items("scienceqa", str(held_out), str(problems))


def test_pope_labels_must_be_yes_or_no(tmp_path):
    question = {"question_id": 7, "image": "x.jpg", "text": "Is there a dog?", "category": "random"}
    with pytest.raises(DataError, match=r"q.jsonl: question 7 has the label 'Yes'; POPE labels are \"yes\" or \"no\""):
        load_items("pope", write_rows(tmp_path / "q.jsonl", [{**question, "label": "Yes"}]))
    ann = tmp_path / "coco"
    ann.mkdir()
    write_rows(ann / "coco_pope_random.json", [{"question_id": 1, "label": "1"}])
    data = write_rows(tmp_path / "llava_pope_test.jsonl", [question])
    with pytest.raises(DataError, match=r"coco_pope_random.json: question 7 has the label '1'"):
        load_items("pope", data, str(ann))
    write_rows(ann / "coco_pope_random.json", [])
    with pytest.raises(DataError, match=r"coco_pope_random.json: 0 labels, fewer than the 'random' questions of"):
        load_items("pope", data, str(ann))
    data = write_rows(tmp_path / "llava_pope_test.jsonl", [{**question, "category": "popular"}])
    with pytest.raises(DataError, match=r"no labels for its 'popular' questions: no coco_pope_popular.json in"):
        load_items("pope", data, str(ann))


def test_vqa_and_mme_references_are_checked(tmp_path):
    question = {"question_id": 3, "image": "x.jpg", "text": "What is it?"}
    with pytest.raises(DataError, match="question 3 has 9 human answers; VQA accuracy .* takes 10"):
        load_items("vqa", write_rows(tmp_path / "q.jsonl", [{**question, "answers": ["a"] * 9}]))
    annotations = tmp_path / "TextVQA_0.5.1_val.json"
    annotations.write_text(json.dumps({"data": [{"image_id": 3, "question": "Else?", "answers": ["a"] * 10}]}))
    with pytest.raises(DataError, match=r"no answer for question 3 \('What is it\?'\) in .*TextVQA_0.5.1_val.json"):
        load_items("vqa", write_rows(tmp_path / "q.jsonl", [question]), str(annotations))
    mme = {"question_id": "count/1.png", "image": "count/1.png", "text": "Two?", "category": "count", "answer": "Maybe"}
    with pytest.raises(DataError, match="question 'count/1.png' has the answer 'Maybe'; MME answers are yes or no"):
        load_items("mme", write_rows(tmp_path / "mme.jsonl", [mme]))


def test_every_line_is_a_question_whatever_its_id(tmp_path):
    """LLaVA's TextVQA file uses the image id as question_id: three questions of one image stay three."""
    assert question_keys(["a", "a", 5, "a", "5"]) == ["a", "a#1", "5", "a#2", "5#1"]
    rows = [
        {"question_id": "img1", "image": "img1.jpg", "text": f"What is {k}?", "answers": [str(k)] * 10}
        for k in range(3)
    ]
    items = load_items("vqa", write_rows(tmp_path / "textvqa.jsonl", rows))
    assert [i.question_id for i in items] == ["img1", "img1#1", "img1#2"] and {i.source_id for i in items} == {"img1"}
    metrics, per_q = score("vqa", items, {"img1": "0", "img1#1": "1", "img1#2": "wrong"})
    assert per_q == {"img1": 1.0, "img1#1": 1.0, "img1#2": 0.0} and metrics["accuracy"] == pytest.approx(2 / 3)


def test_gqa_style_answers_match_exactly_after_rstrip_and_lower():
    """LLaVA's GQA flow: text.rstrip(".").lower() == gold, no VQA normalization (no articles or numbers dropped)."""
    items = [EvalItem(str(i), "q", "", "", gold) for i, gold in enumerate(["cat", "2", "yes"])]
    _, per_q = score("vqa", items, {"0": "The cat", "1": "two", "2": "Yes.."})
    assert per_q == {"0": 0.0, "1": 0.0, "2": 1.0}
