"""`qllava export --gguf`: a run or a merged folder -> the two GGUF files llama.cpp runs (and the tools built on it:
Ollama, LM Studio, llama-cpp-python): the text model with its tokenizer and the chat template it was trained with,
and `mmproj-NAME-TYPE.gguf`, the vision tower and projector in the layout and metadata llama.cpp's clip/mtmd reads.

A run is merged on the fly by `qllava merge`'s stream (base + projector + LoRA, computed in float32, one weight at a
time, nothing written but the GGUF files); a merged folder is read weight by weight. Everything that can refuse the
model is checked before a file is written: stage 2 finished, a decoder, tower, projector and tokenizer llama.cpp
runs, every weight placed, the output folder, the `gguf` package and, for the types qllava does not write itself,
llama.cpp's llama-quantize. The files are written to OUT_DIR.partial, which is renamed to OUT_DIR at the end.

llama.cpp's names and keys were read from its source (tools/mtmd/clip-impl.h, clip.cpp, src/llama-vocab.cpp);
the tests run llama.cpp's own binaries on exported files. Where llama.cpp computes something else than
transformers does, docs/merge-export.md says what and by how much.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, merge, templates, vision
from . import model as modeling
from .inference import QLLAVA_FILE
from .recipe import load_recipe
from .run import RunFolder
from .tokenizer import adds_bos

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
# Types llama-quantize makes from a file qllava writes in the weights' own precision.
QUANTIZED_BY_LLAMA_CPP = {"q4_k_m": "Q4_K_M"}
INSTALL_GGUF = "pip install 'gguf>=0.19'"
GET_LLAMA_QUANTIZE = (
    "install llama.cpp (a release from https://github.com/ggml-org/llama.cpp/releases, `brew install "
    "llama.cpp`, or `cmake -B build && cmake --build build --target llama-quantize` in its source) "
    "and put llama-quantize on PATH"
)
MEDIA_MARKER = "<__media__>"  # what llama-mtmd-cli replaces with an image's embeddings
# llama.cpp pads a non-square image with this colour for the `mlp` projector (clip.cpp), whatever the image mean.
LLAMA_CPP_PAD_COLOR = (122, 116, 104)


class ExportError(ValueError):
    """A model, tokenizer or setting llama.cpp cannot run as trained, or a missing tool; the message names it."""


def export_gguf(
    source_path: str | Path, out_dir: str | Path, gguf_type: str = "f16", overwrite: bool = False, say=print
) -> dict:
    """Write the text GGUF and the mmproj GGUF of a run or merged folder into out_dir; return what was written
    (files and their sizes, the command to try them, notes on what llama.cpp does differently)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists: pass --overwrite to replace it, or choose another --gguf folder")
    quantizer = llama_quantize() if gguf_type in QUANTIZED_BY_LLAMA_CPP else None
    gguf = import_gguf()
    source = load_source(source_path)
    text_file, mmproj_file = gguf_names(source.name, gguf_type)
    text = plan_text(source, gguf, gguf_type)
    mmproj = plan_mmproj(source, gguf, gguf_type)

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        if quantizer:
            unquantized = partial / text_file.replace(gguf_type.upper(), text.file_type_name)
            write_gguf(unquantized, text, source, say)
            say(f"llama-quantize {unquantized.name} -> {text_file} ({QUANTIZED_BY_LLAMA_CPP[gguf_type]})")
            quantize(quantizer, unquantized, partial / text_file, QUANTIZED_BY_LLAMA_CPP[gguf_type])
            unquantized.unlink()
        else:
            write_gguf(partial / text_file, text, source, say)
        write_gguf(partial / mmproj_file, mmproj, source, say)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written is left beside OUT_DIR
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    files = [(out_dir / name, (out_dir / name).stat().st_size) for name in (text_file, mmproj_file)]
    return {
        "files": files,
        "command": try_command(out_dir / text_file, out_dir / mmproj_file),
        "notes": llama_cpp_differences(source),
        "seconds": round(time.perf_counter() - started, 1),
    }


def gguf_names(name: str, gguf_type: str) -> tuple[str, str]:
    """File names llama.cpp's tools and LM Studio pair up: NAME-TYPE.gguf and mmproj-NAME-TYPE.gguf (the
    projector is F16 unless the type is f32, as llama.cpp's own converters write it)."""
    return f"{name}-{gguf_type.upper()}.gguf", f"mmproj-{name}-{'F32' if gguf_type == 'f32' else 'F16'}.gguf"


