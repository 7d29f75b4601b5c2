"""Building LLaVA: processor, the model assembled from a vision tower + a decoder (4-bit), LoRA, projector files.

Stage 1 assembles LlavaForConditionalGeneration in memory from two checkpoints: the decoder is loaded by
from_pretrained straight into NF4 (weights are quantized tensor by tensor as they are read, so no
full-precision copy of the 7B decoder is ever written or held; checkpoint files are read, not memory-mapped:
see unmapped_checkpoints), the CLIP vision tower is loaded in the recipe's dtype, and the 2-layer MLP projector
is new (or read from a projector file). A llava-hf checkpoint is loaded whole, with the vision tower, projector
and lm_head kept out of quantization.
Everything is frozen here; train.py decides what learns.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    BitsAndBytesConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from . import vision
from .folders import check_recipe_folders
from .recipe import LoraConfig, ModelConfig, QuantizationConfig, Recipe, load_recipe
from .run import RunFolder
from .tokenizer import IMAGE_TOKEN, load_tokenizer, with_pad_token, with_sentencepiece_merges

PROJECTOR_FILE = "projector.safetensors"
BASE_FILE = "base.json"
# Full module-name prefixes: bitsandbytes silently quantizes a module named by its bare name.
NOT_QUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


class BaseMismatchError(ValueError):
    """The base model a run names is not the one it was trained on."""


def attention_implementation(requested: str, dtype: torch.dtype) -> str:
    """What "auto" means for a model computing in `dtype`: flash_attention_2 when flash-attn is importable, CUDA is
    present and the model computes in bfloat16 or float16 (flash-attn refuses float32 at the first step), else sdpa.
    Any other request is returned as it is."""
    if requested != "auto":
        return requested
    if (
        dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.is_available()
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa"


def device() -> torch.device:
    """This process's device: its own GPU under torchrun (LOCAL_RANK), else GPU 0, else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def build_processor(cfg: ModelConfig) -> LlavaProcessor:
    """Image processor of the vision tower + the decoder's tokenizer with an image token and a pad token."""
    if cfg.llava:
        processor = AutoProcessor.from_pretrained(cfg.llava)
        processor.tokenizer = with_pad_token(with_sentencepiece_merges(processor.tokenizer))
        return processor
    image_processor = build_image_processor(cfg)
    config = load_llava_config(cfg)
    height, width = vision.output_size(image_processor)
    prefix = vision.prefix_tokens(config.vision_config, height, width, cfg.vision_feature_layer)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=load_tokenizer(cfg.decoder),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=prefix,
        image_token=IMAGE_TOKEN,
    )


def build_image_processor(cfg: ModelConfig):
    """The vision tower's image processor (or `image_processor`'s) with the recipe's image settings; for the
    shipped recipes' tower, the copy shipped with qllava when it is not cached (plans work offline)."""
    settings = dict(image_size=cfg.image_size, image_mean=cfg.image_mean, image_std=cfg.image_std)
    source = cfg.image_processor or cfg.llava or cfg.vision_tower
    if source in PACKAGED_PREPROCESSORS and local_folder(source) is None:
        from importlib.resources import files

        import transformers

        packaged = json.loads((files("qllava") / "configs" / PACKAGED_PREPROCESSORS[source]).read_text())
        processor = getattr(transformers, packaged.pop("image_processor_type"))(**packaged)
        return vision.load_image_processor(source, processor=processor, **settings)
    return vision.load_image_processor(cfg.llava or cfg.vision_tower, cfg.image_processor, **settings)


def processor_and_geometry(cfg: ModelConfig):
    """The processor and the image geometry a recipe's model will have, from tokenizer and config files alone."""
    processor = build_processor(cfg)
    return processor, image_geometry(load_llava_config(cfg), processor.image_processor)


def image_geometry(config, image_processor):
    """How many tokens an image becomes, for a LLaVA or LLaVA-NeXT config and its image processor (the vision
    seam's answer)."""
    return vision.image_geometry(config, image_processor)


