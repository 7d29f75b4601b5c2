"""`qllava plan`: will a recipe fit the card? Exact parameter counts and a peak-memory estimate per stage.

The model is built on the meta device from the recipe's configs (no weights; the shipped recipes' configs
come with qllava, so they plan offline) and counted per part. Peak memory during a training step is the sum
of what stays resident (4-bit decoder linears, the rest of the base in its dtype, trainable weights with
their gradients and optimizer states) and what a micro-batch of T tokens adds (saved activations, one
layer's recomputation, the LM head's tile of logits and the hidden states' float32 gradient, the vision tower's
forward). `qllava plan --trace` (trace.py) runs the real step on fake tensors; benchmarks/plan_accuracy.py holds this
sum to it. The CUDA
context is counted apart: torch's peak-allocated figure does not include it, the card's memory does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from . import model as modeling
from .recipe import Recipe
from .vision import output_size, tower_tokens

GIB = 2**30
MIB = 2**20
# What a card adds to the tensors a training step holds (the trace adds the same; its ALLOWANCE_SOURCES say why).
CUDA_CONTEXT = 1.0 * GIB
CUBLAS_WORKSPACE = 2 * 32 * MIB
FRAGMENTATION = 0.05
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_BYTES = {"adamw_torch": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}  # per trainable parameter
# TRL's fused LM head never holds the logits: it scores tiles of HEAD_TILE_TOKENS positions x HEAD_TILE_VOCAB
# vocabulary entries in one reused compute-dtype buffer, and accumulates the hidden states' gradient in float32.
HEAD_TILE_TOKENS, HEAD_TILE_VOCAB = 4096, 32768


@dataclass
class Counts:
    """Parameters of each part of the model a recipe builds (vocabulary grown for the image token)."""

    vision_tower: int
    projector: int
    decoder_linear: int
    """The linear layers of the decoder's blocks: what is quantized to 4-bit."""
    embeddings: int
    """Input embeddings and lm_head (once when they are tied, as SmolLM2's are)."""
    decoder_other: int
    """Norms and any other decoder parameter."""
    lora: int
    modules_to_save: int
    largest_linear: int
    """The biggest single quantized weight (dequantized in full during its backward)."""


def count_parameters(recipe: Recipe) -> Counts:
    config = modeling.load_llava_config(recipe.model)
    text = config.text_config
    if not recipe.model.llava:  # qllava adds the image token (and grows to a multiple of 64), as training does
        text.vocab_size = math.ceil((text.vocab_size + 1) / 64) * 64
    with torch.device("meta"):
        model = modeling.llava_class(config)(config)
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in modeling.projector_parameters(model).values())
    embedding, head = model.get_input_embeddings().weight, model.lm_head.weight
    embeddings = embedding.numel() + (0 if head is embedding else head.numel())
    linear, largest, lora, other = 0, 0, 0, 0
    targets = re.compile(rf".*\.({'|'.join(recipe.lora.target_modules)})$")
    for name, module in model.model.language_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.weight.numel()
            largest = max(largest, module.weight.numel())
            if targets.match("." + name):
                lora += recipe.lora.r * (module.in_features + module.out_features)
    other = (
        sum(p.numel() for p in model.model.language_model.parameters())
        - linear
        - model.get_input_embeddings().weight.numel()
    )
    saved = sum(
        model.get_input_embeddings().weight.numel()
        if m == "embed_tokens"
        else model.lm_head.weight.numel()
        if m == "lm_head"
        else 0
        for m in recipe.lora.modules_to_save
    )
    return Counts(vision, projector, linear, embeddings, other, lora, saved, largest)


