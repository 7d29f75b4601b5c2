"""An adversarial corpus of LLaVA JSON samples for label parity with official LLaVA (pure Python, no imports
from qllava, so the reference can be run on exactly these samples).

Answers start with what a sentencepiece tokenizer cannot merge with the space before it (digits, newlines,
CJK, emoji, ...), hold the templates' own separators and special tokens, odd whitespace and unicode;
conversations are single- and multi-turn, with and without an image, the image tag in and out of place.
"""

import random

ANSWER_STARTS = {
    "word": "Yes",
    "digit": "1234",
    "digit_sentence": "3 dogs are sitting on the bench.",
    "newline": "\nYes, it is.",
    "two_newlines": "\n\nFirst line.\nSecond line.",
    "space": " A cat.",
    "two_spaces": "  two spaces",
    "tab": "\tTabbed.",
    "punct_paren": "(A) the first option",
    "punct_dot": ". A dot first",
    "punct_comma": ", comma",
    "punct_excl": "!!!",
    "quote": '"Quoted" answer',
    "apostrophe": "'tis so",
    "dash": "- item one\n- item two",
    "cjk": "猫です。",
    "cjk_zh": "中文回答",
    "emoji": "🐱 a cat",
    "emoji_only": "👍",
    "accent": "Äpfel sind rot.",
    "cyrillic": "Да",
    "letter_then_digit": "A1 Steak Sauce",
    "digits_decimal": "3.14",
    "negative": "-5 degrees",
    "url": "https://example.com",
    "hash": "#1 choice",
    "dollar": "$100",
    "percent": "50%",
    "trailing_space": "Yes ",
    "trailing_newline": "Yes\n",
    "trailing_space_digit": "42 ",
    "single_char": "B",
    "single_digit": "7",
    "lower": "yes",
    "code": "```python\nprint(1)\n```",
    "math": "x^2 + 1",
    "long": "Sure. " * 30,
}
QUESTIONS = [
    "What is in the image?",
    "How many dogs?\nAnswer the question using a single word or phrase.",
    "2 + 2 = ?",
    "描述这张图片。",
    "Question with trailing space ",
    "Q",
    "What about 🐶?",
]
HOSTILE_ANSWERS = {
    "eos_inside": "I said </s> then stopped",
    "inst_inside": "See [/INST] here",
    "assistant_inside": "ASSISTANT: again",
    "user_inside": "USER: what",
    "bos_inside": "<s> start",
    "crlf": "line1\r\nline2",
    "nbsp": "\u00a0nbsp first",
    "zwsp": "\u200bzero width",
    "fullwidth": "ＡＢＣ１２３",
    "combining": "e\u0301te",
    "only_space": " ",
    "only_newline": "\n",
    "many_spaces": "a     b      c",
    "space_newline": " \n x",
    "rtl": "שלום עולם",
    "thai": "สวัสดี",
    "hindi": "नमस्ते",
    "korean": "안녕하세요",
    "math_sym": "∑ x² ≤ ∞",
    "backslash": "C:\\path\\to",
    "unk_literal": "<unk> token",
    "sys_tag": "<<SYS>> sys",
    "tilde": "~~~",
    "ellipsis": "…and so on",
    "bullet": "• one\n• two",
    "smart_quotes": "“hi” ‘there’",
}
HOSTILE_QUESTIONS = [
    "<image>\nWhat?",
    "  <image>  \n  padded question  ",
    "<image>What is [/INST] this?",
    "<image>\nUSER: nested ASSISTANT: roles",
    "<image>\n\n\ndouble newline",
    "<image>\nend with newline\n",
]
FRAGMENTS = [
    "What is",
    "the",
    "color",
    "of",
    "12",
    "3.5",
    "%",
    "(a)",
    "B.",
    "\n",
    " ",
    "  ",
    "\t",
    "猫",
    "🐶",
    "Äpfel",
    "OCR:",
    '"',
    "'",
    "-",
    "http://x.y/z",
    "1,000",
    "x = 2",
    "```",
    "Answer the question using a single word or phrase.",
    "Yes",
    "No",
    "A.",
    "Options:",
    "naïve",
    "ß",
    "…",
    "—",
    "</",
    "s>",
    "[",
    "]",
]
# A human turn that is only the image, as captioning data written for the conversation templates has it: the
# template's own text (" ASSISTANT:", " [/INST]") resumes right after the image.
IMAGE_ONLY_TURNS = {
    "bare": "<image>",
    "newline": "<image>\n",
    "newline_first": "\n<image>",
    "spaces": "  <image>  ",
    "tab_newlines": "\t<image>\n\n",
}
IMAGE_ONLY_ANSWERS = ("word", "digit", "newline", "space", "cjk", "emoji", "single_char")


