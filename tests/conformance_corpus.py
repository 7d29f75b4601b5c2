"""The adversarial conformance corpus: benchmark files in official LLaVA's formats whose answers are built to hit
every parsing rule and quirk of the official scorers (empty, multi-letter, punctuated, unicode, whitespace,
"The answer is X." variants, shared question ids, ...).

The same writers produce the files that official LLaVA's scripts were run on (eval_science_qa.py with
ScienceQA's evaluate_acc.py, eval_pope.py, eval_textvqa.py, convert_gqa_for_eval.py with GQA's eval.py,
MME's convert_answer_to_mme.py with its calculation.py); test_conformance.py holds what they printed.
Every writer returns the paths: the question file, the ground truth (--annotations) and a LLaVA answers file.
"""

from __future__ import annotations

import json
from pathlib import Path

LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER = "Answer the question using a single word or phrase."

SCIENCEQA_ANSWERS = [
    "A",
    "B",
    "C",
    "D",
    "E",
    "F",
    "Z",
    "",
    " ",
    "BC",
    "AB",
    "ABCDE",
    "a",
    "b",
    "A.",
    "A. ",
    "B. ",
    "B. New Hampshire",
    "B.New Hampshire",
    "B) New Hampshire",
    "(B)",
    "B ",
    " B",
    "B\n",
    "\nB",
    "The answer is B.",
    "The answer is B",
    "The answer is B!",
    "The answer is b.",
    "the answer is B.",
    "The answer is BC.",
    "The answer is (B).",
    "The answer is  B.",
    "The answer is B\n",
    "The answer is Z.",
    "The answer is E.",
    "The answer is B. The answer is C.",
    "The answer is B. The answer is B.",
    "I think the answer is C.",
    "The answer is C.\nThe answer is",
    "B. The answer is C.",
    "Answer: B",
    "Option B",
    "B, C",
    "The answer is B.The answer is C",
    "\uff22",
    "B\u200b",
    "\u00c0",
    "The answer is \uff22.",
    "The answer is \u00c9.",
    "FAILED",
    "A. B. C.",
    "E. none",
    "The answer is A",
    "The answer is A.",
    "The answer is D.",
    "The answer is C..",
    "AnswerB",
    "D. ",
    "E.",
]
SCIENCEQA_TEST_SIZE = 4241  # ScienceQA's evaluate_acc.py asserts a full test split
SUBJECTS = ("natural science", "social science", "language science")
TOPICS = (
    "punctuation",
    "literacy-in-science",
    "verbs",
    "pronouns",
    "civics",
    "culture",
    "word-study",
    "economics",
    "physics",
    "units-and-measurement",
    "science-and-engineering-practices",
    "reading-comprehension",
    "global-studies",
    "grammar",
    "figurative-language",
    "us-history",
    "writing-strategies",
    "world-history",
    "reference-skills",
    "biology",
    "earth-science",
    "phonological-awareness",
    "capitalization",
    "chemistry",
    "vocabulary",
    "geography",
)  # evaluate_acc.py also reports each topic: every one must occur

POPE_ANSWERS = [
    "Yes",
    "No",
    "yes",
    "no",
    "YES",
    "NO",
    "Nope",
    "nope",
    "knot",
    "not",
    "Not",
    "Yes,no",
    "Yes, no",
    "yes,no.",
    "There's no",
    "There is no dog.",
    "No.",
    "No, there is not.",
    " No",
    "No ",
    "\nNo",
    "no\n",
    "",
    " ",
    ".",
    "Yes. There is no cat.",
    "The answer is no",
    "I can't say; no",
    "None",
    "no!",
    "no?",
    "No\u2014",
    "NO.",
    "Nah",
    "n",
    "Yes no",
    "yes\tno",
    "Yes.No",
    "not sure",
    "Absolutely not.",
    "Noo",
    "Non",
    "No\u00a0there",
    "\uff2e\uff4f",
    "There are no dogs",
    "no,",
    "maybe",
    "Yes, there is a dog, not a cat.",
    "yes.no",
    "No-one",
]
POPE_CATEGORIES = ("adversarial", "popular", "random")

