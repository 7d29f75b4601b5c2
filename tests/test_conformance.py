"""qllava's scorers against the official ones, on the adversarial corpus of conformance_corpus.py.

Every expected value below was printed by the official scripts, run (in a scratch folder, never part of qllava)
on the files conformance_corpus.py writes: haotian-liu/LLaVA c121f043's llava/eval/eval_science_qa.py,
eval_pope.py, eval_textvqa.py (m4c_evaluator.py) and scripts/convert_gqa_for_eval.py; ScienceQA's
tools/evaluate_acc.py (lupantech/ScienceQA); MME's convert_answer_to_mme.py (LLaVA's MME playground) and
eval_tool/calculation.py (BradyFU/Awesome-Multimodal-Large-Language-Models); GQA's eval.py with the change
LLaVA's docs make for testdev. Answers files are read with qllava's reader, as LLaVA wrote them.
"""

import pytest

from conformance_corpus import (GQA_CASES, MME_ANSWERS, POPE_ANSWERS, SCIENCEQA_ANSWERS, TEXTVQA_CASES, write_gqa,
                                write_mme, write_pope, write_scienceqa, write_textvqa)
from qllava.evaluate import read_answers
from qllava.scorers import load_items, normalize_answer, parse_letter, parse_mme, parse_yes_no, score

