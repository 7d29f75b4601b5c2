"""Benchmarks in the file formats of official LLaVA's evaluation (llava/eval/, scripts/v1_5/eval/): reading the
question files, the prompt LLaVA gives the model, parsing the answers as LLaVA does, and the metrics.

Each benchmark turns a question file into EvalItems and a list of answers into (metrics, per-question scores).
A question file may also be a LLaVA training-format JSON (conversations): the first human turn is the
question and the first gpt turn the reference, which is how the tiny demo's held-out split is written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataError
from .recipe import BENCHMARKS

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


@dataclass
class EvalItem:
    question_id: str
    question: str
    """The user message without the image tag; the prompt suffix included."""
    image: str = ""
    category: str = ""
    reference: object = None
    """What the scorer compares with: a letter index (scienceqa), "yes"/"no", a list of answers, an answer."""
    meta: dict = field(default_factory=dict)


def load_items(benchmark: str, data: str, annotations: str | None = None) -> list[EvalItem]:
    """The benchmark's questions with their references, in question-file order."""
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}: one of {', '.join(BENCHMARKS)}")
    rows = _read_rows(Path(data))
    reader = {"scienceqa": _scienceqa_items, "pope": _pope_items, "vqa": _vqa_items, "mme": _mme_items}[benchmark]
    try:
        items = reader(rows, annotations)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DataError(f"{data}: not a {benchmark} question file in LLaVA's format ({type(e).__name__}: {e}); "
                        f"see `qllava eval --help` for the formats") from None
    if not items:
        raise DataError(f"{data}: no questions")
    return items


def score(benchmark: str, items: list[EvalItem], answers: dict[str, str]) -> tuple[dict, dict[str, float]]:
    """(metrics, per-question score in [0, 1]) for the answered items; unanswered ones count as wrong."""
    scorer = {"scienceqa": score_scienceqa, "pope": score_pope, "vqa": score_vqa, "mme": score_mme}[benchmark]
    return scorer(items, answers)


# ---------------------------------------------------------------- ScienceQA (llava_test_CQM-A.json + problems.json)

def parse_letter(text: str, n_choices: int) -> int:
    """LLaVA's eval_science_qa.py: "B", "B. text" or exactly one "The answer is B." (any char after the letter);
    anything else, or a letter beyond the choices, is -1 (wrong, never a random guess)."""
    options = "ABCDE"
    if text in options:
        letter = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        letter = text[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", text)
        letter = found[0] if len(found) == 1 else "FAILED"
    return options.index(letter) if letter in options[:n_choices] else -1


def score_scienceqa(items, answers):
    per_question = {}
    groups: dict[str, list[float]] = {}
    for item in items:
        n_choices = item.meta["n_choices"]
        ok = float(item.question_id in answers and parse_letter(answers[item.question_id], n_choices) == item.reference)
        per_question[item.question_id] = ok
        for group in _scienceqa_groups(item):
            groups.setdefault(group, []).append(ok)
    metrics = {"accuracy": _mean(per_question.values())}
    metrics.update({f"accuracy_{g}": _mean(v) for g, v in sorted(groups.items())})
    return metrics, per_question


def _scienceqa_groups(item) -> list[str]:
    out = ["IMG_question"] if item.image else []  # LLaVA's IMG-Accuracy: the problem has an image
    problem = item.meta.get("problem")
    if problem is None:
        return out
    subject = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}.get(problem.get("subject"))
    out += [subject] if subject else []
    has_text, has_image = bool(problem.get("hint")), bool(problem.get("image"))
    out += ["TXT"] * has_text + ["IMG"] * has_image + ["NO"] * (not has_text and not has_image)
    grade = int(str(problem.get("grade", "grade0")).removeprefix("grade") or 0)
    out += ["G1-6"] if 1 <= grade <= 6 else ["G7-12"] if 7 <= grade <= 12 else []
    return out


def _scienceqa_items(rows, annotations):
    problems = json.loads(Path(annotations).read_text()) if annotations else {}
    items = []
    for row in rows:
        human = row["conversations"][0]["value"].replace("<image>", "").strip()
        question = human + "\n" + LETTER_ANSWER
        problem = problems.get(str(row["id"]))
        if problem is not None:
            answer, n_choices = problem["answer"], len(problem["choices"])
        else:  # the gpt turn of LLaVA's file says "The answer is X."; the options line counts the choices
            answer = parse_letter(row["conversations"][1]["value"], 5)
            n_choices = len(re.findall(r"\([A-E]\)", human.split("Options:")[-1]))
        items.append(EvalItem(str(row["id"]), question, row.get("image", ""), "", answer,
                              {"n_choices": n_choices, "problem": problem}))
    return items


