"""Template parity with official LLaVA (llava/conversation.py + train.py preprocess_*), token for token.

Expectations are written out by hand from LLaVA's rules: the text around <image> is tokenized on its own
(a "▁" and "<0x0A>" follow the image), only the first BOS stays, and the labels are each assistant message
plus the end token LLaVA appends ("</s>"; "▁" + "</s>" for the LLAMA_2 styles; "\\n" for plain).
"""

import pytest

from qllava import tiny
from qllava.data import encode, expand_images
from qllava.templates import TemplateError, render
from qllava.tokenizer import ids_and_offsets, load_tokenizer

TURNS = [
    ("user", "<image>\nWhat is in the image?"),
    ("assistant", "A cat."),
    ("user", "What color is it?"),
    ("assistant", "Black."),
]
IMG = "<image>"


@pytest.fixture(scope="module")
def mistral(mistral_tokenizer_dir):
    return load_tokenizer(str(mistral_tokenizer_dir))


def pieces(tok, template, turns=TURNS, n_image=2):
    image_id = tok.convert_tokens_to_ids(IMG)
    ids, labels = encode(render(template, turns, "<s>", "</s>"), tok, image_id)
    widths = [n_image] * ids.count(image_id)  # one placeholder per image, widened as the collator does
    ids, labels = expand_images(ids, image_id, widths).tolist(), expand_images(ids, image_id, widths, labels).tolist()
    return tok.convert_ids_to_tokens(ids), [tok.convert_ids_to_tokens(x) for x in labels if x != -100]


def test_vicuna_v1_text_is_llavas():
    assert render("vicuna_v1", TURNS, "<s>", "</s>").text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the image? ASSISTANT: "
        "A cat.</s>USER: What color is it? ASSISTANT: Black.</s>"
    )
    assert render("vicuna_v1", TURNS[:1], "<s>", "</s>", generation_prompt=True).text.endswith(
        "USER: <image>\nWhat is in the image? ASSISTANT:"
    )


def test_mistral_instruct_and_llava_llama_2_text_is_llavas():
    assert render("mistral_instruct", TURNS, "<s>", "</s>").text == (
        "[INST] <image>\nWhat is in the image? [/INST] A cat. </s>[INST] What color is it? [/INST] Black. </s>"
    )
    assert render("llava_llama_2", TURNS, "<s>", "</s>").text == (
        "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using natural language.\n"
        "<</SYS>>\n\n<image>\nWhat is in the image? [/INST] A cat. </s><s>[INST] What color is it? [/INST] Black. </s>"
    )
    assert render("mistral_instruct", TURNS[:1], "<s>", "</s>", generation_prompt=True).text.endswith("[/INST]")


def test_plain_keeps_only_image_and_caption():
    rendered = render("plain", [("user", "<image>\nDescribe it."), ("assistant", "A cat.")], "<s>", "</s>")
    assert rendered.text == "<image>A cat.\n" and rendered.trained == ((7, 14),)


def test_vicuna_v1_with_the_real_mistral_tokenizer(mistral):
    ids, labels = pieces(mistral, "vicuna_v1")
    system = [
        "▁A",
        "▁chat",
        "▁between",
        "▁a",
        "▁curious",
        "▁user",
        "▁and",
        "▁an",
        "▁artificial",
        "▁intelligence",
        "▁assistant",
        ".",
        "▁The",
        "▁assistant",
        "▁gives",
        "▁helpful",
        ",",
        "▁detailed",
        ",",
        "▁and",
        "▁polite",
        "▁answers",
        "▁to",
        "▁the",
        "▁user",
        "'",
        "s",
        "▁questions",
        ".",
    ]
    assert ids == [
        "<s>",
        *system,
        "▁US",
        "ER",
        ":",
        "▁",
        IMG,
        IMG,
        "▁",
        "<0x0A>",
        "What",
        "▁is",
        "▁in",
        "▁the",
        "▁image",
        "?",
        "▁ASS",
        "IST",
        "ANT",
        ":",
        "▁A",
        "▁cat",
        ".",
        "</s>",
        "▁US",
        "ER",
        ":",
        "▁What",
        "▁color",
        "▁is",
        "▁it",
        "?",
        "▁ASS",
        "IST",
        "ANT",
        ":",
        "▁Black",
        ".",
        "</s>",
    ]
    assert labels == ["▁A", "▁cat", ".", "</s>", "▁Black", ".", "</s>"]