SCIENCEQA_INDEX = {  # answer: eval_science_qa.py's choice index with 2 and with 5 choices (-1: wrong)
    'A': (0, 0), 'B': (1, 1), 'C': (-1, 2), 'D': (-1, 3), 'E': (-1, 4), 'F': (-1, -1), 'Z': (-1, -1),
    '': (-1, -1), ' ': (-1, -1), 'BC': (-1, -1), 'AB': (-1, -1), 'ABCDE': (-1, -1), 'a': (-1, -1),
    'b': (-1, -1), 'A.': (-1, -1), 'A. ': (0, 0), 'B. ': (1, 1), 'B. New Hampshire': (1, 1),
    'B.New Hampshire': (-1, -1), 'B) New Hampshire': (-1, -1), '(B)': (-1, -1), 'B ': (-1, -1), ' B': (-1, -1),
    'B\n': (-1, -1), '\nB': (-1, -1), 'The answer is B.': (1, 1), 'The answer is B': (-1, -1),
    'The answer is B!': (1, 1), 'The answer is b.': (-1, -1), 'the answer is B.': (-1, -1),
    'The answer is BC.': (1, 1), 'The answer is (B).': (-1, -1), 'The answer is  B.': (-1, -1),
    'The answer is B\n': (-1, -1), 'The answer is Z.': (-1, -1), 'The answer is E.': (-1, 4),
    'The answer is B. The answer is C.': (-1, -1), 'The answer is B. The answer is B.': (-1, -1),
    'I think the answer is C.': (-1, -1), 'The answer is C.\nThe answer is': (-1, 2),
    'B. The answer is C.': (1, 1), 'Answer: B': (-1, -1), 'Option B': (-1, -1), 'B, C': (-1, -1),
    'The answer is B.The answer is C': (1, 1), '\uff22': (-1, -1), 'B\u200b': (-1, -1), '\xc0': (-1, -1),
    'The answer is \uff22.': (-1, -1), 'The answer is \xc9.': (-1, -1), 'FAILED': (-1, -1), 'A. B. C.': (0, 0),
    'E. none': (-1, 4), 'The answer is A': (-1, -1), 'The answer is A.': (0, 0), 'The answer is D.': (-1, 3),
    'The answer is C..': (-1, 2), 'AnswerB': (-1, -1), 'D. ': (-1, 3), 'E.': (-1, -1),
}
SCIENCEQA_PRINTED = 'Total: 4241, Correct: 1108, Accuracy: 26.13%, IMG-Accuracy: 26.12%'  # eval_science_qa.py
SCIENCEQA_COUNTS = {  # from its output files
    'correct': 1108, 'count': 4241, 'img_correct': 554, 'img_count': 2121,
}
EVALUATE_ACC = {  # ScienceQA's evaluate_acc.py
    'natural': '39.39', 'social': '19.52', 'language': '19.46', 'has_text': '39.39', 'has_image': '26.12',
    'no_context': '19.53', 'grade_1_6': '26.14', 'grade_7_12': '26.11', 'average': '26.13',
}
POPE_ANSWER = {  # eval_pope.py's reading of each answer
    'Yes': 'yes', 'No': 'no', 'yes': 'yes', 'no': 'no', 'YES': 'yes', 'NO': 'yes', 'Nope': 'yes',
    'nope': 'yes', 'knot': 'yes', 'not': 'no', 'Not': 'yes', 'Yes,no': 'yes', 'Yes, no': 'no',
    'yes,no.': 'yes', "There's no": 'no', 'There is no dog.': 'no', 'No.': 'no', 'No, there is not.': 'no',
    ' No': 'no', 'No ': 'no', '\nNo': 'yes', 'no\n': 'yes', '': 'yes', ' ': 'yes', '.': 'yes',
    'Yes. There is no cat.': 'yes', 'The answer is no': 'no', "I can't say; no": 'no', 'None': 'yes',
    'no!': 'yes', 'no?': 'yes', 'No\u2014': 'yes', 'NO.': 'yes', 'Nah': 'yes', 'n': 'yes', 'Yes no': 'no',
    'yes\tno': 'yes', 'Yes.No': 'yes', 'not sure': 'no', 'Absolutely not.': 'no', 'Noo': 'yes', 'Non': 'yes',
    'No\xa0there': 'yes', '\uff2e\uff4f': 'yes', 'There are no dogs': 'no', 'no,': 'no', 'maybe': 'yes',
    'Yes, there is a dog, not a cat.': 'no', 'yes.no': 'yes', 'No-one': 'yes',
}
POPE_METRICS = {  # eval_pope.py's output per split
    'adversarial': {
        'TP': 18, 'FP': 14, 'TN': 11, 'FN': 7, 'Accuracy': 0.58, 'Precision': 0.5625, 'Recall': 0.72,
        'F1 score': 0.631578947368421, 'Yes ratio': 0.64,
    },
    'popular': {
        'TP': 14, 'FP': 18, 'TN': 7, 'FN': 11, 'Accuracy': 0.42, 'Precision': 0.4375, 'Recall': 0.56,
        'F1 score': 0.4912280701754386, 'Yes ratio': 0.64,
    },
    'random': {
        'TP': 18, 'FP': 14, 'TN': 11, 'FN': 7, 'Accuracy': 0.58, 'Precision': 0.5625, 'Recall': 0.72,
        'F1 score': 0.631578947368421, 'Yes ratio': 0.64,
    },
}
MME_ANSWER = {  # calculation.py's reading of each answer, after convert_answer_to_mme.py
    'Yes': 'yes', 'No': 'no', 'yes': 'yes', 'no': 'no', 'YES': 'yes', 'NO': 'no', 'Nope': 'no', 'knot': 'no',
    'Yes,no': 'yes', "There's no": 'other', ' Yes': 'yes', ' No': 'no', 'no.': 'no', 'Yes.': 'yes',
    'Not': 'no', 'not really': 'no', 'None': 'no', 'Noo': 'no', "I don't know": 'other', '': 'other',
    'Y': 'other', 'N': 'other', 'Yeah': 'other', 'Yep': 'other', 'Nah': 'other', 'Never': 'other',
    'Sure, yes': 'other', 'The answer is yes': 'other', 'yes\xa0': 'yes', '\uff39\uff45\uff53': 'other',
    'No\u200b': 'no', 'ye': 'other', 'n\xf3': 'other', 'Non': 'no', 'N/A': 'other', 'Definitely yes': 'other',
    'yesno': 'yes', 'no yes': 'no', 'Yes, no': 'yes', 'Oui': 'other', 'noyes': 'no', '  yes': 'other',
    'Yes!': 'yes', 'nO': 'no', 'yES': 'yes', 'kNOw': 'no', 'Noted': 'no', 'Y es': 'other', 'yes yes': 'yes',
    'No no': 'no', 'Knowing it, yes': 'no', 'Is it? no': 'other', 'None.': 'no', 'Yes: no': 'yes',
    'x': 'other', 'Not at all': 'no',
}
MME_SCORES = {  # calculation.py: acc + acc+ per subtask, in points
    'existence': 125.0, 'count': 25.0, 'position': 125.0, 'color': 25.0, 'posters': 125.0, 'celebrity': 0.0,
    'scene': 0.0, 'landmark': 25.0, 'artwork': 125.0, 'OCR': 25.0, 'commonsense_reasoning': 100.0,
    'numerical_calculation': 25.0, 'text_translation': 0.0, 'code_reasoning': 0.0,
}
MME_TOTALS = {  # calculation.py
    'perception': 600.0, 'cognition': 125.0,
}
TEXTVQA_SCORES = [  # the m4c evaluator, question by question
    1.0, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
    1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.3, 0.6, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0,
    0.0, 0.0, 1.0,
]
TEXTVQA_PRINTED = {  # eval_textvqa.py
    'samples': 45, 'accuracy': '70.67',
}
NORMALIZED = {  # EvalAIAnswerProcessor
    '': '', '\tnew\nyork\t': 'new york', '  Coca-Cola  ': 'coca cola', ' yes': 'yes', '$5': '$5',
    '(a) red': 'red', '.': '', '...': '', '........': '', '.................................': '.',
    '........................................': '........', '0': '0', '1,000': '1000', '1,2': '12', '10': '10',
    '1000': '1000', '12': '12', '1230': '1230', '12:30': '12:30', '2': '2', '3.5': '3.5', '3.5.': '3.5',
    '5': '5', 'BROWN': 'brown', 'Brown.': 'brown', 'CAT': 'cat', 'Dakota': 'dakota',
    'Dakota digital': 'dakota digital', 'Dont': "don't", 'Hes': "he's", 'Ive': 'ive', 'Man..': 'man',
    'No': 'no', 'No.\n': 'no', 'On the left': 'on left', 'Red.': 'red', 'STOP': 'stop', 'T-Shirt.': 't shirt',
    'The answer is 5.': 'answer is 5', 'The answer is no.': 'answer is no', 'The cat': 'cat',
    "The cat's toy": "cat 's toy", 'Two': '2', 'White and black': 'white and black', 'Yes': 'yes',
    'Yes.': 'yes', 'Yes..': 'yes', 'a': '', 'a man': 'man', 'a.m.': 'am', 'am': 'am', 'an apple': 'apple',
    'apple': 'apple', 'blue': 'blue', 'brown, white': 'brown white', 'cafe': 'cafe', 'caf\xe9': 'caf\xe9',
    'cat.': 'cat', 'cats': 'cats', 'cats toy': 'cats toy', 'coca cola': 'coca cola', 'dakota': 'dakota',
    'dakota digital': 'dakota digital', "don't": "don't", 'dont': "don't", 'gray': 'gray', "he's": "he 's",
    'hello - world': 'hello world', 'hello world': 'hello world', 'hello-world': 'hello world', "i've": "i've",
    "it's": "it 's", 'its': 'its', 'left': 'left', 'left.right': 'leftright', "man's": "man 's", 'man.': 'man',
    'new york': 'new york', 'no\n': 'no', 'no, it is not': 'no it is not', 'none': '0', "o'clock": "o'clock",
    'oclock': "o'clock", 'red': 'red', "should've": "should've", 'shouldve': "should've",
    "somebody'd": 'somebodyd', 'somebodyd': 'somebodyd', 'stop': 'stop', 'stop sign': 'stop sign',
    't-shirt': 't shirt', 'ten': '10', "they'll": "they'll", 'theyll': "they'll", 'tshirt': 'tshirt',
    'two': '2', 'u.s.a.': 'usa', 'usa': 'usa', "we've": "we've", 'weve': "we've", 'white.': 'white',
    'wooden': 'wooden', "would've": "would've", 'wouldve': "would've",
    'xxx...................................y': 'xxx...y', 'xxxy': 'xxxy', "y'all": "y'all", 'yall': "y'all",
    'yes': 'yes', 'yes ': 'yes', 'yes!': 'yes', 'yes.': 'yes', "you'll": "you'll", 'youll': "you'll",
    '\uff23\uff41\uff46\uff45': '\uff43\uff41\uff46\uff45', '\uff4e\uff4f': '\uff4e\uff4f',
}
GQA_PREDICTIONS = [  # convert_gqa_for_eval.py
    'yes', 'yes', 'yes', 'yes!', ' yes', 'yes ', 'the cat', 'cat', 'cat', 'cats', 'two', '2', 't-shirt',
    't-shirt', 'tshirt', 'left', 'on the left', 'white', 'white and black', '', 'no', 'no, it is not',
    'the answer is no', 'man', 'a man', 'man', 'wooden', 'gray', 'caf\xe9', '\uff4e\uff4f', 'no\n', 'no.\n',
    'brown', 'brown', 'brown, white', 'dont', "man's", '1,000', 'left.right', '',
]
GQA_CORRECT = [  # GQA's eval.py: prediction == gold
    1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0,
    0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0,
]
GQA_PRINTED = {  # GQA's eval.py
    'Binary': 30.77, 'Open': 44.44, 'Accuracy': 40.0,
}


