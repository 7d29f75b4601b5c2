"""Template parity with official LLaVA (llava/conversation.py + train.py preprocess_*), token for token.

Expectations are written out by hand from LLaVA's rules: the text around <image> is tokenized on its own
(a "▁" and "<0x0A>" follow the image), only the first BOS stays, and the labels are each assistant message
plus the end token LLaVA appends ("</s>"; "▁" + "</s>" for the LLAMA_2 styles; "\\n" for plain).
"""

import pytest
from transformers import AutoTokenizer

from qllava import tiny
from qllava.data import encode, expand_images
from qllava.templates import TemplateError, render

TURNS = [("user", "<image>\nWhat is in the image?"), ("assistant", "A cat."),
         ("user", "What color is it?"), ("assistant", "Black.")]
IMG = "<image>"


@pytest.fixture(scope="module")
def mistral(mistral_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(mistral_tokenizer_dir)
    tok.add_tokens([IMG], special_tokens=True)
    return tok


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
        "A cat.</s>USER: What color is it? ASSISTANT: Black.</s>")
    assert render("vicuna_v1", TURNS[:1], "<s>", "</s>", generation_prompt=True).text.endswith(
        "USER: <image>\nWhat is in the image? ASSISTANT:")


def test_mistral_instruct_and_llava_llama_2_text_is_llavas():
    assert render("mistral_instruct", TURNS, "<s>", "</s>").text == (
        "[INST] <image>\nWhat is in the image? [/INST] A cat. </s>[INST] What color is it? [/INST] Black. </s>")
    assert render("llava_llama_2", TURNS, "<s>", "</s>").text == (
        "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using natural language.\n"
        "<</SYS>>\n\n<image>\nWhat is in the image? [/INST] A cat. </s><s>[INST] What color is it? [/INST] Black. </s>")
    assert render("mistral_instruct", TURNS[:1], "<s>", "</s>", generation_prompt=True).text.endswith("[/INST]")


def test_plain_keeps_only_image_and_caption():
    rendered = render("plain", [("user", "<image>\nDescribe it."), ("assistant", "A cat.")], "<s>", "</s>")
    assert rendered.text == "<image>A cat.\n" and rendered.trained == ((7, 14),)


def test_vicuna_v1_with_the_real_mistral_tokenizer(mistral):
    ids, labels = pieces(mistral, "vicuna_v1")
    system = ["▁A", "▁chat", "▁between", "▁a", "▁curious", "▁user", "▁and", "▁an", "▁artificial", "▁intelligence",
              "▁assistant", ".", "▁The", "▁assistant", "▁gives", "▁helpful", ",", "▁detailed", ",", "▁and", "▁polite",
              "▁answers", "▁to", "▁the", "▁user", "'", "s", "▁questions", "."]
    assert ids == ["<s>", *system, "▁US", "ER", ":", "▁", IMG, IMG, "▁", "<0x0A>", "What", "▁is", "▁in", "▁the",
                   "▁image", "?", "▁ASS", "IST", "ANT", ":", "▁A", "▁cat", ".", "</s>",
                   "▁US", "ER", ":", "▁What", "▁color", "▁is", "▁it", "?", "▁ASS", "IST", "ANT", ":", "▁Black", ".", "</s>"]
    assert labels == ["▁A", "▁cat", ".", "</s>", "▁Black", ".", "</s>"]


def test_mistral_instruct_with_the_real_mistral_tokenizer(mistral):
    ids, labels = pieces(mistral, "mistral_instruct")
    assert ids == ["<s>", "▁[", "INST", "]", "▁", IMG, IMG, "▁", "<0x0A>", "What", "▁is", "▁in", "▁the", "▁image", "?",
                   "▁[", "/", "INST", "]", "▁A", "▁cat", ".", "▁", "</s>",
                   "▁[", "INST", "]", "▁What", "▁color", "▁is", "▁it", "?", "▁[", "/", "INST", "]", "▁Black", ".", "▁",
                   "</s>"]
    assert labels == ["▁A", "▁cat", ".", "▁", "</s>", "▁Black", ".", "▁", "</s>"]


def test_llava_llama_2_second_round_starts_with_bos(mistral):
    ids, labels = pieces(mistral, "llava_llama_2")
    assert ids[:8] == ["<s>", "▁[", "INST", "]", "▁<<", "SYS", ">>", "<0x0A>"]
    first_answer = ids.index("▁A")
    assert ids[first_answer:first_answer + 10] == ["▁A", "▁cat", ".", "▁", "</s>", "<s>", "▁[", "INST", "]", "▁What"]
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


@pytest.fixture(scope="module")
def tiny_tok():
    tok = tiny.build_tokenizer(["What is in the image", "A cat", "What color is it", "Black"])
    tok.add_tokens([IMG], special_tokens=True)
    return tok


@pytest.mark.parametrize("template,expected", [
    ("vicuna_v1", ["▁A", "▁cat", ".", "</s>", "▁Black", ".", "</s>"]),
    ("mistral_instruct", ["▁A", "▁cat", ".", "▁", "</s>", "▁Black", ".", "▁", "</s>"]),
])
def test_labels_with_a_tiny_tokenizer(tiny_tok, template, expected):
    ids, labels = pieces(tiny_tok, template)
    assert labels == expected
    assert ids[0] == "<s>" and ids.count("<s>") == 1 and ids.count(IMG) == 2
    assert ids[ids.index(IMG) + 2:ids.index(IMG) + 4] == ["▁", "\n"]  # the chunk after the image starts afresh


def test_plain_with_a_tiny_tokenizer(tiny_tok):
    ids, labels = pieces(tiny_tok, "plain", [("user", "<image>"), ("assistant", "A cat")], 1)
    assert ids == ["<s>", IMG, "▁A", "▁cat", "\n"] and labels == ["▁A", "▁cat", "\n"]


@pytest.mark.parametrize("turns,message", [
    ([("user", "q")], "the conversation has no assistant turn to train on"),
    ([("user", "q"), ("assistant", "a"), ("user", "q2")], "the conversation ends with a user turn that has no answer"),
    ([("user", "q"), ("user", "q2"), ("assistant", "a")],
     "turn 2 is from 'user'; turns must alternate user, assistant, starting with user"),
])
def test_malformed_conversations(turns, message):
    with pytest.raises(TemplateError, match=message):
        render("vicuna_v1", turns, "<s>", "</s>")


def test_plain_needs_one_captioned_image():
    with pytest.raises(TemplateError, match="the plain template needs an image"):
        render("plain", [("user", "q"), ("assistant", "a")], "<s>", "</s>")
    with pytest.raises(TemplateError, match="the plain template takes one caption turn, got 2 rounds"):
        render("plain", TURNS, "<s>", "</s>")
