"""Benchmarks in the file formats of official LLaVA's evaluation (llava/eval/, scripts/v1_5/eval/): reading the
question files, the prompt LLaVA gives the model, parsing the answers as LLaVA does, and the metrics.

Each benchmark turns a question file into EvalItems and a list of answers into (metrics, per-question scores).
A question file may also be a LLaVA training-format JSON (conversations): the first human turn is the
question and the first gpt turn the reference, which is how the tiny demo's held-out split is written.

Every line of a question file is one question, whatever its id: LLaVA's TextVQA file uses the image id as
question_id (5,000 questions, 3,166 ids) and its MME file the image path, so a repeated id gets "#n" in the
key answers and scores are stored under. Parsing and metrics equal the official scripts' on the adversarial
corpus in tests/conformance_corpus.py (the expected values in tests/test_conformance.py are their output).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .benchmark_names import BENCHMARK_NAMES
from .errors import DataError

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


@dataclass
class EvalItem:
    question_id: str
    """The key the question's answer and score are stored under: its id in the file as text, "#n" added for the
    n-th repeat of an id."""
    question: str
    """The user message without the image tag; the prompt suffix included."""
    image: str = ""
    category: str = ""
    reference: object = None
    """What the scorer compares with: a letter index (scienceqa), "yes"/"no", ten answers or one (vqa)."""
    meta: dict = field(default_factory=dict)
    source_id: object = None
    """The id as the question file writes it (its JSON type kept): the answers file's question_id."""
    prompt: str = ""
    """The "prompt" LLaVA's model_vqa*.py writes in its answers file, which its scorers read back."""


def load_items(benchmark: str, data: str, annotations: str | None = None) -> list[EvalItem]:
    """The benchmark's questions with their references, in question-file order."""
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}: one of {', '.join(BENCHMARKS)}")
    rows = _read_rows(Path(data))
    try:
        items = BENCHMARKS[benchmark].read(rows, annotations, data)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DataError(
            f"{data}: not a {benchmark} question file in LLaVA's format ({type(e).__name__}: {e}); "
            f"see `qllava eval --help` for the formats"
        ) from None
    if not items:
        raise DataError(f"{data}: no questions")
    for item, key in zip(items, question_keys(item.source_id for item in items)):
        item.question_id = key
    return items


def question_keys(ids) -> list[str]:
    """Each id as text; the n-th repeat of an id (n >= 1) as "id#n", so that no question overwrites another."""
    seen: Counter = Counter()
    keys = []
    for qid in map(str, ids):
        keys.append(f"{qid}#{seen[qid]}" if seen[qid] else qid)
        seen[qid] += 1
    return keys


def score(benchmark: str, items: list[EvalItem], answers: dict[str, str]) -> tuple[dict, dict[str, float]]:
    """(metrics, per-question score in [0, 1]) for the answered items; unanswered ones count as wrong."""
    return BENCHMARKS[benchmark].score(items, answers)


# ---------------------------------------------------------------- ScienceQA (llava_test_CQM-A.json + problems.json)

OPTIONS = ["A", "B", "C", "D", "E"]


def parse_letter(text: str, n_choices: int) -> int:
    """LLaVA's eval_science_qa.py: exactly "B", or "B. text", or exactly one "The answer is B." (any character
    after the letter) names a letter; it counts when it is one of the choices. Anything else is -1: wrong,
    never a random guess. The letter must equal an option: "" and "BC" name none."""
    if text in OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", text)
        letter = found[0] if len(found) == 1 else "FAILED"
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


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
    out = ["IMG_question"] if item.image else []  # LLaVA's IMG-Accuracy: the prompt has "<image>"
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


def _scienceqa_items(rows, annotations, data):
    problems = json.loads(Path(annotations).read_text()) if annotations else None
    items = []
    for row in rows:
        human = row["conversations"][0]["value"].replace("<image>", "").strip()
        question, image = human + "\n" + LETTER_ANSWER, row.get("image", "")
        if problems is None:
            problem, (n_choices, answer) = None, _scienceqa_reference(row, human, data)
        elif str(row["id"]) in problems:
            problem = problems[str(row["id"])]
            n_choices, answer = len(problem["choices"]), problem["answer"]
        else:
            raise DataError(f"{annotations}: no problem {row['id']!r}, which {data} asks")
        items.append(
            EvalItem(
                "",
                question,
                image,
                "",
                answer,
                {"n_choices": n_choices, "problem": problem},
                row["id"],
                _conversation_prompt(question, image),
            )
        )
    return items