def scored(benchmark, paths, annotations=True):
    items = load_items(benchmark, str(paths["data"]), str(paths["annotations"]) if annotations else None)
    metrics, per_question = score(benchmark, items, read_answers(paths["answers"]))
    return items, metrics, per_question


def test_scienceqa_letters_equal_eval_science_qa():
    assert list(SCIENCEQA_INDEX) == SCIENCEQA_ANSWERS
    assert {a: (parse_letter(a, 2), parse_letter(a, 5)) for a in SCIENCEQA_ANSWERS} == SCIENCEQA_INDEX


def test_scienceqa_metrics_equal_eval_science_qa_and_evaluate_acc(tmp_path):
    paths = write_scienceqa(tmp_path)
    items, metrics, per_question = scored("scienceqa", paths)
    counts = SCIENCEQA_COUNTS
    assert len(items) == counts["count"] and sum(per_question.values()) == counts["correct"]
    assert metrics["accuracy"] == counts["correct"] / counts["count"]
    assert metrics["accuracy_IMG_question"] == counts["img_correct"] / counts["img_count"]
    ours = {"natural": "NAT", "social": "SOC", "language": "LAN", "has_text": "TXT", "has_image": "IMG",
            "no_context": "NO", "grade_1_6": "G1-6", "grade_7_12": "G7-12", "average": None}
    assert {k: f"{100 * metrics['accuracy_' + v if v else 'accuracy']:.2f}" for k, v in ours.items()} == EVALUATE_ACC
    # Without problems.json the question file's "A. text" lines and gpt letters give the same scores.
    _, alone, per_question_alone = scored("scienceqa", paths, annotations=False)
    assert per_question_alone == per_question and alone["accuracy"] == metrics["accuracy"]