MME_CATEGORIES = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)
MME_NESTED = ("artwork", "celebrity")  # these ship as images/ + questions_answers_YN/ in the MME release
MME_ANSWERS = [
    "Yes",
    "No",
    "yes",
    "no",
    "YES",
    "NO",
    "Nope",
    "knot",
    "Yes,no",
    "There's no",
    " Yes",
    " No",
    "no.",
    "Yes.",
    "Not",
    "not really",
    "None",
    "Noo",
    "I don't know",
    "",
    "Y",
    "N",
    "Yeah",
    "Yep",
    "Nah",
    "Never",
    "Sure, yes",
    "The answer is yes",
    "yes\u00a0",
    "\uff39\uff45\uff53",
    "No\u200b",
    "ye",
    "n\u00f3",
    "Non",
    "N/A",
    "Definitely yes",
    "yesno",
    "no yes",
    "Yes, no",
    "Oui",
    "noyes",
    "  yes",
    "Yes!",
    "nO",
    "yES",
    "kNOw",
    "Noted",
    "Y es",
    "yes yes",
    "No no",
    "Knowing it, yes",
    "Is it? no",
    "None.",
    "Yes: no",
    "x",
    "Not at all",
]

TEXTVQA_CASES = [  # (answer, the ten human answers)
    ("Dakota digital", ["dakota digital"] * 10),
    ("Dakota", ["dakota"] * 3 + ["dakota digital"] * 7),
    ("oclock", ["o'clock"] * 10),
    ("yall", ["y'all"] * 10),
    ("youll", ["you'll"] * 10),
    ("weve", ["we've"] * 10),
    ("wouldve", ["would've"] * 10),
    ("shouldve", ["should've"] * 10),
    ("theyll", ["they'll"] * 10),
    ("they'll", ["theyll"] * 10),
    ("." * 40, ["." * 8] * 10),
    ("." * 33, ["."] * 10),
    ("u.s.a.", ["usa"] * 10),
    ("Two", ["2"] * 10),
    ("The cat's toy", ["cats toy"] * 10),
    ("1,000", ["1000"] * 10),
    ("3.5", ["3.5"] * 10),
    ("3.5.", ["3.5"] * 10),
    ("yes!", ["yes"] * 10),
    ("hello-world", ["hello world"] * 10),
    ("hello - world", ["hello world"] * 10),
    ("", ["a"] * 10),
    ("  Coca-Cola  ", ["coca cola"] * 10),
    ("STOP", ["stop"] * 6 + ["stop sign"] * 4),
    ("caf\u00e9", ["cafe"] * 10),
    ("\uff23\uff41\uff46\uff45", ["cafe"] * 10),
    ("none", ["0"] * 10),
    ("The answer is 5.", ["5"] * 10),
    ("\tnew\nyork\t", ["new york"] * 10),
    ("dont", ["don't"] * 10),
    ("it's", ["its"] * 10),
    ("ten", ["10"] * 4 + ["ten"] * 6),
    ("red", ["red"] + ["blue"] * 9),
    ("Red.", ["red"] * 2 + ["blue"] * 8),
    ("a.m.", ["am"] * 10),
    ("12:30", ["1230"] * 10),
    ("Yes.", ["yes"] * 10),
    ("$5", ["5"] * 10),
    ("Hes", ["he's"] * 10),
    ("somebodyd", ["somebody'd"] * 10),
    ("1,2", ["12"] * 10),
    ("(a) red", ["red"] * 10),
    ("x" * 3 + "." * 35 + "y", ["xxxy"] * 10),
    ("Ive", ["i've"] * 10),
    ("an apple", ["apple"] * 10),
]

GQA_CASES = [  # (answer, the gold answer)
    ("Yes", "yes"),
    ("yes.", "yes"),
    ("Yes..", "yes"),
    ("yes!", "yes"),
    (" yes", "yes"),
    ("yes ", "yes"),
    ("The cat", "cat"),
    ("cat.", "cat"),
    ("CAT", "cat"),
    ("cats", "cat"),
    ("two", "2"),
    ("2", "two"),
    ("t-shirt", "t-shirt"),
    ("T-Shirt.", "t-shirt"),
    ("tshirt", "t-shirt"),
    ("left", "left"),
    ("On the left", "left"),
    ("white.", "white"),
    ("White and black", "white"),
    ("", "no"),
    ("No", "no"),
    ("no, it is not", "no"),
    ("The answer is no.", "no"),
    ("man.", "man"),
    ("a man", "man"),
    ("Man..", "man"),
    ("wooden", "wood"),
    ("gray", "grey"),
    ("caf\u00e9", "cafe"),
    ("\uff4e\uff4f", "no"),
    ("no\n", "no"),
    ("No.\n", "no"),
    ("Brown.", "brown"),
    ("BROWN", "brown"),
    ("brown, white", "brown"),
    ("Dont", "don't"),
    ("man's", "man 's"),
    ("1,000", "1000"),
    ("left.right", "left.right"),
    ("...", ""),
]