def _scienceqa_reference(row, human: str, data) -> tuple[int, int]:
    """(number of choices, answer index) from the question file alone: its choices and its gpt turn ("B", or
    "The answer is B." in LLaVA-1's files). A reference that names no choice is an error, never a match."""
    n_choices = _choice_count(human)
    answer = parse_letter(row["conversations"][1]["value"], n_choices)
    if answer < 0:
        raise DataError(
            f"{data}: question {row['id']!r}: the reference {row['conversations'][1]['value']!r} names "
            f"none of its {n_choices} choices (is this ScienceQA in LLaVA's format? "
            "--annotations problems.json gives the answers)"
        )
    return n_choices, answer


def _choice_count(human: str) -> int:
    """The choices as LLaVA writes them: lines "A. text", "B. text", ... from the last "A. " line on (LLaVA-1.5's
    llava_test_CQM-A.json; a choice may span lines), or "(A) text" after "Options:" (LLaVA-1's files)."""
    lines = human.split("\n")
    firsts = [i for i, line in enumerate(lines) if line.startswith("A. ")]
    if not firsts:
        return len(re.findall(r"\([A-E]\)", human.split("Options:")[1])) if "Options:" in human else 0
    count = 0
    for line in lines[firsts[-1] :]:
        count += count < len(OPTIONS) and line.startswith(f"{OPTIONS[count]}. ")
    return count


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
    return {
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(p == "yes" for p, _ in pairs) / len(pairs),
    }


def _pope_items(rows, annotations, data):
    labels = _pope_labels(Path(annotations)) if annotations else {}
    items, position = [], Counter()
    for row in rows:
        text, category = _question_text(row), row.get("category", "")
        if "label" in row or "answer" in row:
            label, source = row.get("label", row.get("answer")), data
        else:  # LLaVA pairs a category's answers with its labels by position
            source, category_labels = _category_labels(labels, category, annotations, data)
            if position[category] >= len(category_labels):
                raise DataError(
                    f"{source}: {len(category_labels)} labels, fewer than the {category!r} questions of {data}"
                )
            label = category_labels[position[category]]
            position[category] += 1
        if label not in ("yes", "no"):  # eval_pope.py would count anything but "no" as yes
            raise DataError(
                f'{source}: question {row["question_id"]!r} has the label {label!r}; POPE labels are "yes" or "no"'
            )
        items.append(
            EvalItem(
                "",
                _with_suffix(text, SHORT_ANSWER),
                row.get("image", ""),
                category,
                label,
                source_id=row["question_id"],
                prompt=row["text"],
            )
        )
    return items


def _category_labels(labels: dict, category: str, folder, data) -> tuple[Path, list]:
    if category not in labels:
        raise DataError(
            f"{data}: no labels for its {category!r} questions: no coco_pope_{category}.json in "
            f"{folder or 'an --annotations folder'}"
        )
    return labels[category]


def _pope_labels(folder: Path) -> dict[str, tuple[Path, list]]:
    """category -> (file, labels) from the coco_pope_{category}.json files (JSON lines with "label") in a folder."""
    out = {}
    for path in sorted(folder.glob("*_pope_*.json")):
        out[path.stem.split("_pope_")[-1]] = (path, [r["label"] for r in _read_rows(path)])
    if not out:
        raise DataError(f"{folder}: no coco_pope_<category>.json annotation files")
    return out