# Configs of the shipped recipes' checkpoints, so that they can be planned without the hub.
PACKAGED_CONFIGS = {
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral-7b-instruct-v0.2.json",
    "mistralai/Mistral-7B-v0.1": "mistral-7b-v0.1.json",
    "lmsys/vicuna-7b-v1.5": "vicuna-7b-v1.5.json",
    "openai/clip-vit-large-patch14-336": "clip-vit-large-patch14-336.json",
    "llava-hf/llava-v1.6-mistral-7b-hf": "llava-v1.6-mistral-7b-hf.json",
}
PACKAGED_PREPROCESSORS = {
    "openai/clip-vit-large-patch14-336": "clip-vit-large-patch14-336.preprocessor.json",
    "llava-hf/llava-v1.6-mistral-7b-hf": "llava-v1.6-mistral-7b-hf.preprocessor.json",
}


def load_llava_config(cfg: ModelConfig) -> LlavaConfig:
    """The LLaVA config a recipe describes, read from config files only (no weights). A [model] key that names the
    wrong kind of folder (a run as model.llava, a decoder as model.vision_tower) is refused first (FolderError)."""
    check_recipe_folders(cfg)
    if cfg.llava:
        return _config(cfg.llava)
    text = _config(cfg.decoder)
    return LlavaConfig(
        vision_config=vision.tower_config(_config(cfg.vision_tower)),
        text_config=text,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        projector_hidden_act=cfg.projector_hidden_act,
        tie_word_embeddings=text.tie_word_embeddings,
    )


def _config(name: str):
    """A checkpoint's config: from its folder (or the hub cache), else, for the shipped recipes' checkpoints,
    the copy shipped with qllava (never a network wait), else from the hub."""
    if name not in PACKAGED_CONFIGS:
        return AutoConfig.from_pretrained(name)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        from importlib.resources import files

        return AutoConfig.for_model(**json.loads((files("qllava") / "configs" / PACKAGED_CONFIGS[name]).read_text()))


def load_base_model(
    recipe: Recipe, processor: LlavaProcessor, quantized: bool = True, dtype: str | None = None
) -> LlavaForConditionalGeneration:
    """LLaVA with every parameter frozen: 4-bit decoder when `quantized` and the recipe asks for it.

    `dtype` overrides the recipe's model dtype (merge reloads the base in the dtype it exports).
    """
    cfg = recipe.model
    torch_dtype = getattr(torch, dtype or cfg.dtype)
    quantization = build_quantization_config(recipe.quantization) if quantized else None
    attn = attention_implementation(cfg.attn_implementation, torch_dtype)
    place = {"device_map": {"": device()}} if torch.cuda.is_available() else {}
    if cfg.llava:
        with unmapped_checkpoints():
            model = llava_class(load_llava_config(cfg)).from_pretrained(
                cfg.llava, dtype=torch_dtype, quantization_config=quantization, attn_implementation=attn, **place
            )
        # transformers refuses to train a quantized model without adapters (it reads `is_quantized`); stage 1
        # trains the projector, which is never quantized. An assembled model carries no such flag either: both
        # sources then train alike (the 4-bit layers themselves stay frozen).
        model.is_quantized = False
    else:
        decoder = load_decoder(cfg.decoder, torch_dtype, quantization, attn)
        with unmapped_checkpoints():
            tower = vision.load_tower(cfg.vision_tower, dtype=torch_dtype, attn_implementation=attn, **place)
        model = assemble(tower, decoder, processor.tokenizer, cfg, attn)
    return frozen(model)