def conversations(random_samples: int = 150) -> list[dict]:
    """Stage-2 samples (conversation templates)."""
    out = []
    for i, (name, answer) in enumerate(ANSWER_STARTS.items()):
        q = QUESTIONS[i % len(QUESTIONS)]
        out.append(_sample(f"img-{name}", [("<image>\n" + q, answer)], image=True))
        out.append(_sample(f"txt-{name}", [(q, answer)]))
    names = list(ANSWER_STARTS)
    for k in range(0, len(names), 3):
        rounds = [(QUESTIONS[(k + j) % len(QUESTIONS)], ANSWER_STARTS[n]) for j, n in enumerate(names[k : k + 3])]
        out.append(_sample(f"multi-img-{k}", [("<image>\n" + rounds[0][0], rounds[0][1])] + rounds[1:], image=True))
        out.append(_sample(f"multi-txt-{k}", rounds))
    out.append(_sample("tag-end", [("What is this?\n<image>", "12 apples")], image=True))
    out.append(_sample("tag-middle", [("Look: <image> what is it?", "A dog.")], image=True))
    out.append(
        {
            "id": "lead-gpt",
            "conversations": [
                {"from": "gpt", "value": "Hello"},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "9 lives"},
            ],
        }
    )
    for i, (name, answer) in enumerate(HOSTILE_ANSWERS.items()):
        q = HOSTILE_QUESTIONS[i % len(HOSTILE_QUESTIONS)]
        out.append(_sample(f"hostile-img-{name}", [(q, answer)], image=True))
        out.append(_sample(f"hostile-txt-{name}", [(q.replace("<image>", ""), answer)]))
    for name, q, a in (
        ("empty_q", "", "1 answer"),
        ("space_q", " ", "an answer"),
        ("empty_a", "q", ""),
        ("newline_q", "\n", "x"),
    ):
        out.append(_sample(f"edge-img-{name}", [(q, a)], image=True))
        out.append(_sample(f"edge-txt-{name}", [(q, a)]))
    return out + _image_only_conversations() + _random_conversations(random_samples, seed=0)


def captions(random_samples: int = 60) -> list[dict]:
    """Stage-1 samples (the plain template): each answer above as a caption."""
    answers = list(ANSWER_STARTS.items()) + list(HOSTILE_ANSWERS.items()) + [("empty", "")]
    out = [_sample(f"cap-{name}", [("<image>\nDescribe the image briefly.", a)], image=True) for name, a in answers]
    out += [
        _sample(f"cap-imgonly-{form}", [(human, "A cat on a mat.")], image=True)
        for form, human in IMAGE_ONLY_TURNS.items()
    ]
    rng = random.Random(1)
    return out + [_sample(f"cap-rand-{i}", [("<image>", _fragment(rng))], image=True) for i in range(random_samples)]


def _image_only_conversations() -> list[dict]:
    """The image alone as a human turn: first, in the middle of a multi-turn conversation, and later."""
    out = []
    for form, human in IMAGE_ONLY_TURNS.items():
        for name in IMAGE_ONLY_ANSWERS:
            out.append(_sample(f"imgonly-{form}-{name}", [(human, ANSWER_STARTS[name])], image=True))
    follow_ups = [(QUESTIONS[k], ANSWER_STARTS[n]) for k, n in enumerate(("word", "digit", "newline", "space"))]
    for form, human in IMAGE_ONLY_TURNS.items():
        out.append(_sample(f"imgonly-multi-{form}", [(human, "A dog on a sofa.")] + follow_ups[:2], image=True))
    out.append(_sample("imgonly-multi-long", [("<image>", "12 apples")] + follow_ups, image=True))
    out.append(_sample("imgonly-second-turn", [("Hi", "Hello"), ("<image>", "A dog.")], image=True))
    out.append(_sample("imgonly-middle-turn", [("Hi", "Hello"), ("<image>\n", "\nA dog."), ("More?", "3")], image=True))
    return out


def _random_conversations(n: int, seed: int) -> list[dict]:
    """LLaVA-mix-like conversations of random fragments, whitespace and unicode, 1-4 rounds."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rounds = [(_fragment(rng), _fragment(rng)) for _ in range(rng.randint(1, 4))]
        if i % 3:
            q = rounds[0][0]
            rounds[0] = (rng.choice(["<image>\n" + q, q + "\n<image>", "<image>" + q]), rounds[0][1])
        out.append(_sample(f"rand-{i}", rounds, image=bool(i % 3)))
    return out


def _fragment(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) + rng.choice(["", " ", " ", "\n"]) for _ in range(rng.randint(1, 12)))


def _sample(sample_id: str, rounds: list[tuple[str, str]], image: bool = False) -> dict:
    turns = [turn for q, a in rounds for turn in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    sample = {"id": sample_id, "conversations": turns}
    if image:
        sample["image"] = "x.png"
    return sample