def try_command(text_file: Path, mmproj_file: Path) -> str:
    """The llama-mtmd-cli command that answers a question about an image greedily, as `qllava chat` does, with the
    chat template the file carries (--jinja: without it llama-mtmd-cli guesses a built-in template)."""
    return (
        f"llama-mtmd-cli -m {shlex.quote(str(text_file))} --mmproj {shlex.quote(str(mmproj_file))} --jinja "
        "--temp 0 --image IMAGE.jpg -p 'What is in the image?'"
    )


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError(
            f"qllava export writes GGUF files with the `gguf` package, which is not installed: {INSTALL_GGUF}"
        ) from None
    return gguf


def llama_quantize() -> str:
    path = shutil.which("llama-quantize")
    if path is None:
        raise ExportError(
            f"--type q4_k_m is made by llama.cpp's llama-quantize, which is not on PATH: "
            f"{GET_LLAMA_QUANTIZE}; or export --type f16 (or q8_0) now and quantize that file later"
        )
    return path


def quantize(tool: str, source: Path, out: Path, llama_type: str) -> None:
    done = subprocess.run([tool, str(source), str(out), llama_type], capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise ExportError(f"llama-quantize {llama_type} failed (exit status {done.returncode}): {lines[-1]}")


# ---------------------------------------------------------------------------------------------------------------
# The model to export: a run (merged on the fly) or a merged folder.


@dataclass
class Source:
    path: Path
    config: object
    """The LLaVA (or LLaVA-NeXT) config."""
    processor: object
    template: str | None
    """The LLaVA template it was trained with; None for a folder qllava did not write (its chat template is used)."""
    aspect_ratio: str
    shapes: dict[str, tuple]
    """Every weight of the model (its state-dict names) and its shape."""
    keys: list[str]
    """The weights stored (a tied output embedding is the input embedding: not stored twice)."""
    read: Callable[[str], torch.Tensor]
    dtype: str
    """The precision the weights were trained or merged in (the file llama-quantize reads is written in it)."""

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def load_source(path: str | Path) -> Source:
    path = Path(path)
    if RunFolder.holds_run(path):
        return _run_source(path)
    if (path / "config.json").exists():
        return _merged_source(path)
    raise FileNotFoundError(
        f"{path} is neither a qllava run folder (stage1/, stage2/) nor a merged folder (config.json)"
    )


def _run_source(path: Path) -> Source:
    """A run's final stage, merged as `qllava merge --dtype float32` merges it, one weight at a time."""
    stage_dir = RunFolder(path).final_stage()  # an unfinished stage is refused here, saying how to finish it
    if stage_dir.name != "stage2":
        raise ExportError(
            f"{path}: stage 2 has not run (only {stage_dir} is complete): the chat model is made by "
            "stage 2; train it with `qllava finetune RECIPE --stage 2`, then export"
        )
    recipe = load_recipe(stage_dir / "recipe.toml")
    check_model(modeling.load_llava_config(recipe.model))
    modeling.check_base(stage_dir, recipe.model)
    processor = modeling.stage_processor(stage_dir, recipe.model)
    model, weights = merge.merged_weights(recipe, processor, stage_dir, "float32")
    return Source(
        path,
        model.config,
        processor,
        recipe.stage2.template,
        recipe.stage2.image_aspect_ratio,
        _shapes(model),
        list(checkpoint.saved_names(model)),
        weights.weight,
        recipe.model.dtype,
    )


def _merged_source(path: Path) -> Source:
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in modeling.LLAVA_CLASSES:
        raise ExportError(
            f"{path}/config.json: a {config.model_type!r} model; qllava export writes LLaVA (llava) "
            "and LLaVA-NeXT (llava_next) checkpoints"
        )
    check_model(config)
    info = json.loads((path / QLLAVA_FILE).read_text()) if (path / QLLAVA_FILE).exists() else {}
    if info.get("template") == "plain":
        raise ExportError(
            f"{path}: trained with the `plain` template (stage 1 only): it has no chat format to run "
            "in llama.cpp; export a model trained through stage 2"
        )
    with torch.device("meta"):
        model = modeling.llava_class(config)(config)
    sources = checkpoint.module_sources(model, checkpoint.Files(path), lambda key: key)
    stored = list(checkpoint.saved_names(model))
    missing = [key for key in stored if key not in sources]
    if missing:
        raise ExportError(
            f"{path}: {len(missing)} weights of the model are in none of its safetensors files (e.g. {missing[0]})"
        )
    dtype = str(getattr(config, "dtype", None) or getattr(config.text_config, "dtype", None) or "float32")
    return Source(
        path,
        config,
        AutoProcessor.from_pretrained(path),
        info.get("template"),
        info.get("image_aspect_ratio", "pad"),
        _shapes(model),
        stored,
        lambda key: sources[key].read(),
        dtype.removeprefix("torch."),
    )


def _shapes(model) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# What llama.cpp can run.

TEXT_ARCHITECTURES = ("llama", "mistral")  # both are llama.cpp's `llama` architecture
TOWERS = ("clip_vision_model", "siglip_vision_model")
# Tower activation -> clip.use_gelu (llama.cpp's GELU is the tanh approximation; without the key, quick GELU).
TOWER_ACTIVATIONS = {"quick_gelu": False, "gelu_pytorch_tanh": True, "gelu": True}


def check_model(config) -> None:
    """Refuse (ExportError), from the config alone, a model llama.cpp cannot run as it was trained."""
    text, tower = config.text_config, config.vision_config
    if text.model_type not in TEXT_ARCHITECTURES:
        raise ExportError(
            f"decoder architecture {text.model_type!r}: qllava export writes llama.cpp's `llama` "
            "architecture, which runs LLaMA and Mistral decoders"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(text, flag, False):
            raise ExportError(f"decoder: {flag} is set; qllava export writes LLaMA/Mistral decoders without biases")
    rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(
            f"decoder: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not exported "
            "(qllava export writes plain RoPE)"
        )
    _check_tower(tower, config)
    if getattr(config, "projector_hidden_act", "gelu") != "gelu" or not getattr(
        config, "multimodal_projector_bias", True
    ):
        raise ExportError(
            f"projector: {config.projector_hidden_act} activation"
            f"{'' if getattr(config, 'multimodal_projector_bias', True) else ', no biases'}; llama.cpp's "
            "`mlp` projector is LLaVA's: linear, GELU, linear, with biases"
        )


def _check_tower(tower, config) -> None:
    if tower.model_type == "dinov2":
        raise ExportError(
            "vision tower DINOv2: llama.cpp's LLaVA graph (tools/mtmd, `mlp` projector) has no layer "
            "scale and does not interpolate position embeddings, which DINOv2 needs; export a model "
            "with a CLIP or SigLIP tower"
        )
    if tower.model_type not in TOWERS:
        raise ExportError(f"vision tower {tower.model_type!r}: llama.cpp's LLaVA graph runs CLIP and SigLIP towers")
    if tower.hidden_act not in TOWER_ACTIVATIONS:
        raise ExportError(f"vision tower: activation {tower.hidden_act!r}; llama.cpp's clip has quick GELU and GELU")
    if tower.intermediate_size == tower.hidden_size:
        raise ExportError(
            "vision tower: intermediate_size equals hidden_size, which llama.cpp (release 11434) takes "
            "for an old converter's swapped feed-forward weights and swaps them back"
        )
    has_cls = tower.model_type == "clip_vision_model"
    if (config.vision_feature_select_strategy == "default") != has_cls:
        raise ExportError(
            f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} with a "
            f"{tower.model_type} tower: llama.cpp drops the first feature exactly when the tower has a "
            'class token (CLIP: "default"; SigLIP: "full")'
        )
    layers = feature_layers(config)
    if layers != sorted(layers) or not all(0 <= layer <= tower.num_hidden_layers for layer in layers):
        raise ExportError(
            f"vision_feature_layer {config.vision_feature_layer}: llama.cpp stacks feature layers in "
            "increasing order, within the tower's layers"
        )


def feature_layers(config) -> list[int]:
    """The tower layers LLaVA takes its features from, as indices into the hidden states (0: the embeddings)."""
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    total = config.vision_config.num_hidden_layers
    return [layer if layer >= 0 else total + 1 + layer for layer in layers]


def llama_cpp_differences(source: Source) -> list[str]:
    """What llama.cpp (release 11434) computes differently from transformers for this model."""
    config, notes = source.config, []
    if config.vision_config.model_type == "clip_vision_model":
        notes.append(
            "llama.cpp (release 11434) puts CLIP's class token after the patches instead of before "
            "(ggml-org/llama.cpp#25814): its image features differ from transformers' (docs/merge-export.md)"
        )
    if config.vision_config.hidden_act == "gelu":
        notes.append("the tower's exact GELU runs as llama.cpp's tanh approximation")
    mean = tuple(int(x * 255) for x in source.processor.image_processor.image_mean)
    if source.aspect_ratio == "pad" and mean != LLAMA_CPP_PAD_COLOR:
        notes.append(
            f"llama.cpp pads non-square images with {LLAMA_CPP_PAD_COLOR}; training padded with the image mean {mean}"
        )
    if source.aspect_ratio == "crop":
        notes.append('trained with image_aspect_ratio "crop"; llama.cpp pads images to a square instead')
    if getattr(config, "image_grid_pinpoints", None):
        notes.append(
            "LLaVA-NeXT: llama.cpp encodes the base view and each tile as separate images, without "
            "unpadding or image_newline, and images no larger than a tile as the base view alone "
            "(docs/merge-export.md)"
        )
    if source.template is None:
        notes.append(f"{source.path} has no {QLLAVA_FILE}: its own chat template is written, as it is")
    return notes


# ---------------------------------------------------------------------------------------------------------------
# What goes into each file: metadata, and each tensor with its name, shape and type.


@dataclass
class Tensor:
    name: str
    """Its name in the GGUF file."""
    key: str
    """The model weight it is read from."""
    shape: tuple
    qtype: object
    """gguf.GGMLQuantizationType"""
    change: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Plan:
    arch: str
    metadata: dict
    tensors: list[Tensor] = field(default_factory=list)
    file_type_name: str = ""
    """The type written, as a file name says it (F16, BF16, F32, Q8_0)."""


TEXT_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TEXT_NAMES = {
    "model.language_model.embed_tokens.weight": "token_embd.weight",
    "model.language_model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def plan_text(source: Source, gguf, gguf_type: str) -> Plan:
    """The text model as llama.cpp's `llama` architecture: weights, hyperparameters, tokenizer, chat template."""
    text = source.config.text_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    rows = source.shapes["model.language_model.embed_tokens.weight"][0]
    stored = _text_type(source, gguf_type)
    plan = Plan("llama", {}, file_type_name=stored)
    for key in source.keys:
        if not key.startswith(("model.language_model.", "lm_head.")):
            continue
        name, change = _text_name(key, heads, kv_heads)
        plan.tensors.append(Tensor(name, key, source.shapes[key], _qtype(gguf, stored, source.shapes[key]), change))
    context = text.max_position_embeddings
    window = getattr(text, "sliding_window", None)  # llama.cpp's llama attends to all: equal up to the window
    rope = dict(getattr(text, "rope_parameters", None) or {})
    plan.metadata = {
        "general.name": source.name,
        "general.file_type": _file_type(gguf, stored),
        "llama.context_length": min(context, window) if window else context,
        "llama.embedding_length": text.hidden_size,
        "llama.block_count": text.num_hidden_layers,
        "llama.feed_forward_length": text.intermediate_size,
        "llama.rope.dimension_count": head_dim,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.attention.layer_norm_rms_epsilon": float(text.rms_norm_eps),
        "llama.rope.freq_base": float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))),
        "llama.vocab_size": rows,
        **(
            {"llama.attention.key_length": head_dim, "llama.attention.value_length": head_dim}
            if head_dim * heads != text.hidden_size
            else {}
        ),
        **tokenizer_metadata(source.tokenizer, rows, gguf),
        "tokenizer.chat_template": gguf_chat_template(source),
    }
    return plan


