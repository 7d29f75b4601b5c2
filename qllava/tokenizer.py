"""The decoder's tokenizer, made to tokenize exactly as official LLaVA's does.

LLaVA tokenizes with the slow, sentencepiece LlamaTokenizer (`use_fast=False`). transformers 5 has no slow
Llama tokenizer: it converts a `tokenizer.model` into a BPE `tokenizers` pipeline, which differs from
sentencepiece in two ways, both found by running LLaVA's own preprocessing on adversarial text:
- Merge priority. sentencepiece merges the pair whose merged piece scores highest; the conversion ranks
  merges by vocabulary id, and the whitespace-only pieces ("▁▁", score -1e9) have low ids, so they merge
  first: "space  ASSISTANT" became "▁▁" "ASS" instead of LLaVA's "▁" "▁ASS". `load_tokenizer` re-ranks the
  merges by score (transformers 4 did so; checkpoints that ship such a tokenizer.json are unchanged).
- The dummy prefix. sentencepiece puts "▁" before every text it encodes; the Metaspace pre-tokenizer skips
  it when the text already starts with a space: " A cat." became "▁A" instead of "▁" "▁A".
  `ids_and_offsets` gives such a text the space the pre-tokenizer would otherwise drop.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import Metaspace
from transformers import AutoTokenizer

IMAGE_TOKEN = "<image>"


def load_tokenizer(name: str):
    """The decoder's tokenizer (hub id or folder) with an image token and a pad token, merging as
    sentencepiece does when it came from a sentencepiece model."""
    tokenizer = with_sentencepiece_merges(AutoTokenizer.from_pretrained(name))
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return with_pad_token(tokenizer, may_add=True)


def with_pad_token(tokenizer, may_add: bool = False):
    """The tokenizer with a pad token: its own, else <unk> (as LLaVA pads), else a new "<pad>" when the model's
    vocabulary may still grow (`may_add`), else its end token. Padded positions never reach the loss or attention."""
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif may_add:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token before a text (LLaMA, Mistral: yes; many newer ones: no)."""
    ids = tokenizer("x")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def with_sentencepiece_merges(tokenizer):
    """The tokenizer with its BPE merges ranked by the sentencepiece model's piece scores (unchanged when it
    has no sentencepiece BPE model, or its merges are ranked so already)."""
    pieces = sentencepiece_scores(tokenizer)
    if not pieces:
        return tokenizer
    from transformers.tokenization_utils_base import generate_merges

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    merges = [list(m) for m in generate_merges(vocab, {p: s for p, s in pieces.items() if p in vocab})]
    if [list(m) if isinstance(m, (list, tuple)) else m.split(" ") for m in state["model"]["merges"]] != merges:
        state["model"]["merges"] = merges
        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    return tokenizer


def sentencepiece_scores(tokenizer) -> dict[str, float]:
    """piece -> score of the tokenizer's sentencepiece BPE model; {} when it has none."""
    path = Path(str(getattr(tokenizer, "vocab_file", "") or ""))
    if path.suffix != ".model" or not path.is_file() or not isinstance(tokenizer.backend_tokenizer.model, BPE):
        return {}
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        return {}
    return {p.piece: p.score for p in proto.pieces}


def ids_and_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of one text (the tokenizer's BOS included) and each token's character span in it.

    A sentencepiece tokenizer always adds its "▁" before the text, even one that starts with a space; the
    converted pipeline does not, so such a text is given one more space, and the spans are shifted back. That
    "▁" gets the span of the text's first character, as the pipeline gives its own prefix.
    """
    if not (text.startswith(" ") and _prepends_space(tokenizer)):
        enc = tokenizer(text, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    enc = tokenizer(" " + text, return_offsets_mapping=True)
    spans = [(max(a - 1, 0), max(b - 1, 1)) if b > a else (a, b) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], spans


def _prepends_space(tokenizer) -> bool:
    """Whether the tokenizer adds sentencepiece's dummy prefix (a Metaspace that prepends, no splitting)."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    return isinstance(pre, Metaspace) and pre.prepend_scheme != "never" and not pre.split
