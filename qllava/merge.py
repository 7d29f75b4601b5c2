"""`qllava merge`: a run folder -> a plain LlavaForConditionalGeneration checkpoint anyone can load.

The merge streams: the base checkpoint is read weight by weight in the export dtype (never 4-bit: merging LoRA
into NF4 re-quantizes, lossy), the run's projector and LoRA deltas are applied as peft applies them, and the
result is written one weight at a time in the shards and under the names save_pretrained uses (checkpoint.py).
Reading, merging and writing overlap (a thread each). The whole model is never in memory, so a 7B merge fits
Colab's RAM. The processor, a chat template that renders the run's
template, the generation config and a model card go beside it.

Verification (before anything is moved to --out) loads the model once, in the export dtype:
- base + adapter as peft merges it in memory: every merged weight must be base + adapter computed in float32 and
  rounded once to the export dtype, and every weight written by the stream must equal peft's bit for bit;
- the written folder, loaded as users load it: in float32 its logits on a few held-out samples must equal the
  unmerged base + adapter's. In bfloat16/float16 they are compared for information only: storing base + adapter
  rounds away every weight change under half a step of the dtype, and across a real model's depth that alone can
  move logits as far as a merge that dropped or doubled the adapter (SmolLM2, 30 layers: docs/merge-export.md).
When no sample can be read, or the model does not fit the machine, the report says why verification did not run.
"""

from __future__ import annotations

import gc
import json
import resource
import shutil
import time
import warnings
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from . import checkpoint, templates
from . import model as modeling
from .data import DataReport, ImageStore, image_source, read_conversations, tokenize_dataset
from .errors import DataError
from .folders import check_run_folder
from .inference import QLLAVA_FILE, load_for_inference
from .packing import Collator
from .recipe import load_recipe
from .run import RunFolder
from .tokenizer import adds_bos

# Max |merged - unmerged| logit difference of a float32 merge, relative to the largest logit magnitude (at least 1).
FLOAT32_TOLERANCE = 1e-4
# Max distance of a merged weight from base + adapter computed in float32 and rounded to the export dtype, in units
# in the last place of that dtype: 0 when the merge rounds once, as peft's does; 1 leaves room for another rounding.
MAX_ULPS = 1.0
SHARD_SIZE = "2GB"
# elements of a weight merged at a time: a block of its float32 delta stays in the CPU's cache while it is summed,
# and is no larger than torch's grain size, so one thread works on it: handing each small operation to several
# threads costs more than the work when other processes hold the cores (benchmarks/merge_7b.py: 4 times slower)
BLOCK = 2**15
PEFT_PREFIX = "base_model.model."


class MergeError(RuntimeError):
    pass


