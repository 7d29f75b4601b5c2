"""`qllava merge`: a run folder -> a plain LlavaForConditionalGeneration checkpoint anyone can load.

The base is reloaded in the export dtype, never in 4-bit (merging into NF4 re-quantizes: lossy), the run's
projector and LoRA adapter are applied and merged in place (one full copy in memory, never two), and the
result is saved as sharded safetensors with the processor, a chat template that renders the run's
template, the generation config and a model card.

Verification (before anything is written) checks the merge where each check means something at a real depth:
- every merged weight must be base + adapter computed in float32 and rounded once to the export dtype (what a
  correct merge stores, in any dtype, at any depth);
- in float32, the merged model's logits on a few held-out samples must equal the unmerged base + adapter's.
In bfloat16/float16 the logits are compared for information only: storing base + adapter rounds away every weight
change under half a step of the dtype, and across a real model's depth that alone can move logits as far as a merge
that dropped or doubled the adapter (SmolLM2, 30 layers: README, `qllava merge`).
"""

from __future__ import annotations

import json
import resource
import shutil
import time
import warnings
from pathlib import Path

import torch

from . import model as modeling, templates
from .data import DataReport, ImageStore, image_source, read_conversations, tokenize_dataset
from .inference import QLLAVA_FILE
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


class MergeError(RuntimeError):
    pass


def merge(run_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16", overwrite: bool = False,
          verify: bool = True, say=print) -> dict:
    """Merge a run into out_dir; return what was measured (diffs, size, time, peak RAM)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    stage_dir = RunFolder(run_dir).final_stage()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists: pass --overwrite to replace it, or choose another --out")
    started = time.perf_counter()
    recipe = load_recipe(stage_dir / "recipe.toml")
    modeling.check_base(stage_dir, recipe.model)
    report = {"run": str(run_dir), "stage": stage_dir.name, "dtype": dtype}
    processor = modeling.stage_processor(stage_dir, recipe.model)
    batch = _verification_batch(recipe, stage_dir, processor) if verify else None
    if batch is not None:
        say(f"verification: {batch['input_ids'].shape[0]} held-out samples; scoring the 4-bit training model first")
        trained = _logits(_load(lambda: modeling.load_run(run_dir, quantized=True)[0], recipe), batch)

    say(f"loading the base in {dtype} (not 4-bit: merging into NF4 would re-quantize)")
    model = _load(lambda: modeling.load_base_model(recipe, processor, quantized=False, dtype=dtype), recipe)
    modeling.load_projector(model, stage_dir / modeling.PROJECTOR_FILE)
    if (stage_dir / "adapter_config.json").exists():
        import peft
        model = _load(lambda: peft.PeftModel.from_pretrained(model, stage_dir), recipe)
        unmerged = _logits(model, batch) if batch is not None else None
        model = _merged(model, report, out_dir, say) if verify else model.merge_and_unload()
    else:
        unmerged = _logits(model, batch) if batch is not None else None  # stage 1: nothing to merge
    if batch is not None:
        _check_logits(_logits(model, batch), unmerged, trained, report, out_dir, say)

    _save(model, processor, recipe, stage_dir, run_dir, out_dir, report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["output_bytes"] = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    report["peak_ram_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    (out_dir / "merge_report.json").write_text(json.dumps(report, indent=1))
    return report


def _load(build, recipe):
    """Loads naming the base the run needs when it cannot be found or does not fit."""
    try:
        return build()
    except OSError as e:
        base = recipe.model.llava or f"{recipe.model.vision_tower} + {recipe.model.decoder}"
        raise FileNotFoundError(f"the run's base model ({base}, from its recipe.toml) cannot be loaded: {e}") from None
    except (RuntimeError, ValueError) as e:
        if "size mismatch" in str(e) or "shape" in str(e):
            raise MergeError(f"the run's adapter or projector does not fit the base model it names "
                             f"({recipe.model.decoder or recipe.model.llava}): {str(e).splitlines()[0]}") from None
        raise


def _verification_batch(recipe, stage_dir: Path, processor, n: int = 4) -> dict | None:
    """A padded batch of a few held-out conversations (the recipe's eval data, else its stage-2 data)."""
    stage = recipe.stage2 if stage_dir.name == "stage2" else recipe.stage1
    path, folder = (recipe.eval.data, recipe.eval.image_folder) if recipe.eval.data else (stage.data[0], stage.image_folder)
    where = image_source(path, folder)
    conversations = read_conversations(path, where, 0, DataReport())[:n]
    if not conversations:
        return None
    tokenizer = processor.tokenizer
    config = modeling.load_llava_config(recipe.model)
    image_token_id = tokenizer.convert_tokens_to_ids(modeling.IMAGE_TOKEN)
    samples = tokenize_dataset(conversations, stage.template, tokenizer, image_token_id,
                               modeling.image_geometry(config, processor.image_processor), 10**6, DataReport())
    collator = Collator(ImageStore([where]), processor.image_processor, stage.image_aspect_ratio,
                        tokenizer.pad_token_id, image_token_id, packing=False)
    batch = collator.batch([[sample] for sample in samples])
    batch.pop("labels")
    return batch


def _merged(model, report: dict, out_dir: Path, say):
    """merge_and_unload, adapter layer by adapter layer, each merged weight checked against base + adapter computed
    in float32 and rounded to the export dtype. Records how far the worst weight is from that (in units in the last
    place) and how much of the adapter's weight change the dtype loses (changes under half its step round away)."""
    from peft.tuners.lora import LoraLayer
    worst, worst_name, error, change, checked = 0.0, "", 0.0, 0.0, 0
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
        error += torch.linalg.vector_norm(weight.detach().float() - exact).item() ** 2
        change += torch.linalg.vector_norm(delta).item() ** 2
        checked += 1
    dtype = report["dtype"]
    report.update(merged_weights_checked=checked, max_ulps_vs_float32_merge=worst,
                  adapter_change_rounding_error=(error / change) ** 0.5 if change else 0.0)
    if worst > MAX_ULPS:
        raise MergeError(f"merged weight {worst_name} is {worst:.3g} units in the last place of {dtype} away from "
                         f"base + adapter computed in float32 (a correct merge rounds once: at most 0.5); nothing "
                         f"was written to {out_dir}")
    say(f"{checked} merged weights are base + adapter computed in float32 and rounded to {dtype} (largest deviation "
        f"{worst:g} units in the last place); the adapter's weight change is stored with a relative error of "
        f"{report['adapter_change_rounding_error']:.2g}"
        + (f" (most of it is under half a {dtype} step and rounds away: --dtype float32 keeps it)"
           if report["adapter_change_rounding_error"] > 0.5 else ""))
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


def _check_logits(merged: torch.Tensor, unmerged: torch.Tensor, trained: torch.Tensor, report: dict, out_dir: Path,
                  say) -> None:
    """Merged against unmerged logits: checked in float32, reported in bfloat16/float16 (see the module docstring)."""
    dtype = report["dtype"]
    report["max_abs_diff_vs_unmerged"] = (merged - unmerged).abs().max().item()
    report["max_abs_diff_vs_4bit_training_model"] = (merged - trained).abs().max().item()
    versus = f"vs the 4-bit training model: {report['max_abs_diff_vs_4bit_training_model']:.3g} (for information)"
    if dtype != "float32":
        say(f"merged vs unmerged ({dtype}): max |logit diff| {report['max_abs_diff_vs_unmerged']:.3g} (for "
            f"information: {dtype} rounding, checked in float32 only); {versus}")
        return
    report["tolerance"] = FLOAT32_TOLERANCE * max(1.0, unmerged.abs().max().item())
    say(f"merged vs unmerged ({dtype}): max |logit diff| {report['max_abs_diff_vs_unmerged']:.3g} "
        f"(tolerance {report['tolerance']:.3g}); {versus}")
    if report["max_abs_diff_vs_unmerged"] > report["tolerance"]:
        raise MergeError(f"merged model differs from base + adapter by {report['max_abs_diff_vs_unmerged']:.3g} "
                         f"(> {report['tolerance']:.3g}); nothing was written to {out_dir}")


def _logits(model, batch: dict) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits.float().cpu()
    return out.masked_fill(batch["attention_mask"][..., None] == 0, 0.0)


def _save(model, processor, recipe, stage_dir: Path, run_dir: Path, out_dir: Path, report: dict) -> None:
    """Write to a sibling folder first, then move it in place: a crash never leaves half a checkpoint at --out."""
    stage = recipe.stage2 if stage_dir.name == "stage2" else recipe.stage1
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.config.use_cache = True
    model.save_pretrained(partial, max_shard_size=SHARD_SIZE)
    processor.chat_template = templates.chat_template(stage.template, adds_bos(processor.tokenizer))
    processor.save_pretrained(partial)
    info = {"template": stage.template, "image_aspect_ratio": stage.image_aspect_ratio, "source_run": str(run_dir),
            "stage": stage_dir.name, "dtype": report["dtype"]}
    (partial / QLLAVA_FILE).write_text(json.dumps(info, indent=1))
    (partial / "README.md").write_text(model_card(recipe, stage_dir, run_dir, report))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)