def write_scienceqa(folder: Path) -> dict[str, Path]:
    """llava_test_CQM-A.json (LLaVA-1.5's "A. text" choice lines), problems.json + pid_splits.json, answers.

    Every corpus answer is asked twice, with 2 and with 5 choices; fillers make up the full test split."""
    folder.mkdir(parents=True, exist_ok=True)
    answers = [(a, n) for a in SCIENCEQA_ANSWERS for n in (2, 5)]
    fillers = ["A", "B", "C", "The answer is A.", "D"]
    answers += [(fillers[k % 5], 3) for k in range(SCIENCEQA_TEST_SIZE - len(answers))]
    problems, questions, records = {}, [], []
    for index, (answer, n_choices) in enumerate(answers):
        pid = str(index + 1)
        problem = {
            "question": f"Question {pid}?",
            "choices": [f"choice {k}" for k in range(n_choices)],
            "answer": index % n_choices,
            "hint": "Some context." if index % 3 == 0 else "",
            "image": "image.png" if index % 2 == 0 else None,
            "subject": SUBJECTS[index % 3],
            "grade": f"grade{index % 12 + 1}",
            "topic": TOPICS[index % len(TOPICS)],
            "split": "test",
        }
        problems[pid] = problem
        context = f"Context: {problem['hint']}\n" if problem["hint"] else ""
        human = (
            context
            + problem["question"]
            + "\n"
            + "\n".join(f"{'ABCDE'[k]}. {choice}" for k, choice in enumerate(problem["choices"]))
        )
        row = {"id": pid}
        if problem["image"]:
            row["image"] = f"{pid}/image.png"
        row["conversations"] = [
            {"from": "human", "value": ("<image>\n" if problem["image"] else "") + human},
            {"from": "gpt", "value": "ABCDE"[problem["answer"]]},
        ]
        questions.append(row)
        prompt = ("<image>\n" if problem["image"] else "") + human + "\n" + LETTER_ANSWER
        records.append(_answer_record(pid, prompt, answer))
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({"train": [], "val": [], "test": list(problems)}))
    return {
        "data": _write_json(folder / "llava_test_CQM-A.json", questions),
        "annotations": folder / "problems.json",
        "answers": _write_lines(folder / "answers.jsonl", records),
    }


def write_pope(folder: Path) -> dict[str, Path]:
    """llava_pope_test.jsonl, the coco_pope_{category}.json label files, answers: every answer in every split,
    labels alternating so that each answer meets both labels."""
    (folder / "coco").mkdir(parents=True, exist_ok=True)
    questions, records = [], []
    for c, category in enumerate(POPE_CATEGORIES):
        labels = []
        for i, answer in enumerate(POPE_ANSWERS):
            qid = 1000 * c + i + 1
            text = f"Is there a thing {i} in the image?"
            labels.append(
                {"question_id": i + 1, "image": f"{i}.jpg", "text": text, "label": "yes" if (i + c) % 2 == 0 else "no"}
            )
            questions.append(
                {"question_id": qid, "image": f"{i}.jpg", "text": text + "\n" + SHORT_ANSWER, "category": category}
            )
            records.append(_answer_record(qid, questions[-1]["text"], answer))
        _write_lines(folder / "coco" / f"coco_pope_{category}.json", labels)
    return {
        "data": _write_lines(folder / "llava_pope_test.jsonl", questions),
        "annotations": folder / "coco",
        "answers": _write_lines(folder / "answers.jsonl", records),
    }