def merge(
    run_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    verify: bool = True,
    say=print,
) -> dict:
    """Merge a run into out_dir; return what was measured (diffs, size, time, peak RAM)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_run_folder(run_dir)  # a merged folder, a stage or a decoder is named as such, with what to pass
    stage_dir = RunFolder(run_dir).final_stage()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists: pass --overwrite to replace it, or choose another --out")
    started = time.perf_counter()
    recipe = load_recipe(stage_dir / "recipe.toml")
    modeling.check_base(stage_dir, recipe.model)
    report = {"run": str(run_dir), "stage": stage_dir.name, "dtype": dtype}
    processor = modeling.stage_processor(stage_dir, recipe.model)
    batch, skipped = _verification_batch(recipe, stage_dir, processor) if verify else (None, "--no-verify was given")

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        say(
            f"merging {stage_dir.name} into the base in {dtype}, weight by weight (not 4-bit: merging into NF4 "
            "would re-quantize)"
        )
        _write_merged(recipe, processor, stage_dir, partial, dtype, report)
        _write_beside(processor, recipe, stage_dir, run_dir, partial, report)
        if batch is not None:
            skipped = _verify(run_dir, partial, batch, report, say)
        if skipped:
            report["verification"] = f"not run: {skipped}"
            say(f"WARNING: the merge was not verified: {skipped}")
        report["seconds"] = round(time.perf_counter() - started, 1)
        report["output_bytes"] = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
        report["peak_ram_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        (partial / "README.md").write_text(model_card(recipe, stage_dir, run_dir, report))
        (partial / "merge_report.json").write_text(json.dumps(report, indent=1))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written is left beside --out
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return report


def _write_merged(recipe, processor, stage_dir: Path, folder: Path, dtype: str, report: dict) -> None:
    """The merged weights, streamed from the base checkpoint(s), written weight by weight with the config."""
    model, weights = merged_weights(recipe, processor, stage_dir, dtype)
    checkpoint.write_sharded(folder, model, weights.merged, SHARD_SIZE)
    report["merged_weights"] = weights.merged_count
    report["adapter_change_rounding_error"] = weights.rounding_error()
    model.config.use_cache = True
    model.config.architectures = [type(model).__name__]
    model.config.dtype = dtype  # as save_pretrained records it
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


def merged_weights(recipe, processor, stage_dir: Path, dtype: str):
    """The merged model's structure (on the meta device) and its weights as the stream computes them, one at a time
    (`weights.weight(key)`): what `qllava merge` writes, and what `qllava export` converts without writing it."""
    model = _load(lambda: modeling.empty_base_model(recipe, processor, dtype), recipe)
    sources = _load(lambda: modeling.base_sources(recipe, model), recipe)
    return model, _Weights(model, sources, stage_dir, getattr(torch, dtype))


class _Weights:
    """Each weight of the merged model, read from the base and changed as the run's stage changed it: the
    projector file, the decoder modules trained in full (modules_to_save), the LoRA deltas merged in."""

    def __init__(self, model, sources: dict, stage_dir: Path, dtype: torch.dtype):
        self.shapes = {k: v.shape for k, v in model.state_dict().items()}
        self.sources, self.dtype = sources, dtype
        self.replaced = {
            f"model.{k}" if k == "image_newline" else f"model.multi_modal_projector.{k}": v
            for k, v in load_file(str(stage_dir / modeling.PROJECTOR_FILE)).items()
        }
        self.lora, self.scaling = {}, {}
        if (stage_dir / "adapter_config.json").exists():
            self._read_adapter(stage_dir)
        self.merged_count, self.error, self.change, self._delta = 0, 0.0, 0.0, torch.empty(0)
        for key in [*self.replaced, *self.lora]:
            if key not in self.shapes:
                raise MergeError(
                    f"{stage_dir}: trained weight {key} is not a weight of the base model its recipe "
                    "names (a run of another model?)"
                )

    def _read_adapter(self, stage_dir: Path) -> None:
        config = json.loads((stage_dir / "adapter_config.json").read_text())
        unsupported = [
            k
            for k in (
                "use_dora",
                "lora_bias",
                "fan_in_fan_out",
                "use_rslora",
                "rank_pattern",
                "alpha_pattern",
                "layer_replication",
                "trainable_token_indices",
            )
            if config.get(k)
        ]
        if unsupported:
            raise MergeError(
                f"{stage_dir}/adapter_config.json: {', '.join(unsupported)} set; qllava trains "
                "plain LoRA and merges only that"
            )
        for key, value in load_file(str(stage_dir / "adapter_model.safetensors")).items():
            key = key.removeprefix(PEFT_PREFIX)
            if ".lora_A." in key or ".lora_B." in key:
                module, half = key.rsplit(".lora_", 1)
                self.lora.setdefault(module + ".weight", {})[half[0]] = value
            else:  # a module trained in full
                self.replaced[key] = value
        for pair in self.lora.values():  # peft: alpha / r, r being the rank the adapter was trained with
            pair["scaling"] = config["lora_alpha"] / pair["A"].shape[0]

    def merged(self, keys: list[str]):
        """(key, weight) for each of `keys`, the base weights read by a thread a few weights ahead."""
        read = [key for key in keys if key not in self.replaced]
        for key in read:
            self._check_stored(key)
        reads = checkpoint.ahead((self.sources[key].read() for key in read), checkpoint.READ_AHEAD)
        try:
            for key in keys:
                if key in self.replaced:
                    yield key, self.replaced[key].to(self.dtype)
                else:
                    yield key, self._changed(key, next(reads))
        finally:
            reads.close()

    def weight(self, key: str) -> torch.Tensor:
        if key in self.replaced:
            return self.replaced[key].to(self.dtype)
        self._check_stored(key)
        return self._changed(key, self.sources[key].read())

    def _check_stored(self, key: str) -> None:
        if key not in self.sources:
            raise MergeError(f"weight {key} is in none of the base checkpoints the run's recipe names")

    def _changed(self, key: str, stored: torch.Tensor) -> torch.Tensor:
        """The base weight `key` as stored, in the export dtype, grown and with the LoRA delta merged in."""
        tensor = stored.to(self.dtype)
        if tensor.shape != self.shapes[key]:
            tensor = self._grown(key, tensor)
        if key in self.lora:
            tensor = self._with_delta(key, tensor)
        return tensor

    def _grown(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Embedding rows added for the image (and pad) token: the mean of the others, as training built them."""
        shape = self.shapes[key]
        if tensor.shape[1:] != shape[1:] or tensor.shape[0] > shape[0]:
            raise MergeError(
                f"weight {key}: the base stores shape {tuple(tensor.shape)}, the model needs {tuple(shape)}"
            )
        grown = torch.empty(shape, dtype=tensor.dtype)
        grown[: tensor.shape[0]] = tensor
        return modeling.fill_new_rows(grown, tensor.shape[0])

    def _with_delta(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """base + delta computed in float32 and rounded once, in place, as peft merges; the rounding error and the
        change are summed on the way, a cache-sized block at a time, so the weight is gone through once."""
        pair = self.lora[key]
        if self._delta.numel() < tensor.numel():  # one buffer for every delta: fresh memory is slow to first touch
            self._delta = torch.empty(tensor.numel())
        delta = merged_delta(
            pair["A"], pair["B"], pair["scaling"], out=self._delta[: tensor.numel()].view(tensor.shape)
        )
        delta, flat = delta.view(-1), tensor.view(-1)
        for start in range(0, flat.numel(), BLOCK):
            change, weight = delta[start : start + BLOCK], flat[start : start + BLOCK]
            self.change += torch.dot(change, change).item()
            exact = change.add_(weight)  # base + delta in float32, as `tensor += delta` computes it
            weight.copy_(exact)  # ... and rounds it once to the export dtype
            exact.sub_(weight)
            self.error += torch.dot(exact, exact).item()
        self.merged_count += 1
        return tensor

    def rounding_error(self) -> float:
        """How much of the adapter's weight change the export dtype loses (changes under half its step round away)."""
        return (self.error / self.change) ** 0.5 if self.change else 0.0


def merged_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, out: torch.Tensor | None = None):
    """LoRA's weight change, computed as peft computes it (B @ A in float32, then scaled), in `out` if given."""
    return torch.matmul(lora_b.float(), lora_a.float(), out=out).mul_(scaling)


