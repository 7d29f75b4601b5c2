"""The model card (README.md) of a stage folder: what the stage was trained from and on, with which settings, and
how to use it. Written in place of PEFT's blank template, which save_pretrained puts there."""

from __future__ import annotations

from pathlib import Path

from .preflight import is_hub_id
from .recipe import Recipe


def stage_card(recipe: Recipe, name: str, metrics: dict) -> str:
    cfg, model, lora = getattr(recipe, name), recipe.model, recipe.lora
    bases = [model.llava] if model.llava else [model.vision_tower, model.decoder]
    hub = [b for b in bases if is_hub_id(b) and not Path(b).exists()]
    header = (
        ["---"]
        + ([f"base_model: [{', '.join(hub)}]"] if hub else [])
        + (["library_name: peft"] if name == "stage2" else [])
        + ["pipeline_tag: image-text-to-text", "tags: [llava, qllava, qlora]", "---", ""]
    )
    if name == "stage2":
        what = (
            f"LoRA adapter (r {lora.r}, alpha {lora.lora_alpha}, dropout {lora.lora_dropout}, on the decoder's "
            f"{', '.join(lora.target_modules)}) and the MLP projector (`projector.safetensors`), trained by LLaVA "
            "visual instruction tuning on the 4-bit decoder (QLoRA)"
        )
    else:
        what = (
            "The MLP projector (`projector.safetensors`), trained by LLaVA alignment: vision tower and decoder frozen"
        )
    base = (
        [f"- llava checkpoint: `{model.llava}`"]
        if model.llava
        else [
            f"- vision tower: `{model.vision_tower}` (layer {model.vision_feature_layer}, "
            f"{model.vision_feature_select_strategy} features)",
            f"- decoder: `{model.decoder}`",
        ]
    )
    q = recipe.quantization
    quantized = (
        f"{q.bnb_4bit_quant_type} 4-bit{', double quant' if q.bnb_4bit_use_double_quant else ''}, "
        f"{q.bnb_4bit_compute_dtype} compute"
        if q.load_in_4bit
        else "not quantized"
    )
    data = metrics.get("data", {})
    skipped = sum(data.get("skipped", {}).values())
    loss = (
        f"{metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f}"
        if metrics.get("first_loss") is not None
        else "not logged"
    )
    projector_lr = f", projector {cfg.projector_lr:g}" if name == "stage2" and cfg.projector_lr else ""
    lines = header + [
        f"# {recipe.run_dir.name}: {name}",
        "",
        what + ".",
        "",
        "## Base models",
        "",
        *base,
        f"- decoder weights while training: {quantized}",
        "",
        "## Data",
        "",
        f"- files: {', '.join(f'`{d}`' for d in cfg.data)}"
        + (f", images in `{cfg.image_folder}`" if cfg.image_folder else ""),
        f"- template `{cfg.template}`, images `{cfg.image_aspect_ratio}`, at most {cfg.max_seq_len} tokens a sample"
        f"{', packed' if cfg.packing else ''}",
        f"- {data.get('used', 0):,} samples used ({data.get('with_image', 0):,} with an image), {skipped:,} skipped; "
        f"{data.get('tokens', 0):,} tokens ({data.get('label_tokens', 0):,} trained)",
        "",
        "## Training",
        "",
        f"- {metrics.get('steps', '?')} optimizer steps of {cfg.per_device_train_batch_size} x "
        f"{cfg.gradient_accumulation_steps} rows (per device x accumulation), learning rate {cfg.learning_rate:g}"
        f"{projector_lr}, {cfg.lr_scheduler_type} schedule, warmup {cfg.warmup_ratio:g}, {cfg.optim}, seed {cfg.seed}",
        f"- training loss {loss}, {metrics.get('train_seconds', 0):.0f} s, attention "
        f"{metrics.get('attn_implementation', '?')}{_resumed(metrics.get('resumed_at'))}",
        "- the resolved recipe: `recipe.toml` in this folder; every figure: `metrics.json`",
        "",
        "## Use",
        "",
        "This folder is not a whole model: it needs the base models above. With qllava, on the run folder:",
        "",
        "```bash",
        "# talk about an image",
        f"qllava chat {recipe.run_dir} --image IMAGE",
        "# a plain transformers LLaVA checkpoint",
        f"qllava merge {recipe.run_dir} --out MERGED",
        "# score it on a benchmark",
        f"qllava eval {recipe.run_dir} --benchmark vqa --data QUESTIONS --images FOLDER",
        "```",
        "",
    ]
    return "\n".join(lines)


def _resumed(steps) -> str:
    """Where training was interrupted and continued from a checkpoint (the time counts every segment)."""
    if not steps:
        return ""
    return f"; continued from a checkpoint at step {', '.join(map(str, steps))} (the time adds up every segment)"