def write_mme(folder: Path) -> dict[str, Path]:
    """llava_mme.jsonl, an MME_Benchmark_release_version folder of question<TAB>answer files, answers.

    Answers come in pairs, one image each (MME's acc+ unit), two pairs per subtask; LLaVA's question file drops
    "Please answer yes or no." and one ground-truth question has MME's double space before it."""
    release = folder / "MME_Benchmark_release_version"
    questions, records = [], []
    for pair in range(len(MME_ANSWERS) // 2):
        category = MME_CATEGORIES[pair % len(MME_CATEGORIES)]
        stem = f"{pair:04d}"
        truth_dir = release / category / ("questions_answers_YN" if category in MME_NESTED else "")
        truth_dir.mkdir(parents=True, exist_ok=True)
        if category in MME_NESTED:
            (release / category / "images").mkdir(exist_ok=True)
        truths = ("Yes", "No") if pair % 2 == 0 else ("No", "Yes")
        lines = []
        for k, truth in enumerate(truths):
            question = f"Is there a thing {pair}-{k} in the picture?"
            spaces = "  " if pair == 3 and k == 1 else " "
            lines.append(f"{question}{spaces}Please answer yes or no.\t{truth}\n")
            qid = f"{category}/{stem}.png"
            questions.append(
                {"question_id": qid, "image": qid, "text": question + "\n" + SHORT_ANSWER, "category": category}
            )
            records.append(_answer_record(qid, questions[-1]["text"], MME_ANSWERS[2 * pair + k]))
        (truth_dir / f"{stem}.txt").write_text("".join(lines))
    return {
        "data": _write_lines(folder / "llava_mme.jsonl", questions),
        "annotations": release,
        "answers": _write_lines(folder / "answers.jsonl", records),
    }


def write_textvqa(folder: Path) -> dict[str, Path]:
    """llava_textvqa_val_v051_ocr.jsonl (the image id as question_id, shared by three questions each),
    TextVQA_0.5.1_val.json, answers."""
    folder.mkdir(parents=True, exist_ok=True)
    questions, annotations, records = [], [], []
    for i, (answer, humans) in enumerate(TEXTVQA_CASES):
        image_id = f"img{i // 3:03d}"
        question = f"What is written on thing {i}?"
        ocr = "" if i % 4 == 3 else f"\nReference OCR token: TOKEN{i}, other"
        text = question + ocr + "\n" + SHORT_ANSWER
        questions.append({"question_id": image_id, "image": f"{image_id}.jpg", "text": text, "category": "default"})
        annotations.append({"image_id": image_id, "question": question, "answers": humans})
        records.append(_answer_record(image_id, text, answer))
    _write_json(folder / "TextVQA_0.5.1_val.json", {"data": annotations})
    return {
        "data": _write_lines(folder / "llava_textvqa_val_v051_ocr.jsonl", questions),
        "annotations": folder / "TextVQA_0.5.1_val.json",
        "answers": _write_lines(folder / "answers.jsonl", records),
    }


def write_gqa(folder: Path) -> dict[str, Path]:
    """llava_gqa_testdev_balanced.jsonl, testdev_balanced_questions.json (the fields GQA's eval.py reads), answers."""
    folder.mkdir(parents=True, exist_ok=True)
    questions, gold, records = [], {}, []
    for i, (answer, truth) in enumerate(GQA_CASES):
        qid = str(201300000 + i)
        question = f"What is thing {i}?"
        questions.append(
            {"question_id": qid, "image": f"n{i}.jpg", "text": question + "\n" + SHORT_ANSWER, "category": "default"}
        )
        gold[qid] = {
            "question": question,
            "answer": truth,
            "imageId": f"n{i}",
            "isBalanced": True,
            "types": {
                "structural": "verify" if truth in ("yes", "no") else "query",
                "semantic": "attr",
                "detailed": "thing",
            },
            "semantic": [{"operation": "select", "argument": "thing"}, {"operation": "query", "argument": "name"}],
            "groups": {"global": f"g{i % 3}", "local": f"thing{i % 5}"},
            "entailed": [],
            "equivalent": [qid],
        }
        records.append(_answer_record(qid, questions[-1]["text"], answer))
    _write_json(folder / "testdev_balanced_questions.json", gold)
    return {
        "data": _write_lines(folder / "llava_gqa_testdev_balanced.jsonl", questions),
        "annotations": folder / "testdev_balanced_questions.json",
        "answers": _write_lines(folder / "answers.jsonl", records),
    }


WRITERS = {
    "scienceqa": write_scienceqa,
    "pope": write_pope,
    "mme": write_mme,
    "textvqa": write_textvqa,
    "gqa": write_gqa,
}


def read_answers(path: Path) -> list[str]:
    """The answer texts of a LLaVA answers file, in order."""
    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines()]


def _answer_record(question_id, prompt: str, text: str) -> dict:
    """A line as LLaVA's model_vqa*.py writes it."""
    return {
        "question_id": question_id,
        "prompt": prompt,
        "text": text,
        "answer_id": f"corpus-{question_id}",
        "model_id": "corpus",
        "metadata": {},
    }


def _write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


def _write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