def empty_base_model(recipe: Recipe, processor: LlavaProcessor, dtype: str) -> LlavaForConditionalGeneration:
    """What load_base_model(quantized=False, dtype=dtype) builds, on the meta device: structure, config and
    generation config, no weight read (a streamed merge fills the weights from base_sources)."""
    cfg = recipe.model
    torch_dtype = getattr(torch, dtype)
    attn = attention_implementation(cfg.attn_implementation, torch_dtype)
    if cfg.llava:
        config = load_llava_config(cfg)
        config._attn_implementation = attn
        with torch.device("meta"):
            model = llava_class(config)(config).to(torch_dtype)
        model.generation_config = _generation_config(cfg.llava, config)
        return frozen(model)
    tower_config = vision.tower_config(_config(cfg.vision_tower))
    with torch.device("meta"):
        decoder = AutoModelForCausalLM.from_config(_config(cfg.decoder), dtype=torch_dtype, attn_implementation=attn)
        tower = vision.tower_class(tower_config)._from_config(tower_config, dtype=torch_dtype, attn_implementation=attn)
    decoder.generation_config = _generation_config(cfg.decoder, decoder.config)
    return frozen(assemble(tower, decoder, processor.tokenizer, cfg, attn))


def _generation_config(name: str, config):
    """The checkpoint's generation_config.json as from_pretrained reads it from its folder or the hub cache, else
    one from its config (a plan or trace of a checkpoint not downloaded yet makes no hub request)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        return GenerationConfig.from_model_config(config)


def base_sources(recipe: Recipe, model) -> dict:
    """Each weight of the base model (as empty_base_model builds it) -> where its checkpoint stores it."""
    from .checkpoint import Files, module_sources

    cfg = recipe.model
    if cfg.llava:
        return module_sources(model, Files(_checkpoint_folder(cfg.llava)), lambda key: key)
    text, tower_config = _config(cfg.decoder), vision.tower_config(_config(cfg.vision_tower))
    with torch.device("meta"):
        decoder = AutoModelForCausalLM.from_config(text)
        tower = vision.tower_class(tower_config)._from_config(tower_config)
    # the decoder's body becomes model.language_model, its head stays lm_head; the tower is model.vision_tower
    sources = module_sources(
        decoder,
        Files(_checkpoint_folder(cfg.decoder)),
        lambda key: "model.language_model." + key.removeprefix("model.") if key.startswith("model.") else key,
    )
    sources.update(
        module_sources(tower, Files(_checkpoint_folder(cfg.vision_tower)), lambda key: "model.vision_tower." + key)
    )
    return sources


def _checkpoint_folder(name: str) -> Path:
    folder = local_folder(name)
    if folder is None:
        raise FileNotFoundError(f"{name}: no local folder or cached download holds this checkpoint")
    return folder


LLAVA_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}


def llava_class(config):
    """The model class of a LLaVA (1.5) or LLaVA-NeXT config; other checkpoints are refused, naming their type."""
    try:
        return LLAVA_CLASSES[config.model_type]
    except KeyError:
        raise BaseMismatchError(
            f"model.llava: a {config.model_type!r} checkpoint; qllava trains LLaVA "
            "(llava-hf/llava-1.5-*) and LLaVA-NeXT (llava-hf/llava-v1.6-*) checkpoints"
        ) from None


def load_decoder(name: str, dtype: torch.dtype, quantization: BitsAndBytesConfig | None, attn: str):
    """The causal-LM decoder, quantized as its weights stream in (no full-precision copy is ever held)."""
    place = {"device_map": {"": device()}} if torch.cuda.is_available() else {}
    with unmapped_checkpoints():
        return AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, quantization_config=quantization, attn_implementation=attn, **place
        )


@contextmanager
def unmapped_checkpoints():
    """Checkpoint files read with safetensors' pread backend instead of memory-mapped.

    transformers maps every shard of a checkpoint and keeps all the mappings until the last tensor is loaded, and
    the tensors it does not quantize (embeddings, norms) stay views into them: the resident memory a user's monitor
    or a container limit sees grows to about the whole checkpoint (19.6 GB for a 14.5 GB Mistral-7B loaded in NF4,
    whose result is 4.1 GB). Read with pread, each tensor is copied out when it is needed and nothing is mapped:
    resident memory stays at what the model and one tensor in flight take (benchmarks/load_7b.py).
    """
    from transformers import modeling_utils

    original = getattr(modeling_utils, "safe_open", None)
    if original is None:  # another transformers layout: leave its loading as it is
        yield
        return

    def pread_open(filename, framework, device="cpu", backend=None):
        return original(filename, framework=framework, device=device, backend="pread" if device == "cpu" else backend)

    modeling_utils.safe_open = pread_open
    try:
        yield
    finally:
        modeling_utils.safe_open = original


def frozen(model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """Every parameter frozen (train.py decides what learns), no cache, 4-bit layers safe to train on CPU."""
    model.requires_grad_(False)
    _keep_4bit_trainable_on_cpu(model)
    model.config.use_cache = False
    return model


def build_quantization_config(q: QuantizationConfig) -> BitsAndBytesConfig | None:
    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.bnb_4bit_compute_dtype),
        llm_int8_skip_modules=NOT_QUANTIZED,
    )


def attach_lora(model: LlavaForConditionalGeneration, cfg: LoraConfig):
    """peft LoRA on the decoder's linear layers only (CLIP has q/k/v_proj too, so names are anchored)."""
    import peft

    targets = "|".join(cfg.target_modules)
    lora = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias="none",
        target_modules=rf".*language_model\..*\.({targets})",
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora)