# ---------------------------------------------------------------- VQA (TextVQA / VQAv2 style and GQA style)

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
# EvalAI's contraction table, every entry (its quirks too: capitalised keys never match lower-cased words, and
# "somebody'd" becomes "somebodyd"); written as spelling>official form.
CONTRACTIONS = dict(
    pair.split(">")
    for pair in """
aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've
couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've
hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's
howd>how'd howll>how'll hows>how's Id've>I'd've I'dve>I'd've Im>I'm Ive>I've isnt>isn't itd>it'd
itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am mightnt>mightn't
mightnt've>mightn't've mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've
neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at
'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've she's>she's shouldve>should've
shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've somebody'd>somebodyd
somebodyd've>somebody'd've somebody'dve>somebody'd've somebodyll>somebody'll somebodys>somebody's
someoned>someone'd someoned've>someone'd've someone'dve>someone'd've someonell>someone'll
someones>someone's somethingd>something'd somethingd've>something'd've something'dve>something'd've
somethingll>something'll thats>that's thered>there'd thered've>there'd've there'dve>there'd've
therere>there're theres>there's theyd>they'd theyd've>they'd've they'dve>they'd've theyll>they'll
theyre>they're theyve>they've twas>'twas wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've
werent>weren't whatll>what'll whatre>what're whats>what's whatve>what've whens>when's whered>where'd
wheres>where's whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll whos>who's
whove>who've whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've wouldnt>wouldn't
wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll
yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've
you'dve>you'd've youll>you'll youre>you're youve>you've
""".split()
)
PERIODS_STRIPPED = 32  # EvalAI passes re.UNICODE (32) where re.sub takes its count: at most 32 periods go


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
    text = re.sub(r"\.(?!\d)", "", text, count=PERIODS_STRIPPED)  # a period not before a digit
    words = [NUMBERS.get(w, w) for w in text.lower().split() if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy: min(#humans who gave the answer / 3, 1), averaged over the 10 leave-one-out sets of 9."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    scores = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(scores) / len(scores)


def gqa_match(prediction: str, answer: str) -> float:
    """LLaVA's GQA flow: convert_gqa_for_eval.py writes text.rstrip(".").lower(), GQA's eval.py compares it with
    the gold answer exactly (no VQA normalization)."""
    return float(prediction.rstrip(".").lower() == answer)


def score_vqa(items, answers):
    per_question = {}
    for item in items:
        prediction = answers.get(item.question_id)
        if prediction is None:
            per_question[item.question_id] = 0.0
        elif isinstance(item.reference, list):
            per_question[item.question_id] = vqa_accuracy(prediction, item.reference)
        else:
            per_question[item.question_id] = gqa_match(prediction, item.reference)
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


def _vqa_items(rows, annotations, data):
    refs = _vqa_annotations(Path(annotations)) if annotations else {}
    items = []
    for i, row in enumerate(rows):
        if "conversations" in row:
            # Training format (a held-out split): the human turn is asked verbatim, as the model was trained
            # with it, and the first gpt turn is the answer.
            turns = row["conversations"]
            question, qid = turns[0]["value"].replace("<image>", "").strip(), row.get("id", i)
            reference, prompt = turns[1]["value"], _conversation_prompt(question, row.get("image", ""))
            meta = {"options": row["options"]} if "options" in row else {}
        else:
            question, qid, prompt = _with_suffix(_question_text(row), SHORT_ANSWER), row["question_id"], row["text"]
            reference = row.get("answers", row.get("answer"))
            reference = _annotated_answer(refs, row, annotations, data) if reference is None else reference
            meta = {}
        _check_vqa_reference(reference, qid, data)
        items.append(
            EvalItem("", question, row.get("image", ""), row.get("category", ""), reference, meta, qid, prompt)
        )
    return items


def _check_vqa_reference(reference, qid, data) -> None:
    if isinstance(reference, list) and len(reference) != 10:
        raise DataError(
            f"{data}: question {qid!r} has {len(reference)} human answers; VQA accuracy (TextVQA's "
            "m4c evaluator) takes 10, and one answer is written as a string (GQA style)"
        )
    if not isinstance(reference, (list, str)):
        raise DataError(f"{data}: question {qid!r}: the answer {reference!r} is neither ten answers nor one string")


def _vqa_annotations(path: Path) -> dict:
    """TextVQA ({"data": [{image_id, question, answers}]}) keyed by (image_id, lower-cased question) as
    eval_textvqa.py keys it, or GQA's questions file (qid -> {answer}) keyed by question id."""
    raw = json.loads(path.read_text())
    if isinstance(raw, dict) and "data" in raw:
        return {(str(d["image_id"]), d["question"].lower()): d["answers"] for d in raw["data"]}
    return {str(qid): q["answer"] for qid, q in raw.items()}


def _annotated_answer(refs: dict, row: dict, annotations, data):
    qid = str(row["question_id"])
    key = qid if qid in refs else (qid, _textvqa_question(row["text"]))
    if key not in refs:
        raise DataError(
            f"{data}: no answer for question {row['question_id']!r} ({row['text'].splitlines()[0]!r}) "
            f"in {annotations or 'the file, and no --annotations'}"
        )
    return refs[key]


def _textvqa_question(text: str) -> str:
    """The question eval_textvqa.py finds in a prompt, lower-cased: the line that is not the OCR tokens of
    LLaVA's three-line prompts, the first line of two-line ones, or what follows "Question:" in OCR-first ones."""
    lines = text.split("\n")
    if text.startswith("OCR tokens: "):
        found = re.search(r"Question: (.*?) Short answer:", text, re.DOTALL)
        return found.group(1).lower() if found else ""
    if "Reference OCR token: " in text and len(lines) == 3:
        return (lines[1] if text.startswith("Reference OCR token:") else lines[0]).lower()
    return lines[0].lower() if len(lines) == 2 else ""


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


def _mme_items(rows, annotations, data):
    truth = _mme_truth(Path(annotations)) if annotations else {}
    items = []
    for row in rows:
        question, category, qid = _question_text(row), row["category"], row["question_id"]
        answer = row.get("answer") or truth.get((category, Path(str(qid)).stem, _mme_key(question)))
        if answer is None:
            raise DataError(
                f"{data}: no answer to {category}/{Path(str(qid)).stem} {question!r} in "
                f"{annotations or 'the file, and no --annotations'}"
            )
        if answer.strip().lower() not in ("yes", "no"):  # MME's calculation.py asserts it
            raise DataError(f"{data}: question {qid!r} has the answer {answer!r}; MME answers are yes or no")
        items.append(
            EvalItem(
                "",
                _with_suffix(question, SHORT_ANSWER),
                row.get("image", str(qid)),
                category,
                answer.strip().lower(),
                source_id=qid,
                prompt=row["text"],
            )
        )
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


def _conversation_prompt(question: str, image: str) -> str:
    """The prompt model_vqa_science.py writes for a conversations file: "<image>" first when there is one."""
    return ("<image>\n" + question) if image else question


def _question_text(row: dict) -> str:
    return row["text"].replace("<image>", "").strip()


def _with_suffix(question: str, suffix: str) -> str:
    return question if question.endswith(suffix) else question + "\n" + suffix


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------- the benchmarks, declared once


@dataclass(frozen=True)
class Benchmark:
    """A benchmark in official LLaVA's file formats: how its question file is read, how answers are scored, and
    which files it takes (`qllava eval --help`)."""

    read: object
    """(rows, annotations, data path) -> EvalItems"""
    score: object
    """(items, answers) -> (metrics, per-question scores)"""
    files: str


BENCHMARKS = {
    "scienceqa": Benchmark(
        _scienceqa_items,
        score_scienceqa,
        'llava_test_CQM-A.json (conversations; "A. text" '
        "choice lines, gpt turn the letter) [+ --annotations problems.json]",
    ),
    "pope": Benchmark(
        _pope_items,
        score_pope,
        "llava_pope_test.jsonl (question_id, image, text, category) + --annotations DIR of coco_pope_*.json",
    ),
    "vqa": Benchmark(
        _vqa_items,
        score_vqa,
        "jsonl (question_id, image, text[, answers: ten (TextVQA) or answer: "
        "one (GQA)]) [+ --annotations TextVQA_0.5.1_val.json or GQA testdev_balanced_questions.json], "
        "or LLaVA JSON whose first gpt turn is the answer",
    ),
    "mme": Benchmark(
        _mme_items,
        score_mme,
        "llava_mme.jsonl (question_id, image, text, category) + --annotations MME_Benchmark_release_version",
    ),
}
if tuple(BENCHMARKS) != BENCHMARK_NAMES:  # recipes are checked against the names alone: the two must agree
    raise RuntimeError(
        f"scorers.BENCHMARKS {tuple(BENCHMARKS)} and benchmark_names.BENCHMARK_NAMES "
        f"{BENCHMARK_NAMES} differ: name each benchmark in both, in the same order"
    )