def estimate(recipe: Recipe, stage: str, counts: Counts, tokens: int | None = None) -> dict:
    """Peak GPU memory (bytes, per component) of one training step of `stage` with micro-batches of `tokens`."""
    cfg = getattr(recipe, stage)
    config = modeling.load_llava_config(recipe.model)
    text, vision = config.text_config, config.vision_config
    tokens = tokens or cfg.per_device_train_batch_size * cfg.max_seq_len
    dtype = DTYPE_BYTES[recipe.model.dtype]
    q = recipe.quantization
    # NF4: 4 bits a weight + one absmax per 64 weights (8-bit with double quantization, plus a float32
    # constant per 256 blocks; float32 without it).
    per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if q.bnb_4bit_use_double_quant else 4 / 64) if q.load_in_4bit else dtype
    trainable = counts.projector + (counts.lora + counts.modules_to_save if stage == "stage2" else 0)
    frozen_embeddings = counts.embeddings - (counts.modules_to_save if stage == "stage2" else 0)
    kv = text.hidden_size // text.num_attention_heads * getattr(text, "num_key_value_heads", text.num_attention_heads)
    # What one decoder layer keeps per token for its backward: block input, attention in/outs, q/k/v, MLP
    # input, gate, up, activation and product (bf16).
    layer_per_token = (7 * text.hidden_size + 4 * text.intermediate_size + 3 * kv) * dtype
    if cfg.gradient_checkpointing:
        activations = text.num_hidden_layers * tokens * text.hidden_size * dtype
        recompute = tokens * layer_per_token + counts.largest_linear * dtype
    else:
        activations = text.num_hidden_layers * tokens * layer_per_token
        recompute = counts.largest_linear * dtype
    image_processor = modeling.build_image_processor(recipe.model)
    geometry = modeling.image_geometry(config, image_processor)
    # As many of the largest images as a micro-batch holds (with a little text each), every tile through the tower.
    images = math.ceil(tokens / (geometry.tokens_of() + 64))
    vision_tokens = geometry.tiles_of() * tower_tokens(
        vision, *output_size(image_processor), config.vision_feature_layer
    )
    parts = {
        "decoder_4bit" if q.load_in_4bit else "decoder_linear": counts.decoder_linear * per_weight,
        "frozen_base": (counts.vision_tower + frozen_embeddings + counts.decoder_other) * dtype,
        "trainable_weights_grads": trainable * 8,  # float32 weights and float32 gradients
        "optimizer_states": trainable * OPTIMIZER_BYTES[cfg.optim],
        "activations": activations,
        "layer_recompute": recompute,
        "logits": min(tokens, HEAD_TILE_TOKENS) * HEAD_TILE_VOCAB * dtype + tokens * text.hidden_size * (4 + dtype),
        "vision_forward": images * vision_tokens * vision.hidden_size * dtype * 8,
    }
    return {
        "stage": stage,
        "tokens_per_micro_batch": tokens,
        "parts": parts,
        "trainable_params": trainable,
        "peak_bytes": sum(parts.values()),
        "largest_image_tokens": geometry.tokens_of(),
        "largest_image_fits": geometry.tokens_of() + 2 <= cfg.max_seq_len,
    }


def card_allowances(peak_bytes: float) -> dict[str, int]:
    """What a card needs beside a step's tensors: the CUDA context, cuBLAS's workspaces, the caching allocator's
    fragmentation (a share of the peak)."""
    return {
        "cuda_context": int(CUDA_CONTEXT),
        "cublas_workspace": CUBLAS_WORKSPACE,
        "fragmentation": int(FRAGMENTATION * peak_bytes),
    }


def plan(recipe: Recipe, gpu_memory_gib: float = 24.0, stages=("stage1", "stage2")) -> dict:
    counts = count_parameters(recipe)
    # the tensors' budget: what the card holds less the fixed allowances, less fragmentation's share of the peak
    budget = (gpu_memory_gib * GIB - CUDA_CONTEXT - CUBLAS_WORKSPACE) / (1 + FRAGMENTATION)
    result = {
        "recipe": recipe.source,
        "gpu_memory_gib": gpu_memory_gib,
        "counts": counts.__dict__,
        "lora_params": counts.lora,
        "projector_params": counts.projector,
        "stages": {},
    }
    for stage in stages:
        est = estimate(recipe, stage, counts)
        tokens = est["tokens_per_micro_batch"]
        per_token = (estimate(recipe, stage, counts, tokens + 1024)["peak_bytes"] - est["peak_bytes"]) / 1024
        fixed = est["peak_bytes"] - per_token * tokens
        max_tokens = int((budget - fixed) / per_token) if budget > fixed else 0
        allowances = card_allowances(est["peak_bytes"])
        with_allowances = est["peak_bytes"] + sum(allowances.values())
        est.update(
            peak_gib=est["peak_bytes"] / GIB,
            allowances_bytes=allowances,
            with_allowances_gib=with_allowances / GIB,
            fits=est["peak_bytes"] <= budget,
            headroom_gib=gpu_memory_gib - with_allowances / GIB,
            max_tokens_per_micro_batch=max_tokens,
        )
        result["stages"][stage] = est
        result[f"{stage}_peak_gib"] = round(est["peak_gib"], 3)
    return result