def _text_type(source: Source, gguf_type: str) -> str:
    if gguf_type in QUANTIZED_BY_LLAMA_CPP:  # llama-quantize reads the weights in their own precision
        return {"float32": "F32", "float16": "F16"}.get(source.dtype, "BF16")
    return gguf_type.upper()


def _text_name(key: str, heads: int, kv_heads: int):
    if key in TEXT_NAMES:
        return TEXT_NAMES[key], None
    match = re.fullmatch(r"model\.language_model\.layers\.(\d+)\.(.+)", key)
    if not match or match.group(2) not in TEXT_LAYER_NAMES:
        raise ExportError(f"decoder weight {key} has no place in llama.cpp's `llama` architecture")
    layer, part = match.groups()
    change = None
    if part == "self_attn.q_proj.weight":
        change = lambda w: rope_interleaved(w, heads)  # noqa: E731
    elif part == "self_attn.k_proj.weight":
        change = lambda w: rope_interleaved(w, kv_heads)  # noqa: E731
    return f"blk.{layer}.{TEXT_LAYER_NAMES[part]}", change


def rope_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A q/k projection's rows from transformers' rotate-half order (each head's first half of dimensions pairs with
    its second half) to the order llama.cpp's `llama` rotates (dimensions paired two by two)."""
    out, inp = weight.shape
    return weight.reshape(heads, 2, out // heads // 2, inp).transpose(1, 2).reshape(out, inp)


VISION_NAMES = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
}
VISION_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}
PROJECTOR_NAMES = {
    "model.multi_modal_projector.linear_1.weight": "mm.0.weight",
    "model.multi_modal_projector.linear_1.bias": "mm.0.bias",
    "model.multi_modal_projector.linear_2.weight": "mm.2.weight",
    "model.multi_modal_projector.linear_2.bias": "mm.2.bias",
    "model.image_newline": "v.image_newline",
}
# Tower weights LLaVA never uses: the final layer norm (features are taken before it) and SigLIP's pooling head.
UNUSED_TOWER_WEIGHTS = ("post_layernorm.", "head.")


