"""`qllava merge`: a run folder -> a plain LlavaForConditionalGeneration checkpoint anyone can load.

The base is reloaded in the export dtype, never in 4-bit (merging into NF4 re-quantizes: lossy), the run's
projector and LoRA adapter are applied and merged in place (one full copy in memory, never two), and the
result is saved as sharded safetensors with the processor, a chat template that renders the run's
template, the generation config and a model card. Verification compares the merged model's logits with the
unmerged base + adapter on a few held-out samples and refuses to finish above a dtype tolerance.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import torch

from . import model as modeling, templates
from .data import DataReport, ImageStore, image_source, read_conversations, tokenize_dataset
from .inference import QLLAVA_FILE
from .packing import Collator
from .recipe import load_recipe
from .run import RunFolder
from .tokenizer import adds_bos

# Max |merged - unmerged| logit difference, relative to the largest logit magnitude (at least 1).
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
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
        model = model.merge_and_unload()
    else:
        unmerged = _logits(model, batch) if batch is not None else None  # stage 1: nothing to merge
    if batch is not None:
        merged = _logits(model, batch)
        scale = max(1.0, unmerged.abs().max().item())
        report["max_abs_diff_vs_unmerged"] = (merged - unmerged).abs().max().item()
        report["max_abs_diff_vs_4bit_training_model"] = (merged - trained).abs().max().item()
        report["tolerance"] = TOLERANCE[dtype] * scale
        say(f"merged vs unmerged ({dtype}): max |logit diff| {report['max_abs_diff_vs_unmerged']:.3g} "
            f"(tolerance {report['tolerance']:.3g}); vs the 4-bit training model: "
            f"{report['max_abs_diff_vs_4bit_training_model']:.3g} (for information)")
        if report["max_abs_diff_vs_unmerged"] > report["tolerance"]:
            raise MergeError(f"merged model differs from base + adapter by {report['max_abs_diff_vs_unmerged']:.3g} "
                             f"(> {report['tolerance']:.3g}); nothing was written to {out_dir}")

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
