"""LLaVA conversation templates, rendered character for character as official LLaVA renders them.

The reference is LLaVA's llava/conversation.py (get_prompt) and the preprocess_* functions of
llava/train/train.py. A template turns a conversation into one string plus the character spans that
are trained on (each assistant message, with the separator space before it and the end token LLaVA appends
to it). Tokenization and the
token-level labels are data/samples.py's job; spans keep this module free of any tokenizer.

Rules reproduced from LLaVA:
- `plain` (stage 1): "<image>" + caption + "\\n"; the human text is dropped, the caption and newline are trained.
- `vicuna_v1` (SeparatorStyle.TWO): system + " " + "USER: q ASSISTANT: a</s>USER: ..." ; the generation
  prompt ends with "ASSISTANT:".
- `mistral_instruct` / `llava_llama_2` (SeparatorStyle.LLAMA_2): "[INST] q [/INST] a </s>" rounds, joined by
  the template's sep ("" / "<s>"); llava_llama_2 wraps its system prompt in <<SYS>> inside the first [INST].

Every template is declared once, in TEMPLATES.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_TAG = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)


@dataclass(frozen=True)
class Rendered:
    """A conversation as text, and the [start, end) character spans whose tokens are labels."""

    text: str
    trained: tuple[tuple[int, int], ...]


class TemplateError(ValueError):
    """A conversation the template cannot render (the message says why)."""


@dataclass(frozen=True)
class Template:
    """One of official LLaVA's conversation templates (llava/conversation.py)."""

    style: str
    """"plain" (SeparatorStyle.PLAIN), "two" (SeparatorStyle.TWO) or "llama_2" (SeparatorStyle.LLAMA_2)."""
    system: str = ""
    bos_between_rounds: bool = False
    """llama_2 style: rounds joined by the BOS string (LLaVA's sep "<s>"), else by nothing."""

    @property
    def assistant_separator(self) -> str:
        """Where LLaVA cuts a round into instruction and answer when it counts tokens for the labels."""
        return " ASSISTANT: " if self.style == "two" else "[/INST] "


TEMPLATES = {
    "plain": Template("plain"),
    "vicuna_v1": Template("two", VICUNA_SYSTEM),
    "mistral_instruct": Template("llama_2"),
    "llava_llama_2": Template("llama_2", LLAVA_LLAMA_2_SYSTEM, bos_between_rounds=True),
}


def render(
    template: str,
    turns: list[tuple[str, str]],
    bos: str,
    eos: str,
    generation_prompt: bool = False,
    special_tokens: tuple[str, ...] = (),
    system: str | None = None,
) -> Rendered:
    """Render (role, text) turns, roles "user"/"assistant", alternating and starting with the user.

    `system` replaces the template's system prompt (a sample's own system message); only templates that have one
    (vicuna_v1, llava_llama_2) take it.

    With generation_prompt, the turns end with a user turn and the text ends where the model starts to answer.
    LLaVA writes the end token literally ("</s>"); `eos`/`bos` are the tokenizer's own strings for it. The
    text does not include the BOS token the tokenizer adds (if it adds one).
    A conversation to train on is refused (TemplateError) where official LLaVA's labels would not be the
    assistant turns: a turn holding one of the tokenizer's `special_tokens`, or a template separator.
    A user turn that is only the image is rendered as the tag alone (see image_only).
    """
    spec = template_spec(template)
    if system is not None and not spec.system:
        raise TemplateError(f"the {template} template has no system prompt to replace")
    system = spec.system if system is None else system
    _check_turns(turns, generation_prompt)
    turns = [(role, IMAGE_TAG if role == "user" and image_only(text) else text) for role, text in turns]
    if not generation_prompt:
        _check_no_special_tokens(turns + [("system", system)], special_tokens)
    if spec.style == "plain":
        return _render_plain(turns, generation_prompt)
    if spec.style == "two":
        rendered = _render_two(system, turns, eos, generation_prompt)
    else:
        rendered = _render_llama_2(system, bos if spec.bos_between_rounds else "", turns, eos)
    if not generation_prompt:
        _check_rounds(rendered.text, spec.assistant_separator, eos)
    return rendered