def plan_mmproj(source: Source, gguf, gguf_type: str) -> Plan:
    """The vision tower (up to the feature layer LLaVA reads) and the projector, in clip's `mlp` layout."""
    config, tower = source.config, source.config.vision_config
    layers = feature_layers(config)
    stored = "F32" if gguf_type == "f32" else "F16"
    plan = Plan("clip", {}, file_type_name=stored)
    for key in source.keys:
        name = _vision_name(key, max(layers))
        if name:
            shape = source.shapes[key]
            plan.tensors.append(Tensor(name, key, shape, _qtype(gguf, stored, shape)))
    image_processor = source.processor.image_processor
    height, width = vision.output_size(image_processor)
    if height != width or height != tower.image_size:
        raise ExportError(
            f"image processor: its images are {width}x{height} px, the vision tower's "
            f"{tower.image_size} px square; llama.cpp resizes every image to the tower's size"
        )
    plan.metadata = {
        "general.name": source.name,
        "general.type": "mmproj",
        "general.file_type": _file_type(gguf, stored),
        "clip.has_vision_encoder": True,
        "clip.projector_type": "mlp",
        "clip.use_gelu": TOWER_ACTIVATIONS[tower.hidden_act],
        "clip.vision.image_size": tower.image_size,
        "clip.vision.patch_size": tower.patch_size,
        "clip.vision.embedding_length": tower.hidden_size,
        "clip.vision.feed_forward_length": tower.intermediate_size,
        "clip.vision.block_count": max(layers),
        "clip.vision.attention.head_count": tower.num_attention_heads,
        "clip.vision.attention.layer_norm_epsilon": float(tower.layer_norm_eps),
        "clip.vision.projection_dim": config.text_config.hidden_size,
        "clip.vision.image_mean": [float(x) for x in image_processor.image_mean],
        "clip.vision.image_std": [float(x) for x in image_processor.image_std],
        # Written explicitly: without it llama.cpp skips the last of the layers written (ggml-org/llama.cpp#25817).
        "clip.vision.feature_layer": layers,
    }
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if pinpoints:  # transformers lists (height, width); llama.cpp reads (width, height) pairs
        plan.metadata["clip.vision.image_grid_pinpoints"] = [side for h, w in pinpoints for side in (w, h)]
        plan.metadata["clip.vision.mm_patch_merge_type"] = "spatial_unpad"
    return plan