def test_mistral_instruct_with_the_real_mistral_tokenizer(mistral):
    ids, labels = pieces(mistral, "mistral_instruct")
    assert ids == [
        "<s>",
        "▁[",
        "INST",
        "]",
        "▁",
        IMG,
        IMG,
        "▁",
        "<0x0A>",
        "What",
        "▁is",
        "▁in",
        "▁the",
        "▁image",
        "?",
        "▁[",
        "/",
        "INST",
        "]",
        "▁A",
        "▁cat",
        ".",
        "▁",
        "</s>",
        "▁[",
        "INST",
        "]",
        "▁What",
        "▁color",
        "▁is",
        "▁it",
        "?",
        "▁[",
        "/",
        "INST",
        "]",
        "▁Black",
        ".",
        "▁",
        "</s>",
    ]
    assert labels == ["▁A", "▁cat", ".", "▁", "</s>", "▁Black", ".", "▁", "</s>"]


def test_llava_llama_2_second_round_starts_with_bos(mistral):
    ids, labels = pieces(mistral, "llava_llama_2")
    assert ids[:8] == ["<s>", "▁[", "INST", "]", "▁<<", "SYS", ">>", "<0x0A>"]
    first_answer = ids.index("▁A")
    assert ids[first_answer : first_answer + 10] == ["▁A", "▁cat", ".", "▁", "</s>", "<s>", "▁[", "INST", "]", "▁What"]
    assert labels == ["▁A", "▁cat", ".", "▁", "</s>", "▁Black", ".", "▁", "</s>"]


def test_plain_with_the_real_mistral_tokenizer(mistral):
    ids, labels = pieces(mistral, "plain", [("user", "Describe.\n<image>"), ("assistant", "A cat on a mat.")], 3)
    assert ids == ["<s>", IMG, IMG, IMG, "▁A", "▁cat", "▁on", "▁a", "▁mat", ".", "<0x0A>"]
    assert labels == ["▁A", "▁cat", "▁on", "▁a", "▁mat", ".", "<0x0A>"]


def test_text_only_conversation(mistral):
    ids, labels = pieces(mistral, "vicuna_v1", [("user", "Hi"), ("assistant", "Hello.")])
    assert ids[-13:] == ["▁questions", ".", "▁US", "ER", ":", "▁Hi", "▁ASS", "IST", "ANT", ":", "▁Hello", ".", "</s>"]
    assert ids.count("<s>") == 1 and IMG not in ids
    assert labels == ["▁Hello", ".", "</s>"]


@pytest.mark.parametrize(
    "template,before,after",
    [
        ("vicuna_v1", ["▁ASS", "IST", "ANT", ":"], ["▁", "1", "2", "3", "4", "</s>"]),
        ("mistral_instruct", ["▁[", "/", "INST", "]"], ["▁", "1", "2", "3", "4", "▁", "</s>"]),
    ],
)
def test_the_lone_separator_piece_before_a_digit_answer_is_trained(mistral, template, before, after):
    # sentencepiece cannot merge the space after "ASSISTANT:" / "[/INST]" with a digit: it becomes a lone "▁".
    # Official LLaVA masks by token counts up to the role's last token, so that "▁" is a label (checked
    # against LLaVA's own preprocessing in test_llava_parity.py).
    ids, labels = pieces(mistral, template, [("user", "How many?"), ("assistant", "1234")])
    assert ids[-len(before + after) :] == before + after
    assert labels == after


def test_runs_of_spaces_tokenize_as_sentencepiece_does(mistral):
    # LLaVA's slow tokenizer merges "▁▁" last (its score is -1e9): "space  ASSISTANT" keeps "▁ASS".
    ids, _ = pieces(mistral, "vicuna_v1", [("user", "trailing space "), ("assistant", "Yes")])
    assert ids[-9:] == ["▁trailing", "▁space", "▁", "▁ASS", "IST", "ANT", ":", "▁Yes", "</s>"]


def test_a_caption_starting_with_a_space_keeps_sentencepieces_prefix(mistral):
    ids, labels = pieces(mistral, "plain", [("user", "<image>"), ("assistant", " A cat.")], 1)
    assert ids == ["<s>", IMG, "▁", "▁A", "▁cat", ".", "<0x0A>"]
    assert labels == ["▁", "▁A", "▁cat", ".", "<0x0A>"]


