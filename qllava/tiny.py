"""Tiny checkpoints for the demo and the tests: a CLIP vision tower and a Mistral- or LLaMA-family decoder.

They are built from small configs with random weights, written once with save_pretrained, and from then on
loaded through exactly the from_pretrained path a hub checkpoint takes. Widths are >= 64 so bitsandbytes
really quantizes the decoder's linear layers (a 4-bit Linear needs in_features >= its block size of 64).
Sizes come from an experiment on the project's CPU machine (STACK.md): a 128-wide vision tower learns
shape, and CLIP position embeddings re-initialised with std 0.3 make left/right learnable.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PreTrainedTokenizerFast)

from . import templates

VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              image_size=64, patch_size=16, projection_dim=64)
DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2)
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in the LLaMA/Mistral sentencepiece vocabularies
VOCAB_SIZE = 640


def write_vision_tower(path: Path, seed: int, **sizes) -> None:
    """A random CLIP vision tower (VISION sizes, or the given ones) and its image processor."""
    config = CLIPVisionConfig(**{**VISION, **sizes})
    torch.manual_seed(seed)
    model = CLIPVisionModel(config)
    with torch.no_grad():
        model.embeddings.position_embedding.weight.normal_(std=0.3)
    model.save_pretrained(path)
    # As openai/clip-* checkpoints do, the tower ships its image processor (CLIP's mean/std, at its size).
    CLIPImageProcessor(size={"shortest_edge": config.image_size},
                       crop_size={"height": config.image_size, "width": config.image_size}).save_pretrained(path)


def write_decoder(path: Path, family: str, texts: list[str], seed: int, **sizes) -> None:
    """A random decoder (DECODER sizes, or the given ones) plus a BPE tokenizer trained on `texts` and every
    template's fixed strings."""
    tokenizer = build_tokenizer(texts)
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config_cls, model_cls = (MistralConfig, MistralForCausalLM) if family == "mistral" else (LlamaConfig, LlamaForCausalLM)
    model_cls(config_cls(vocab_size=len(tokenizer), **{**DECODER, **sizes})).save_pretrained(path)


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A sentencepiece-like BPE (metaspace, BOS added) so the templates tokenize as they do for LLaMA/Mistral."""
    fixed = [templates.VICUNA_SYSTEM, templates.LLAVA_LLAMA_2_SYSTEM, "USER: ASSISTANT:", "[INST] [/INST]",
             "<<SYS>>\n<</SYS>>\n\n"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = [chr(c) for c in range(33, 127)] + ["\n", "▁"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)
    bpe.train_from_iterator(fixed * 50 + texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