def _vision_name(key: str, last_layer: int) -> str | None:
    """The clip name of a tower or projector weight; None for the decoder's weights and tower weights LLaVA does not
    use (layers past the feature layer, the final norm, SigLIP's head)."""
    if key in PROJECTOR_NAMES:
        return PROJECTOR_NAMES[key]
    if key.startswith(("model.language_model.", "lm_head.")):
        return None
    if not key.startswith("model.vision_tower."):
        raise ExportError(f"weight {key} is neither the decoder's, the vision tower's nor the projector's")
    part = key.removeprefix("model.vision_tower.").removeprefix("vision_model.")
    if part.startswith(UNUSED_TOWER_WEIGHTS):
        return None
    if part in VISION_NAMES:
        return VISION_NAMES[part]
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", part)
    if not match or match.group(2) not in VISION_LAYER_NAMES:
        raise ExportError(f"vision tower weight {key} has no place in llama.cpp's clip")
    layer, module, kind = match.groups()
    return f"v.blk.{layer}.{VISION_LAYER_NAMES[module]}.{kind}" if int(layer) < last_layer else None


def _qtype(gguf, stored: str, shape: tuple):
    """A weight matrix in the file's type; vectors (norms, biases, the class embedding) in F32, as llama.cpp keeps
    them; a Q8_0 matrix whose rows are no multiple of its 32-value blocks in F16."""
    types = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return types.F32
    if stored == "Q8_0" and shape[-1] % 32:
        return types.F16
    return types[stored]