def test_the_tokenizer_encodes_as_sentencepiece(mistral, mistral_tokenizer_dir):
    import random

    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_tokenizer_dir / "tokenizer.model"))
    rng = random.Random(0)
    alphabet = list("abcXYZ019 .,:;!?()[]'\"-_/\n\t") + ["  ", "   ", " \n", "猫", "👍", "Ä", "ж"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(2000)]
    differ = [t for t in texts if ids_and_offsets(mistral, t)[0] != [mistral.bos_token_id] + sp.encode(t)]
    assert differ == []


@pytest.fixture(scope="module")
def tiny_tok():
    tok = tiny.build_tokenizer(["What is in the image", "A cat", "What color is it", "Black"])
    tok.add_tokens([IMG], special_tokens=True)
    return tok


@pytest.mark.parametrize(
    "template,expected",
    [
        ("vicuna_v1", ["▁A", "▁cat", ".", "</s>", "▁Black", ".", "</s>"]),
        ("mistral_instruct", ["▁A", "▁cat", ".", "▁", "</s>", "▁Black", ".", "▁", "</s>"]),
    ],
)
def test_labels_with_a_tiny_tokenizer(tiny_tok, template, expected):
    ids, labels = pieces(tiny_tok, template)
    assert labels == expected
    assert ids[0] == "<s>" and ids.count("<s>") == 1 and ids.count(IMG) == 2
    assert ids[ids.index(IMG) + 2 : ids.index(IMG) + 4] == ["▁", "\n"]  # the chunk after the image starts afresh


def test_plain_with_a_tiny_tokenizer(tiny_tok):
    ids, labels = pieces(tiny_tok, "plain", [("user", "<image>"), ("assistant", "A cat")], 1)
    assert ids == ["<s>", IMG, "▁A", "▁cat", "\n"] and labels == ["▁A", "▁cat", "\n"]


@pytest.mark.parametrize(
    "turns,message",
    [
        ([("user", "q")], "the conversation has no assistant turn to train on"),
        (
            [("user", "q"), ("assistant", "a"), ("user", "q2")],
            "the conversation ends with a user turn that has no answer",
        ),
        (
            [("user", "q"), ("user", "q2"), ("assistant", "a")],
            "turn 2 is from 'user'; turns must alternate user, assistant, starting with user",
        ),
    ],
)
def test_malformed_conversations(turns, message):
    with pytest.raises(TemplateError, match=message):
        render("vicuna_v1", turns, "<s>", "</s>")


def test_plain_needs_one_captioned_image():
    with pytest.raises(TemplateError, match="the plain template needs an image"):
        render("plain", [("user", "q"), ("assistant", "a")], "<s>", "</s>")
    with pytest.raises(TemplateError, match="the plain template takes one caption turn, got 2 rounds"):
        render("plain", TURNS, "<s>", "</s>")