def projector(model) -> torch.nn.Module:
    """The MLP between the vision tower and the decoder."""
    return _llava(model).model.multi_modal_projector


def projector_parameters(model) -> dict[str, torch.nn.Parameter]:
    """What a stage trains besides LoRA, saves in projector.safetensors and gives the projector's learning rate: the
    MLP projector, and LLaVA-NeXT's image_newline (the embedding that ends each row of an image's features)."""
    params = dict(projector(model).named_parameters())
    newline = getattr(_llava(model).model, "image_newline", None)
    if newline is not None:
        params["image_newline"] = newline
    return params


def save_projector(model, folder: Path) -> Path:
    path = Path(folder) / PROJECTOR_FILE
    save_file(
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in projector_parameters(model).items()}, path
    )
    return path


def load_projector(model, path: Path) -> None:
    """Load projector weights, keeping the projector's current dtype and device."""
    target = projector_parameters(model)
    state = load_file(str(path))
    if set(state) != set(target):
        raise BaseMismatchError(
            f"{path}: not a projector for this model (keys {sorted(state)}, expected {sorted(target)})"
        )
    for key, value in state.items():
        if value.shape != target[key].shape:
            raise BaseMismatchError(
                f"{path}: {key} has shape {tuple(value.shape)}, this model's projector needs "
                f"{tuple(target[key].shape)} (a run of another base model?)"
            )
    with torch.no_grad():
        for key, value in state.items():
            target[key].copy_(value.to(target[key].device, target[key].dtype))


def _llava(model):
    """The LLaVA model under a PEFT wrapper, if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def base_fingerprint(cfg: ModelConfig) -> dict:
    """What identifies the base weights: per checkpoint, its files' names and sizes and a digest of their first
    and last MiB (enough to tell two checkpoints apart without reading gigabytes)."""
    roles = {"llava": cfg.llava} if cfg.llava else {"vision_tower": cfg.vision_tower, "decoder": cfg.decoder}
    return {role: _folder_digest(local_folder(name)) for role, name in roles.items()}


def check_base(stage_dir: Path, cfg: ModelConfig) -> None:
    """Refuse to put a run's adapter and projector on other weights than those it was trained on."""
    recorded_file = Path(stage_dir) / BASE_FILE
    if not recorded_file.exists():
        return
    recorded, current = json.loads(recorded_file.read_text()), base_fingerprint(cfg)
    changed = [role for role, digest in current.items() if digest and recorded.get(role) not in (None, "", digest)]
    if changed:
        names = ", ".join(f"{role} {getattr(cfg, role)}" for role in changed)
        raise BaseMismatchError(
            f"the base model ({names}) is not the one {stage_dir} was trained on (its files differ from those "
            f"recorded in {recorded_file}): the adapter and projector would be applied to other weights. "
            "Point the run's recipe.toml [model] at the original base"
        )


def stage_processor(stage_dir: Path, cfg: ModelConfig) -> LlavaProcessor:
    """The processor a stage was trained with (saved with it), else the one its recipe builds."""
    if (Path(stage_dir) / "processor_config.json").exists():
        return AutoProcessor.from_pretrained(stage_dir)
    return build_processor(cfg)