# ---------------------------------------------------------------- POPE (llava_pope_test.jsonl + coco_pope_*.json)

def parse_yes_no(text: str) -> str:
    """LLaVA's eval_pope.py: first sentence, no commas, split on spaces; "No", "not" or "no" makes it no."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def score_pope(items, answers):
    per_question, by_category = {}, {}
    for item in items:
        predicted = parse_yes_no(answers[item.question_id]) if item.question_id in answers else None
        per_question[item.question_id] = float(predicted == item.reference)
        by_category.setdefault(item.category or "all", []).append((predicted, item.reference))
    metrics = {}
    for category, pairs in sorted(by_category.items()):
        for name, value in _binary_metrics(pairs).items():
            metrics[f"{name}_{category}"] = value
    for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        metrics[name] = _mean(metrics[f"{name}_{c}"] for c in by_category)
    return metrics, per_question


def _binary_metrics(pairs) -> dict:
    tp = sum(p == "yes" and r == "yes" for p, r in pairs)
    fp = sum(p == "yes" and r == "no" for p, r in pairs)
    tn = sum(p == "no" and r == "no" for p, r in pairs)
    fn = sum(p != "yes" and r == "yes" for p, r in pairs)  # an unanswered yes-question is a miss
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(p == "yes" for p, _ in pairs) / len(pairs)}


def _pope_items(rows, annotations):
    labels = _pope_labels(Path(annotations)) if annotations else {}
    items, position = [], {}
    for row in rows:
        text, category = _question_text(row), row.get("category", "")
        if "label" in row or "answer" in row:
            label = row.get("label", row.get("answer"))
        else:  # LLaVA pairs answers with a category's labels by position
            at = position[category] = position.get(category, -1) + 1
            label = labels[category][at]
        items.append(EvalItem(str(row["question_id"]), _with_suffix(text, SHORT_ANSWER), row.get("image", ""),
                              category, str(label).strip().lower()))
    return items


def _pope_labels(folder: Path) -> dict[str, list[str]]:
    """coco_pope_{category}.json files (JSON lines with "label") in a folder."""
    out = {}
    for path in sorted(folder.glob("*_pope_*.json")):
        rows = _read_rows(path)
        out[path.stem.split("_pope_")[-1]] = [r["label"] for r in rows]
    if not out:
        raise DataError(f"{folder}: no coco_pope_<category>.json annotation files")
    return out


# ---------------------------------------------------------------- VQA (TextVQA / VQAv2 style and GQA style)

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {  # the common ones of the official list: an apostrophe-less spelling -> the official form
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's", "shouldnt":
    "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "werent": "weren't", "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't",
    "wouldnt": "wouldn't", "youre": "you're", "youve": "you've"}


def normalize_answer(text: str) -> str:
    """The VQA answer normalization (EvalAI's processor, as LLaVA's m4c_evaluator uses it)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    original = text
    for p in PUNCTUATION:
        if p + " " in original or " " + p in original or re.search(r"(?<=\d)(,)+(?=\d)", original):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = re.sub(r"(?!<=\d)(\.)(?!\d)", "", text)
    words = [NUMBERS.get(w, w) for w in text.lower().split() if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy: min(#humans who gave the answer / 3, 1), averaged over the 10 leave-one-out sets of 9."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    scores = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(scores) / len(scores)


def score_vqa(items, answers):
    per_question = {}
    for item in items:
        prediction = answers.get(item.question_id)
        if prediction is None:
            per_question[item.question_id] = 0.0
        elif isinstance(item.reference, list) and len(item.reference) == 10:
            per_question[item.question_id] = vqa_accuracy(prediction, item.reference)
        else:  # one reference (GQA style): exact match after normalization
            refs = item.reference if isinstance(item.reference, list) else [item.reference]
            per_question[item.question_id] = float(normalize_answer(prediction) in {normalize_answer(r) for r in refs})
    metrics = {"accuracy": _mean(per_question.values())}
    by_category = {}
    for item in items:
        by_category.setdefault(item.category, []).append(per_question[item.question_id])
    if len(by_category) > 1:
        metrics.update({f"accuracy_{c}": _mean(v) for c, v in sorted(by_category.items())})
    options = [item.meta.get("options") for item in items]
    if all(options):
        metrics["chance"] = _mean(1 / len(o) for o in options)
    return metrics, per_question


def _vqa_items(rows, annotations):
    refs = _vqa_annotations(Path(annotations)) if annotations else {}
    items = []
    for i, row in enumerate(rows):
        if "conversations" in row:
            # Training format (a held-out split): the human turn is asked verbatim, as the model was trained
            # with it, and the first gpt turn is the answer.
            turns = row["conversations"]
            question = turns[0]["value"].replace("<image>", "").strip()
            qid = str(row.get("id", i))
            reference = turns[1]["value"]
            meta = {"options": row["options"]} if "options" in row else {}
        else:
            question, qid = _with_suffix(_question_text(row), SHORT_ANSWER), str(row["question_id"])
            reference = row.get("answers", row.get("answer"))
            if reference is None:
                reference = refs.get(qid) or refs[(qid, question.split("\n")[0].strip().lower())]
            meta = {}
        items.append(EvalItem(qid, question, row.get("image", ""), row.get("category", ""), reference, meta))
    return items


def _vqa_annotations(path: Path) -> dict:
    """TextVQA ({"data": [{image_id, question, answers}]}) keyed by (image_id, question), or GQA (qid -> {answer})."""
    raw = json.loads(path.read_text())
    if isinstance(raw, dict) and "data" in raw:
        return {(str(d["image_id"]), d["question"].strip().lower()): d["answers"] for d in raw["data"]}
    return {str(qid): q["answer"] for qid, q in raw.items()}


# ---------------------------------------------------------------- MME (llava_mme.jsonl + MME_Benchmark folder)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme(text: str) -> str:
    """MME's calculation.py: exactly yes/no, else the first 4 characters decide; else "other" (wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score_mme(items, answers):
    per_question, images = {}, {}
    for item in items:
        ok = item.question_id in answers and parse_mme(answers[item.question_id]) == item.reference
        per_question[item.question_id] = float(ok)
        images.setdefault((item.category, item.image), []).append(ok)
    metrics = {}
    for category in sorted({c for c, _ in images}):
        pairs = [v for (c, _), v in images.items() if c == category]
        acc = _mean(x for v in pairs for x in v)
        acc_plus = _mean(all(v) for v in pairs)
        metrics[f"acc_{category}"], metrics[f"acc_plus_{category}"] = acc, acc_plus
        metrics[f"score_{category}"] = 100 * (acc + acc_plus)
    metrics["perception"] = sum(metrics.get(f"score_{c}", 0.0) for c in PERCEPTION)
    metrics["cognition"] = sum(metrics.get(f"score_{c}", 0.0) for c in COGNITION)
    metrics["accuracy"] = _mean(per_question.values())
    return metrics, per_question


def _mme_items(rows, annotations):
    truth = _mme_truth(Path(annotations)) if annotations else {}
    items = []
    for i, row in enumerate(rows):
        question, category = _question_text(row), row["category"]
        qid = str(row["question_id"])
        answer = row.get("answer") or truth[(category, Path(qid).stem, _mme_key(question))]
        items.append(EvalItem(f"{qid}#{i}", _with_suffix(question, SHORT_ANSWER), row.get("image", qid), category,
                              answer.strip().lower()))
    return items


def _mme_key(question: str) -> str:
    return question.replace(SHORT_ANSWER, "").replace("Please answer yes or no.", "").strip()


def _mme_truth(folder: Path) -> dict:
    """(subtask, file stem, question) -> answer, from the MME release's question<TAB>answer txt files."""
    truth = {}
    for txt in folder.rglob("*.txt"):
        category = txt.relative_to(folder).parts[0]
        for line in txt.read_text().splitlines():
            if "\t" in line:
                question, answer = line.split("\t")[:2]
                truth[(category, txt.stem, _mme_key(question))] = answer
    if not truth:
        raise DataError(f"{folder}: no MME question/answer .txt files")
    return truth


# ---------------------------------------------------------------- shared

def _read_rows(path: Path) -> list[dict]:
    """A JSON list, or JSON lines (LLaVA's .jsonl files, and POPE's .json annotations, which are lines too)."""
    if not path.is_file():
        raise DataError(f"{path}: question file not found")
    text = path.read_text()
    try:
        rows = json.loads(text)
    except ValueError:
        rows = None
    if not isinstance(rows, list):
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise DataError(f"{path}: not a JSON list or JSON lines ({e})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a list of question objects")
    return rows


def _question_text(row: dict) -> str:
    return row["text"].replace("<image>", "").strip()


def _with_suffix(question: str, suffix: str) -> str:
    return question if question.endswith(suffix) else question + "\n" + suffix


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