def test_pope_equals_eval_pope(tmp_path):
    assert {a: parse_yes_no(a) for a in POPE_ANSWERS} == POPE_ANSWER
    _, metrics, _ = scored("pope", write_pope(tmp_path))
    names = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall", "f1": "F1 score",
             "yes_ratio": "Yes ratio"}
    for split, official in POPE_METRICS.items():
        assert {n: metrics[f"{n}_{split}"] for n in names} == pytest.approx({n: official[o] for n, o in names.items()})


def test_mme_equals_calculation(tmp_path):
    assert {a: parse_mme(a) for a in MME_ANSWERS} == MME_ANSWER
    _, metrics, _ = scored("mme", write_mme(tmp_path))
    assert {c: metrics[f"score_{c}"] for c in MME_SCORES} == pytest.approx(MME_SCORES)
    assert (metrics["perception"], metrics["cognition"]) == pytest.approx(tuple(MME_TOTALS.values()))


def test_textvqa_equals_eval_textvqa_question_for_question(tmp_path):
    items, metrics, per_question = scored("vqa", write_textvqa(tmp_path))
    assert len(items) == TEXTVQA_PRINTED["samples"] == len(TEXTVQA_CASES)  # 15 image ids, every question kept
    assert len({item.source_id for item in items}) == 15
    assert [per_question[item.question_id] for item in items] == pytest.approx(TEXTVQA_SCORES)
    assert f"{100 * metrics['accuracy']:.2f}" == TEXTVQA_PRINTED["accuracy"]


def test_normalization_equals_evalai():
    assert {s: normalize_answer(s) for s in NORMALIZED} == NORMALIZED


def test_gqa_equals_convert_gqa_and_eval(tmp_path):
    items, metrics, per_question = scored("vqa", write_gqa(tmp_path))
    assert [per_question[item.question_id] for item in items] == GQA_CORRECT
    assert round(100 * metrics["accuracy"], 2) == GQA_PRINTED["Accuracy"]
    assert [answer.rstrip(".").lower() for answer, _ in GQA_CASES] == GQA_PREDICTIONS