def _file_type(gguf, stored: str) -> int:
    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}
    return int(gguf.LlamaFileType[names[stored]])


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer and the chat template, as llama.cpp reads them.

# Byte-level pre-tokenizers (tokenizer.json) and the llama.cpp pre-tokenizer that splits text the same way.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL_PRE = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
}


def tokenizer_metadata(tokenizer, rows: int, gguf) -> dict:
    """tokenizer.ggml.* for a BPE tokenizer: sentencepiece-style (LLaMA, Mistral, the tiny demo's: llama.cpp's
    `llama` tokenizer, its merges as scores) or byte-level (SmolLM2: `gpt2`, with the pre-tokenizer that splits
    text as this tokenizer does). The vocabulary is padded to the embedding's rows, as llama.cpp requires."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise ExportError(
            f"tokenizer: a {state['model']['type']} model; qllava export writes BPE tokenizers "
            "(sentencepiece-style or byte-level)"
        )
    vocab = tokenizer.get_vocab()
    if len(vocab) > rows:
        raise ExportError(f"tokenizer: {len(vocab)} tokens for {rows} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(rows)]
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    byte_level = _byte_level_pre(state)
    out = {
        "tokenizer.ggml.model": "gpt2" if byte_level else "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": _token_types(tokenizer, tokens, vocab, gguf),
    }
    if byte_level:
        out.update({"tokenizer.ggml.pre": byte_level, "tokenizer.ggml.merges": merges})
    else:
        out.update(
            {
                "tokenizer.ggml.scores": _merge_scores(tokens, merges),
                "tokenizer.ggml.add_space_prefix": _metaspace_prefix(state),
            }
        )
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unknown": tokenizer.unk_token_id,
        "padding": tokenizer.pad_token_id,
    }
    out.update({f"tokenizer.ggml.{name}_token_id": index for name, index in ids.items() if index is not None})
    out.update({"tokenizer.ggml.add_bos_token": adds_bos(tokenizer), "tokenizer.ggml.add_eos_token": False})
    return out


def _byte_level_pre(state: dict) -> str | None:
    """llama.cpp's pre-tokenizer for a byte-level BPE; None for a sentencepiece-style one; refused otherwise."""
    pre = state.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not any(step.get("type") == "ByteLevel" for step in steps):
        if _metaspace_prefix(state) is None:
            raise ExportError(
                f"tokenizer: pre-tokenizer {pre.get('type')} with normalizer "
                f"{(state.get('normalizer') or {}).get('type')}: neither sentencepiece-style (▁ for "
                "spaces) nor byte-level, the two BPE kinds llama.cpp reads"
            )
        return None
    signature = tuple(_pre_step(step) for step in steps)
    if (
        signature not in BYTE_LEVEL_PRE
        or state.get("normalizer")
        or any(step.get("add_prefix_space") for step in steps)
    ):
        raise ExportError(
            f"tokenizer: byte-level pre-tokenizer {signature} is none that qllava export can name for "
            f"llama.cpp ({', '.join(BYTE_LEVEL_PRE.values())})"
        )
    return BYTE_LEVEL_PRE[signature]


def _pre_step(step: dict) -> tuple:
    if step.get("type") == "ByteLevel":
        return "ByteLevel", bool(step.get("use_regex", True))
    if step.get("type") == "Digits":
        return "Digits", bool(step.get("individual_digits"))
    if step.get("type") == "Split":
        return "Split", (step.get("pattern") or {}).get("Regex")
    return (step.get("type"),)