def load_run(run_dir: Path, quantized: bool = True, dtype: str | None = None):
    """A run folder -> (model, processor, recipe) of its final stage: the base, its projector and adapter."""
    return load_stage(RunFolder(run_dir).final_stage(), quantized, dtype)


def load_stage(stage_dir: Path, quantized: bool = True, dtype: str | None = None):
    """A complete stage folder -> (model, processor, recipe): the base, the stage's projector and its adapter."""
    recipe = load_recipe(stage_dir / "recipe.toml")
    check_base(stage_dir, recipe.model)
    processor = stage_processor(stage_dir, recipe.model)
    model = load_base_model(recipe, processor, quantized=quantized, dtype=dtype)
    load_projector(model, stage_dir / PROJECTOR_FILE)
    if (stage_dir / "adapter_config.json").exists():
        import peft

        try:
            model = peft.PeftModel.from_pretrained(model, stage_dir)
        except RuntimeError as e:
            raise BaseMismatchError(
                f"{stage_dir}: the adapter does not fit the base model its recipe names: {str(e).splitlines()[0]}"
            ) from None
        model.requires_grad_(False)
    return model.eval(), processor, recipe


def assemble(tower, decoder, tokenizer, cfg: ModelConfig, attn: str) -> LlavaForConditionalGeneration:
    """LLaVA around a loaded vision tower and causal-LM decoder (any storage: 4-bit or not), with a new
    projector; the decoder's vocabulary grows for the tokenizer's image (and pad) token. Tied input and
    output embeddings (SmolLM2) stay tied."""
    torch_dtype = decoder.get_input_embeddings().weight.dtype
    _fit_embeddings(decoder, len(tokenizer))
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=decoder.config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        projector_hidden_act=cfg.projector_hidden_act,
        tie_word_embeddings=decoder.config.tie_word_embeddings,
    )
    config._attn_implementation = attn
    # The shell is built on the meta device: its vision tower and decoder are replaced by the loaded ones,
    # so no memory is spent on weights that would be thrown away.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = decoder.model
    model.lm_head = decoder.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(tower.device, torch_dtype)
    model.generation_config = decoder.generation_config
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _fit_embeddings(decoder, vocab_size: int) -> None:
    """Grow embeddings and lm_head for the added image/pad tokens, to a multiple of 64.

    New rows are the mean of the old ones (as LLaVA does), not random: a reloaded base must be identical
    to the trained one, or merged weights and adapters would not match.
    """
    old = decoder.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    decoder.resize_token_embeddings(vocab_size, pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        for weight in (decoder.get_input_embeddings().weight, decoder.get_output_embeddings().weight):
            fill_new_rows(weight, old)


def fill_new_rows(weight: torch.Tensor, old: int) -> torch.Tensor:
    """Rows from `old` on set to the mean of the rows before (in place; a streamed merge grows the same way)."""
    weight[old:] = weight[:old].mean(dim=0, keepdim=True)
    return weight


def _keep_4bit_trainable_on_cpu(model) -> None:
    """On CPUs with AVX512-BF16, a no-grad forward repacks a Linear4bit's weight and every later training step
    runs a kernel without autograd: gradients silently wrong (measured: up to 143% relative error; the test
    test_without_the_fix_the_cpu_repack_breaks_gradients shows it). Turning that path off keeps them exact."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def local_folder(name: str) -> Path | None:
    """A checkpoint's folder on this machine: the path itself, or a hub id's cached snapshot; None if not here."""
    if Path(name).is_dir():
        return Path(name)
    try:  # a hub id: its cached snapshot, if any (never a download)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        return None


def _folder_digest(folder: Path | None) -> str:
    if folder is None:
        return ""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        if path.suffix in (".safetensors", ".bin", ".json") and path.name != BASE_FILE:
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as f:
                digest.update(f.read(2**20))
                if size > 2**21:
                    f.seek(-(2**20), 2)
                    digest.update(f.read())
    return digest.hexdigest()[:20]