def _load(build, recipe):
    """Loads naming the base the run needs when it cannot be found or does not fit."""
    try:
        return build()
    except OSError as e:
        base = recipe.model.llava or f"{recipe.model.vision_tower} + {recipe.model.decoder}"
        raise FileNotFoundError(f"the run's base model ({base}, from its recipe.toml) cannot be loaded: {e}") from None
    except (RuntimeError, ValueError) as e:
        if "size mismatch" in str(e) or "shape" in str(e):
            raise MergeError(
                f"the run's adapter or projector does not fit the base model it names "
                f"({recipe.model.decoder or recipe.model.llava}): {str(e).splitlines()[0]}"
            ) from None
        raise


def _verification_batch(recipe, stage_dir: Path, processor, n: int = 4) -> tuple[dict | None, str]:
    """A padded batch of a few conversations to check the merge on (the recipe's eval data when it reads as
    conversations, else the stage's own training data), or None and why there is none."""
    stage = recipe.stage2 if stage_dir.name == "stage2" else recipe.stage1
    tried = []
    for path, folder in [(recipe.eval.data, recipe.eval.image_folder)] * bool(recipe.eval.data) + [
        (path, stage.image_folder) for path in stage.data
    ]:
        try:
            where = image_source(path, folder)
            conversations = read_conversations(path, where, 0, DataReport(), limit=n)
        except (DataError, OSError, ValueError, KeyError) as e:
            tried.append(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        if conversations:
            return _batch(conversations, where, recipe, stage, processor), ""
        tried.append(f"{path}: no usable conversation")
    return None, "no sample to check it on (" + "; ".join(tried) + ")"


def _batch(conversations, where, recipe, stage, processor) -> dict:
    tokenizer = processor.tokenizer
    config = modeling.load_llava_config(recipe.model)
    image_token_id = tokenizer.convert_tokens_to_ids(modeling.IMAGE_TOKEN)
    samples = tokenize_dataset(
        conversations,
        stage.template,
        tokenizer,
        image_token_id,
        modeling.image_geometry(config, processor.image_processor),
        10**6,
        DataReport(),
    )
    collator = Collator(
        ImageStore([where]),
        processor.image_processor,
        stage.image_aspect_ratio,
        tokenizer.pad_token_id,
        image_token_id,
        packing=False,
    )
    batch = collator.batch([[sample] for sample in samples])
    batch.pop("labels")
    return batch


def _verify(run_dir: Path, written: Path, batch: dict, report: dict, say) -> str:
    """Check the written checkpoint (see the module docstring); return why it was not checked, or ""."""
    dtype = report["dtype"]
    too_big = _does_not_fit(written, dtype)
    if too_big:
        return too_big
    say(f"verification: {batch['input_ids'].shape[0]} samples; scoring the 4-bit training model first")
    trained = _logits(modeling.load_run(run_dir, quantized=True)[0], batch)
    gc.collect()
    say(f"verification: base + adapter in {dtype}, merged in memory by peft")
    model = modeling.load_run(run_dir, quantized=False, dtype=dtype)[0]
    unmerged = _logits(model, batch)
    if hasattr(model, "merge_and_unload"):
        model = _merged(model, report, say)
    check_written(model, written)
    say("verification: every weight written equals peft's in-memory merge, bit for bit")
    del model
    gc.collect()
    say("verification: the written checkpoint, loaded as transformers loads it")
    _check_logits(_logits(load_for_inference(written).model, batch), unmerged, trained, report, say)
    return ""


def _does_not_fit(written: Path, dtype: str) -> str:
    """Why the model cannot be verified here (it is loaded whole, once), or ""."""
    need = sum(f.stat().st_size for f in written.glob("*.safetensors"))
    if torch.cuda.is_available():
        free, where = torch.cuda.mem_get_info()[0], "free on the GPU"
    else:
        free, where = psutil.virtual_memory().available, "of RAM available (no GPU)"
    if need * 1.2 < free:
        return ""
    return (
        f"checking loads the model whole in {dtype} ({need / 2**30:.1f} GiB) and this machine has "
        f"{free / 2**30:.1f} GiB {where}; the streamed merge itself needs far less. Merge on a machine "
        "with a GPU or more RAM to verify"
    )


def check_written(model, written: Path) -> None:
    """Every weight the stream wrote equals peft's in-memory merge, bit for bit."""
    names = checkpoint.saved_names(model)
    files, state = checkpoint.Files(written), model.state_dict()
    odd = sorted(set(files.where) ^ set(names.values()))
    if odd:
        raise MergeError(f"the written checkpoint's weights are not the model's: {odd[:3]}")
    for key in names:
        stored = files.read(names[key])
        if not torch.equal(stored, state[key].detach().cpu()):
            diff = (stored.float() - state[key].detach().cpu().float()).abs().max().item()
            raise MergeError(
                f"merged weight {key} as written differs from base + adapter merged by peft (by up "
                f"to {diff:.3g}); nothing was written to the output folder"
            )


def _merged(model, report: dict, say):
    """merge_and_unload, adapter layer by adapter layer, each merged weight checked against base + adapter computed
    in float32 and rounded to the export dtype. Records how far the worst weight is from that (in units in the last
    place); how much of the adapter's weight change the dtype loses was measured by the stream as it wrote."""
    from peft.tuners.lora import LoraLayer

    worst, worst_name, checked = 0.0, "", 0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        weight = layer.get_base_layer().weight
        delta = sum(layer.get_delta_weight(adapter).float() for adapter in layer.active_adapters)
        exact = weight.detach().to(torch.float32, copy=True).add_(delta)
        layer.merge()
        ulps = _ulps(weight.detach(), exact)
        if ulps > worst:
            worst, worst_name = ulps, name.removeprefix("base_model.model.") + ".weight"
        checked += 1
    dtype = report["dtype"]
    report.update(merged_weights_checked=checked, max_ulps_vs_float32_merge=worst)
    if worst > MAX_ULPS:
        raise MergeError(
            f"merged weight {worst_name} is {worst:.3g} units in the last place of {dtype} away from "
            "base + adapter computed in float32 (a correct merge rounds once: at most 0.5); nothing "
            "was written to the output folder"
        )
    say(
        f"{checked} merged weights are base + adapter computed in float32 and rounded to {dtype} (largest deviation "
        f"{worst:g} units in the last place); the adapter's weight change is stored with a relative error of "
        f"{report['adapter_change_rounding_error']:.2g}"
        + (
            f" (most of it is under half a {dtype} step and rounds away: --dtype float32 keeps it)"
            if report["adapter_change_rounding_error"] > 0.5
            else ""
        )
    )
    with warnings.catch_warnings():  # each layer is merged already: unloading only swaps the merged layers in
        warnings.filterwarnings("ignore", "All adapters are already merged")
        return model.merge_and_unload()


def _ulps(stored: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest distance of `stored` from `exact` rounded to stored's dtype, in units in the last place there."""
    rounded = exact.to(stored.dtype)
    if torch.equal(stored, rounded):
        return 0.0
    info = torch.finfo(stored.dtype)
    _, exponent = torch.frexp(rounded.float().abs().clamp_min(info.tiny))
    ulp = info.eps * torch.exp2(exponent - 1.0)  # frexp's mantissa is in [0.5, 1)
    return ((stored.float() - rounded.float()).abs() / ulp).max().item()


def _check_logits(merged: torch.Tensor, unmerged: torch.Tensor, trained: torch.Tensor, report: dict, say) -> None:
    """Merged against unmerged logits: checked in float32, reported in bfloat16/float16 (see the module docstring)."""
    dtype = report["dtype"]
    report["max_abs_diff_vs_unmerged"] = (merged - unmerged).abs().max().item()
    report["max_abs_diff_vs_4bit_training_model"] = (merged - trained).abs().max().item()
    versus = f"vs the 4-bit training model: {report['max_abs_diff_vs_4bit_training_model']:.3g} (for information)"
    if dtype != "float32":
        say(
            f"merged vs unmerged ({dtype}): max |logit diff| {report['max_abs_diff_vs_unmerged']:.3g} (for "
            f"information: {dtype} rounding, checked in float32 only); {versus}"
        )
        return
    report["tolerance"] = FLOAT32_TOLERANCE * max(1.0, unmerged.abs().max().item())
    say(
        f"merged vs unmerged ({dtype}): max |logit diff| {report['max_abs_diff_vs_unmerged']:.3g} "
        f"(tolerance {report['tolerance']:.3g}); {versus}"
    )
    if report["max_abs_diff_vs_unmerged"] > report["tolerance"]:
        raise MergeError(
            f"merged model differs from base + adapter by {report['max_abs_diff_vs_unmerged']:.3g} "
            f"(> {report['tolerance']:.3g}); nothing was written to the output folder"
        )


def _logits(model, batch: dict) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits.float().cpu()
    return out.masked_fill(batch["attention_mask"][..., None] == 0, 0.0)


def _write_beside(processor, recipe, stage_dir: Path, run_dir: Path, folder: Path, report: dict) -> None:
    """What goes beside the weights: the processor with a chat template rendering the run's template, and the
    run's template and image preprocessing for qllava chat / eval."""
    stage = recipe.stage2 if stage_dir.name == "stage2" else recipe.stage1
    processor.chat_template = templates.chat_template(stage.template, adds_bos(processor.tokenizer))
    processor.save_pretrained(folder)
    info = {
        "template": stage.template,
        "image_aspect_ratio": stage.image_aspect_ratio,
        "source_run": str(run_dir),
        "stage": stage_dir.name,
        "dtype": report["dtype"],
    }
    (folder / QLLAVA_FILE).write_text(json.dumps(info, indent=1))


def model_card(recipe, stage_dir: Path, run_dir: Path, report: dict) -> str:
    stage = recipe.stage2 if stage_dir.name == "stage2" else recipe.stage1
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    scores = {k: v for k, v in metrics.items() if k.startswith("accuracy_") or k == "chance"}
    base = (
        f"`{recipe.model.llava}`"
        if recipe.model.llava
        else f"vision tower `{recipe.model.vision_tower}`, decoder `{recipe.model.decoder}`"
    )
    lora = (
        ""
        if stage_dir.name == "stage1"
        else f" and LoRA (r {recipe.lora.r}, alpha {recipe.lora.lora_alpha}, "
        f"on {', '.join(recipe.lora.target_modules)})"
    )
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [llava, qllava, qlora]",
        "---",
        "",
        f"# {run_dir.name} (merged)",
        "",
        f"A LLaVA model ({base}) trained with qllava (QLoRA): projector{lora}, merged into "
        f"the base and saved in {report['dtype']}.",
        "",
        "## Training",
        "",
        f"- stage 1 data: {', '.join(recipe.stage1.data)} (template `plain`)",
        f"- stage 2 data: {', '.join(recipe.stage2.data)} (template `{recipe.stage2.template}`)"
        if stage_dir.name == "stage2"
        else "- stage 2: not run (projector alignment only)",
        f"- template: `{stage.template}`, images preprocessed with `{stage.image_aspect_ratio}`",
        f"- the resolved recipe is in `{stage_dir}/recipe.toml`",
        "",
        "## Metrics",
        "",
        "```json",
        json.dumps({**scores, **{k: v for k, v in report.items() if "diff" in k}}, indent=1),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline",
        "model = AutoModelForImageTextToText.from_pretrained(PATH)",
        "processor = AutoProcessor.from_pretrained(PATH)   # its chat template renders the training template",
        'pipe = pipeline("image-text-to-text", model=PATH)',
        'pipe(text=[{"role": "user", "content": [{"type": "image", "image": IMAGE}, '
        '{"type": "text", "text": "What is this?"}]}])',
        "```",
        "",
        f"or `qllava chat PATH --image IMAGE`, which also pads images to a square as training did "
        f"(`{stage.image_aspect_ratio}`).",
        "",
    ]
    return "\n".join(lines)