def no_bos_tokenizer():
    """A byte-level BPE that adds no BOS (as SmolLM2's and many newer tokenizers), ChatML-like specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["What color is it? red USER ASSISTANT [INST] [/INST]"] * 5,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "mistral_instruct", "llava_llama_2"])
@pytest.mark.parametrize("family", ["mistral", "tiny_bpe", "no_bos"])
def test_the_chat_template_renders_the_training_text_byte_for_byte(template, family, mistral, tiny_tok):
    from qllava.templates import chat_template
    from qllava.tokenizer import adds_bos

    tok = {"mistral": mistral, "tiny_bpe": tiny_tok, "no_bos": no_bos_tokenizer()}[family]
    bos_first = adds_bos(tok)
    assert bos_first == (family != "no_bos")
    turns = TURNS[:2] if template == "plain" else TURNS
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What color is it?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Black."}]},
    ][: len(turns)]
    jinja = chat_template(template, bos_first)
    prefix = tok.bos_token if bos_first else ""
    trained = render(template, turns, tok.bos_token, tok.eos_token)
    assert tok.apply_chat_template(messages, chat_template=jinja, tokenize=False) == prefix + trained.text
    asked = render(template, turns[:-1], tok.bos_token, tok.eos_token, generation_prompt=True)
    assert (
        tok.apply_chat_template(messages[:-1], chat_template=jinja, tokenize=False, add_generation_prompt=True)
        == prefix + asked.text
    )
    # what training tokenizes starts with the BOS exactly when the chat template writes it
    ids, _ = encode(trained, tok, tok.convert_tokens_to_ids(IMG) if IMG in tok.get_vocab() else 0)
    assert (ids[0] == tok.bos_token_id) == bos_first


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "mistral_instruct", "llava_llama_2"])
def test_the_chat_template_takes_a_system_message_as_training_does(template, mistral):
    from qllava.templates import TEMPLATES, chat_template

    turns = TURNS[:2] if template == "plain" else TURNS
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What color is it?"},
        {"role": "assistant", "content": "Black."},
    ][: len(turns)]
    system = "Answer in one word." if TEMPLATES[template].system else None  # others leave it out, as training does
    jinja = chat_template(template, bos_first=True)
    trained = render(template, turns, mistral.bos_token, mistral.eos_token, system=system)
    with_system = [{"role": "system", "content": "Answer in one word."}] + messages
    assert mistral.apply_chat_template(with_system, chat_template=jinja, tokenize=False) == "<s>" + trained.text


@pytest.mark.parametrize("template", ["vicuna_v1", "mistral_instruct", "llava_llama_2"])
@pytest.mark.parametrize(
    "image_only", [[{"type": "image"}], [{"type": "image"}, {"type": "text", "text": " \n"}], "<image>", "<image>\n"]
)
def test_a_message_that_is_only_the_image_is_rendered_as_training_renders_it(template, image_only, mistral):
    """LLaVA trains a human turn that is only the image as the tag alone ("USER: <image> ASSISTANT:"); the chat
    template and a prompt write it so too, with no newline after the image (one token more than training)."""
    from qllava.templates import chat_template

    trained = render(template, [("user", IMG), ("assistant", "A cat.")], mistral.bos_token, mistral.eos_token)
    assert f"{IMG} " in trained.text and f"{IMG}\n" not in trained.text
    messages = [{"role": "user", "content": image_only}, {"role": "assistant", "content": "A cat."}]
    jinja = chat_template(template, bos_first=True)
    assert mistral.apply_chat_template(messages, chat_template=jinja, tokenize=False) == "<s>" + trained.text
    asked = render(template, [("user", IMG + "\n")], mistral.bos_token, mistral.eos_token, generation_prompt=True)
    assert trained.text.startswith(asked.text)
    assert (
        mistral.apply_chat_template(messages[:1], chat_template=jinja, tokenize=False, add_generation_prompt=True)
        == "<s>" + asked.text
    )
    # text after the image, and whitespace-only text without one, are written as before
    with_text = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert "<image>\nHi [/INST]" in mistral.apply_chat_template(
        with_text, chat_template=chat_template("mistral_instruct", bos_first=True), tokenize=False
    )
    assert render(template, [("user", " "), ("assistant", "a")], "<s>", "</s>").text == mistral.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": " "}]}, {"role": "assistant", "content": "a"}],
        chat_template=jinja,
        tokenize=False,
    ).removeprefix("<s>")


def test_llava_v1_6_mistral_is_asked_as_llava_hf_asks_it():
    """llava-hf/llava-v1.6-mistral-7b-hf's chat template, rendered (facts recorded from it): the first turn is asked
    exactly as mistral_instruct asks it; after an answer it writes "A</s> [INST]", where LLaVA's own
    conv_mistral_instruct (c121f043, SeparatorStyle.LLAMA_2), which the parity tests hold qllava to, writes
    "A </s>[INST]". Training and qllava's merged chat template use LLaVA's; only later turns differ."""
    turns = [("user", "<image>\nWhat is shown in this image?"), ("assistant", "A cat."), ("user", "And?")]
    first = render("mistral_instruct", turns[:1], "<s>", "</s>", generation_prompt=True).text
    assert first == "[INST] <image>\nWhat is shown in this image? [/INST]"  # llava-hf's, and its model card's
    ours = render("mistral_instruct", turns, "<s>", "</s>", generation_prompt=True).text
    llava_hf = "[INST] <image>\nWhat is shown in this image? [/INST] A cat.</s> [INST] And? [/INST]"
    assert ours == "[INST] <image>\nWhat is shown in this image? [/INST] A cat. </s>[INST] And? [/INST]"
    assert ours.replace(" </s>[INST]", "</s> [INST]") == llava_hf