def image_only(text: str) -> bool:
    """Whether a user turn holds the image and nothing else (whitespace aside).

    LLaVA's preprocess_multimodal writes such a turn as "<image>" + "\n" and strips it, so it is trained as the
    tag alone, and the template's text resumes right after the image ("<image> ASSISTANT:"). Prompts put the
    image first as "<image>\n" + question (LLaVA's inference scripts do so too); with no question that newline
    would be one token the model never saw after an image in training, so render drops it.
    """
    return text.strip() == IMAGE_TAG


def template_spec(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown template {name!r}: one of {', '.join(TEMPLATES)}") from None


class _Builder:
    """Appends text pieces and remembers which of them are trained."""

    def __init__(self):
        self.text = ""
        self.spans: list[tuple[int, int]] = []

    def add(self, piece: str, trained: bool = False):
        if trained and piece:
            self.spans.append((len(self.text), len(self.text) + len(piece)))
        self.text += piece

    def done(self) -> Rendered:
        return Rendered(self.text, tuple(self.spans))


def _render_plain(turns, generation_prompt: bool) -> Rendered:
    # preprocess_plain: the human value is replaced by the image tag alone; caption + sep ("\n") are trained.
    if not generation_prompt and len(turns) != 2:
        raise TemplateError(f"the plain template takes one caption turn, got {len(turns) // 2} rounds")
    if IMAGE_TAG not in turns[0][1]:
        raise TemplateError("the plain template needs an image (it renders only <image> + caption)")
    b = _Builder()
    b.add(IMAGE_TAG)
    if not generation_prompt:
        b.add(turns[1][1] + "\n", trained=True)
    return b.done()


def _render_two(system: str, turns, eos: str, generation_prompt: bool) -> Rendered:
    # SeparatorStyle.TWO with sep=" ", sep2=eos: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."; LLaVA's labels
    # start right after "ASSISTANT:", the separator space included.
    b = _Builder()
    b.add(system + " ")
    for role, text in turns:
        if role == "user":
            b.add(f"USER: {text} ")
        else:
            b.add("ASSISTANT:")
            b.add(" " + text + eos, trained=True)
    if generation_prompt:
        b.add("ASSISTANT:")
    return b.done()


def _render_llama_2(system: str, sep: str, turns, eos: str) -> Rendered:
    # SeparatorStyle.LLAMA_2: sep + "[INST] q [/INST]" then " a " + eos; the leading sep is stripped. LLaVA's
    # labels start right after "[/INST]", the separator space included. A generation prompt adds nothing:
    # the text ends with "[/INST]".
    b = _Builder()
    for i, (role, text) in enumerate(turns):
        if role == "user":
            if i == 0 and system:
                text = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + text
            b.add(("" if i == 0 else sep) + f"[INST] {text} [/INST]")
        else:
            b.add(f" {text} {eos}", trained=True)
    return b.done()


def _check_turns(turns, generation_prompt: bool):
    if not turns:
        raise TemplateError("the conversation is empty")
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise TemplateError(
                f"turn {i + 1} is from {role!r}; turns must alternate user, assistant, starting with user"
            )
    last = turns[-1][0]
    if generation_prompt and last != "user":
        raise TemplateError("a generation prompt must end with a user turn")
    if not generation_prompt and last != "assistant":
        raise TemplateError(
            "the conversation has no assistant turn to train on"
            if len(turns) == 1
            else "the conversation ends with a user turn that has no answer"
        )


def _check_no_special_tokens(turns, special_tokens: tuple[str, ...]) -> None:
    # LLaVA's tokenizer reads "</s>" or "<s>" in a turn as a control token, not as text; "<unk>", its pad
    # token, is even counted as padding. Either way its labels stop being the assistant turns.
    for token in special_tokens:
        if token and token != IMAGE_TAG and any(token in text for _, text in turns):
            raise TemplateError(f"a turn holds the special token {token!r} as text")


def _check_rounds(text: str, assistant_separator: str, eos: str) -> None:
    # Official LLaVA labels a conversation by cutting its text at each end token into rounds and each round
    # at its assistant separator, then counting tokens. A round cut into other than two parts (a separator
    # inside a turn) makes its counts miss, and it masks the whole sample ("tokenization mismatch").
    for round_text in text.split(eos)[:-1]:
        if round_text.count(assistant_separator) != 1:
            raise TemplateError(
                f"a turn holds the template's separator {assistant_separator.strip()!r} "
                "(official LLaVA would mask the whole sample)"
            )


def chat_template(template: str, bos_first: bool, media_markers: bool = False) -> str:
    """The template as a Jinja chat template, for a merged checkpoint used without qllava (pipelines, servers).

    Renders what `render` renders, with the BOS token first when the tokenizer adds one in training
    (`bos_first`; processors tokenize chat templates without adding special tokens). Message content may be
    a string or a list of {"type": "image"} / {"type": "text"} parts; the image tag goes first in its turn,
    as LLaVA puts it. A leading system message replaces the template's system prompt, as in training; templates
    without one leave it out, as training does. The source has no line breaks, so no whitespace control is
    needed: every space in it is output.

    With `media_markers` (the template of a GGUF export), a string message holding llama.cpp's media markers
    (`<__media__>` in llama-mtmd-cli, `<__media_RANDOM__>` in llama-server, which glue them to the text with no
    line break) is rendered as LLaVA's preprocessing writes an image turn: each marker first, followed by a line
    break, then the text, stripped.
    """
    spec = template_spec(template)
    # A user message that is only the image is written as the tag alone, as render writes it (image_only).
    string = "{{ '<image>' if m['role'] == 'user' and m['content'] | trim == '<image>' else m['content'] }}"
    if media_markers:  # each marker, then a line break unless nothing follows, then the text, stripped
        string = (
            "{% set pieces = m['content'].split('<__media') %}{% if pieces | length > 1 %}"
            "{% set ns = namespace(text=pieces[0], marks=[]) %}{% for p in pieces[1:] %}"
            "{% set ns.marks = ns.marks + ['<__media' ~ p.split('__>', 1)[0] ~ '__>'] %}"
            "{% set ns.text = ns.text + p.split('__>', 1)[1] %}{% endfor %}"
            "{% for mark in ns.marks %}{{ mark }}{{ '\\n' if ns.text | trim or not loop.last else '' }}"
            "{% endfor %}{{ ns.text.strip() }}{% else %}" + string + "{% endif %}"
        )
    content = (
        "{% macro content(m) %}{% if m['content'] is string %}" + string + "{% else %}"
        "{% set images = m['content'] | selectattr('type', 'equalto', 'image') | list %}"
        "{% set text %}{% for p in m['content'] if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}{% endset %}"
        "{% for p in images %}<image>{{ '\\n' if text | trim or not loop.last else '' }}{% endfor %}"
        "{% if text | trim or not images %}{{ text }}{% endif %}{% endif %}{% endmacro %}"
    )
    # How many leading messages are the system prompt (0 or 1), and the system prompt itself.
    system = (
        "{% set first = 1 if messages and messages[0]['role'] == 'system' else 0 %}"
        "{% set system %}{% if first %}{{ content(messages[0]) }}{% else %}" + spec.system + "{% endif %}{% endset %}"
    )
    if spec.style == "plain":
        body = (
            "{% for m in messages %}{% if m['role'] == 'user' %}<image>{% elif m['role'] == 'assistant' %}"
            "{{ content(m) }}\n{% endif %}{% endfor %}"
        )
    elif spec.style == "two":
        body = (
            "{{ system }} {% for m in messages %}{% if m['role'] == 'user' %}USER: {{ content(m) }} "
            "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ content(m) }}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
        )
    else:
        wrapped = "{% if system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}" if spec.system else ""
        sep = "{{ bos_token }}" if spec.bos_between_rounds else ""
        body = (
            "{% for m in messages %}{% if m['role'] == 'user' %}"
            f"{{% if loop.index0 > first %}}{sep}{{% endif %}}[INST] {{% if loop.index0 == first %}}{wrapped}"
            "{% endif %}{{ content(m) }} [/INST]{% elif m['role'] == 'assistant' %} {{ content(m) }} "
            "{{ eos_token }}{% endif %}{% endfor %}"
        )
    return content + system + ("{{ bos_token }}" if bos_first else "") + body