def model_card(recipe, stage_dir: Path, run_dir: Path, report: dict) -> str:
    stage = recipe.stage2 if stage_dir.name == "stage2" else recipe.stage1
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    scores = {k: v for k, v in metrics.items() if k.startswith("accuracy_") or k == "chance"}
    base = f"`{recipe.model.llava}`" if recipe.model.llava else \
        f"vision tower `{recipe.model.vision_tower}`, decoder `{recipe.model.decoder}`"
    lora = "" if stage_dir.name == "stage1" else \
        f" and LoRA (r {recipe.lora.r}, alpha {recipe.lora.lora_alpha}, on {', '.join(recipe.lora.target_modules)})"
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags: [llava, qllava, qlora]", "---",
        "", f"# {run_dir.name} (merged)", "",
        f"A LLaVA model ({base}) trained with qllava (QLoRA): projector{lora}, merged into "
        f"the base and saved in {report['dtype']}.", "",
        "## Training", "",
        f"- stage 1 data: {', '.join(recipe.stage1.data)} (template `plain`)",
        f"- stage 2 data: {', '.join(recipe.stage2.data)} (template `{recipe.stage2.template}`)" if stage_dir.name == "stage2"
        else "- stage 2: not run (projector alignment only)",
        f"- template: `{stage.template}`, images preprocessed with `{stage.image_aspect_ratio}`",
        f"- the resolved recipe is in `{stage_dir}/recipe.toml`", "",
        "## Metrics", "", "```json", json.dumps({**scores, **{k: v for k, v in report.items() if "diff" in k}}, indent=1),
        "```", "",
        "## Use", "", "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline",
        "model = AutoModelForImageTextToText.from_pretrained(PATH)",
        "processor = AutoProcessor.from_pretrained(PATH)   # its chat template renders the training template",
        'pipe = pipeline("image-text-to-text", model=PATH)',
        'pipe(text=[{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is this?"}]}])',
        "```", "",
        f"or `qllava chat PATH --image IMAGE`, which also pads images to a square as training did "
        f"(`{stage.image_aspect_ratio}`).", ""]
    return "\n".join(lines)