def _metaspace_prefix(state: dict) -> bool | None:
    """Whether a sentencepiece-style tokenizer puts ▁ before a text (sentencepiece's dummy prefix, llama.cpp's
    add_space_prefix); None when the tokenizer does not write spaces as ▁."""
    pre = state.get("pre_tokenizer") or {}
    normalizer = state.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    if any(step.get("type") == "Replace" and step.get("content") == "▁" for step in steps):
        return any(step.get("type") == "Prepend" and step.get("prepend") == "▁" for step in steps)
    return None


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Scores for llama.cpp's sentencepiece tokenizer, which merges the adjacent pair whose result scores highest:
    minus the rank of the merge that makes each token, so that it merges in the order BPE does (a sentencepiece
    vocabulary's merges are ranked by its own scores: qllava.tokenizer)."""
    rank = {}
    for i, merge_ in enumerate(merges):
        rank.setdefault(merge_.replace(" ", ""), i)
    return [-float(rank[token]) if token in rank else 0.0 for token in tokens]


def _token_types(tokenizer, tokens: list[str], vocab: dict, gguf) -> list[int]:
    kinds = gguf.TokenType
    special = set(tokenizer.all_special_ids)
    added = {index for token, index in tokenizer.get_added_vocab().items()}
    types = []
    for index, token in enumerate(tokens):
        if token not in vocab or vocab[token] != index:
            types.append(kinds.UNUSED)
        elif index == tokenizer.unk_token_id:
            types.append(kinds.UNKNOWN)
        elif index in special:
            types.append(kinds.CONTROL)
        elif index in added:
            types.append(kinds.USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types.append(kinds.BYTE)
        else:
            types.append(kinds.NORMAL)
    return [int(kind) for kind in types]


def gguf_chat_template(source: Source) -> str:
    """The chat template of the merged checkpoint, rendering the run's template, with llama.cpp's media markers
    placed as LLaVA places an image (first in the turn, then a line break); a folder qllava did not write keeps its
    own."""
    if source.template is None:
        return source.processor.chat_template or ""
    return templates.chat_template(source.template, adds_bos(source.tokenizer), media_markers=True)


# ---------------------------------------------------------------------------------------------------------------
# Writing: the header first, then one tensor at a time (a 7B model is never held whole).


def write_gguf(path: Path, plan: Plan, source: Source, say) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, plan.arch)
    for key, value in plan.metadata.items():
        _add(writer, gguf, key, value)
    for tensor in plan.tensors:
        byte_shape = (
            gguf.quant_shape_to_byte_shape(tensor.shape, tensor.qtype)
            if tensor.qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            else tensor.shape
        )
        itemsize = {gguf.GGMLQuantizationType.F32: 4, gguf.GGMLQuantizationType.F16: 2}.get(tensor.qtype, 1)
        writer.add_tensor_info(
            tensor.name,
            byte_shape,
            _numpy_dtype(gguf, tensor.qtype),
            int(np.prod(byte_shape)) * itemsize,
            raw_dtype=tensor.qtype,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    say(f"writing {path.name}: {len(plan.tensors)} tensors")
    step = max(1, len(plan.tensors) // 10)
    for i, tensor in enumerate(plan.tensors, 1):
        weight = source.read(tensor.key).float()
        if tensor.change:
            weight = tensor.change(weight)
        writer.write_tensor_data(encode(gguf, weight, tensor.qtype))
        if i % step == 0 and len(plan.tensors) > 50:
            say(f"  {path.name}: {i}/{len(plan.tensors)} tensors")
    writer.close()


def _numpy_dtype(gguf, qtype):
    return {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint8)


def encode(gguf, weight: torch.Tensor, qtype) -> np.ndarray:
    """A float32 weight in a GGUF tensor type: F32 and F16 as numbers, BF16 and Q8_0 as their bytes."""
    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return weight.contiguous().numpy()
    if qtype == types.F16:
        return weight.to(torch.float16).contiguous().numpy()
    if qtype == types.BF16:  # torch rounds to nearest even, as gguf's own converter does
        return weight.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(weight.contiguous().numpy(), qtype)


def _add(writer, gguf, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif value and isinstance(value[0], float):
        writer.add_array(key, [float(v) for v in value])
    else:
        writer.add_array(key, list(value))
