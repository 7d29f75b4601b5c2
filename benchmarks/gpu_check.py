"""GPU check: peak memory, tokens/s and MFU of both LLaVA stages with 7B-shaped models, beside `qllava plan`.

Builds models with random weights in the real shapes (no download): the Mistral-7B and Vicuna-7B decoders
from the configs qllava ships, CLIP ViT-L/14-336 as the vision tower; quantizes the decoder's linear layers
to NF4 with bitsandbytes; assembles LLaVA with qllava's own code and trains a few steps of stage 1
(projector) and stage 2 (LoRA r128 + projector) on packed rows of synthetic images (576 image tokens each)
and text, through qllava's collator and trainer, with flash_attention_2 when flash-attn is installed, else
sdpa. Reports per stage: peak allocated and reserved memory, tokens/s, MFU on a 4N basis (N = decoder
matmul parameters; forward 2N + backward through frozen weights 2N, recomputation not counted), and the
plan's prediction with its error, and the traced peak (`qllava plan --trace`: the same stage's step on fake
tensors, for the same worst-case rows: as many of the largest images as fit) with its error against
torch.cuda.max_memory_allocated (reserved beside it). Loading from disk is the one path it does not exercise.

  python3 benchmarks/gpu_check.py                 # on a CUDA machine (its time: not yet measured on a GPU)
  python3 benchmarks/gpu_check.py --dry-run       # on CPU with tiny shapes: the same code, in `make test`
  python3 benchmarks/gpu_check.py --llava-next    # llava-v1.6-mistral-7b's shapes, stage 2 at 4,096 tokens:
                                                  # anyres images of 2,928 tokens (the largest), tiles included

Needs bitsandbytes, TRL, PEFT and datasets besides torch: docs/benchmarks.md says how to add them to a GPU machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qllava import model as modeling  # noqa: E402
from qllava import plan, tiny, trace, train
from qllava.packing import Collator, Rows  # noqa: E402
from qllava.recipe import recipe_from_dict  # noqa: E402

DECODERS = {"mistral": "mistralai/Mistral-7B-Instruct-v0.2", "vicuna": "lmsys/vicuna-7b-v1.5"}
LLAVA_NEXT = "llava-hf/llava-v1.6-mistral-7b-hf"
TINY_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
VISION = "openai/clip-vit-large-patch14-336"
# Dense bf16 tensor-core peaks (TFLOP/s) by device name; --peak-tflops for others.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "T4": 65.0,
}
TINY_DECODER = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=1024,
)
TINY_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing"
    )
    parser.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=list(DECODERS))
    parser.add_argument("--llava-next", action="store_true", help=f"{LLAVA_NEXT}'s shapes (anyres), stage 2")
    parser.add_argument(
        "--tokens", type=int, help="tokens per micro-batch (one packed row; default 2048, 4096 with --llava-next)"
    )
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per stage (the first is warm-up)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, when not in the table")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to check the script on CPU")
    args.tokens = args.tokens or (4096 if args.llava_next else 2048)
    if args.dry_run:
        args.tokens, args.steps = min(args.tokens, 512 if args.llava_next else 256), min(args.steps, 3)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in card), None)
    print(
        f"device: {card}; peak assumed: {peak or 'unknown'} TFLOP/s (bf16 dense); {args.tokens} tokens per "
        f"micro-batch; attention: {modeling.attention_implementation('auto', torch.bfloat16)}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="qllava_gpu_check_") as work:
        for name in ["llava_next"] if args.llava_next else args.decoders:
            recipe = write_recipe(Path(work) / name, name, args)
            counts = plan.count_parameters(recipe)
            for stage in recipe.stages():
                row = measure(recipe, stage, counts, args, Path(work) / name, peak)
                row.update(decoder=name, card=card)
                rows.append(row)
                print(json.dumps(row), flush=True)
    report(rows, card, peak)


def stage_settings(args) -> dict:
    """What both stages of every recipe here share: packed rows of --tokens, one per micro-batch, --steps steps."""
    return {
        "data": ["synthetic"],
        "max_seq_len": args.tokens,
        "per_device_train_batch_size": 1,
        "max_steps": args.steps,
        "logging_steps": 1,
        "save_steps": 0,
        "gradient_checkpointing": True,
        "warmup_ratio": 0.0,
    }


def write_recipe(folder: Path, name: str, args):
    """Config-only checkpoint folders (and a tokenizer) for the plan and the processor; no weights."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    if name == "llava_next":
        return write_next_recipe(folder, args)
    text = modeling._config(DECODERS[name])
    vision = modeling._config(VISION)
    if args.dry_run:  # the same architectures, tiny
        text = type(text)(**{**text.to_dict(), **TINY_DECODER})
        vision = CLIPVisionConfig(**{**vision.to_dict(), **TINY_VISION})
    (folder / "decoder").mkdir(parents=True)
    text.save_pretrained(folder / "decoder")
    tiny.build_tokenizer(["a picture of a red square", "what is in the image"]).save_pretrained(folder / "decoder")
    vision.save_pretrained(folder / "vision")
    CLIPImageProcessor(
        size={"shortest_edge": vision.image_size}, crop_size={"height": vision.image_size, "width": vision.image_size}
    ).save_pretrained(folder / "vision")
    dtype = "float32" if args.dry_run else "bfloat16"
    stage = stage_settings(args)
    return recipe_from_dict(
        {
            "model": {"vision_tower": str(folder / "vision"), "decoder": str(folder / "decoder"), "dtype": dtype},
            "quantization": {"bnb_4bit_compute_dtype": dtype},
            "lora": {"r": 8 if args.dry_run else 128, "lora_alpha": 16 if args.dry_run else 256},
            "stage1": {**stage, "template": "plain", "learning_rate": 1e-3},
            "stage2": {
                **stage,
                "template": "mistral_instruct",
                "learning_rate": 2e-4,
                "projector_lr": 2e-5,
                "projector": "fresh",
            },
            "output": {"dir": str(folder / "run")},
        }
    )


def write_next_recipe(folder: Path, args):
    """A config-only llava-v1.6-mistral-shaped LLaVA-NeXT folder (tiny, same architecture, for the dry run)."""
    from transformers import CLIPVisionConfig, LlavaNextImageProcessor, LlavaNextProcessor

    config = modeling._config(LLAVA_NEXT)
    tile = config.vision_config.image_size
    if args.dry_run:
        text = type(config.text_config)(**{**config.text_config.to_dict(), **TINY_DECODER})
        vision = CLIPVisionConfig(**{**config.vision_config.to_dict(), **TINY_VISION})
        config = type(config)(
            **{
                **config.to_dict(),
                "text_config": {**text.to_dict(), "vocab_size": 1024},
                "vision_config": vision.to_dict(),
                "image_grid_pinpoints": TINY_PINPOINTS,
                "image_token_index": 1000,
            }
        )
        tile = vision.image_size
    config.save_pretrained(folder / "llava")
    tokenizer = tiny.build_tokenizer(["a picture of a red square", "what is in the image"])
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    ).save_pretrained(folder / "llava")
    dtype = "float32" if args.dry_run else "bfloat16"
    stage = stage_settings(args) | {"image_aspect_ratio": "anyres"}
    return recipe_from_dict(
        {
            "model": {"llava": str(folder / "llava"), "dtype": dtype},
            "quantization": {"bnb_4bit_compute_dtype": dtype},
            "lora": {"r": 8 if args.dry_run else 128, "lora_alpha": 16 if args.dry_run else 256},
            "stage1": {**stage, "enabled": False, "template": "plain", "learning_rate": 1e-3},
            "stage2": {
                **stage,
                "template": "mistral_instruct",
                "learning_rate": 2e-4,
                "projector_lr": 2e-5,
                "projector": "model",
            },
            "output": {"dir": str(folder / "run")},
        }
    )


def measure(recipe, stage: str, counts, args, folder: Path, peak_tflops: float | None) -> dict:
    cfg = getattr(recipe, stage)
    processor = modeling.build_processor(recipe.model)
    model = random_model(recipe, processor)
    if stage == "stage2":
        model = modeling.attach_lora(model, recipe.lora)
    for parameter in modeling.projector_parameters(model).values():
        parameter.requires_grad_(True)
    train._trainable_to_float32(model)
    # the rows the trace takes as the worst case (as many of the largest images as fit), so that both count one batch
    traced = trace.trace_stage(recipe, stage, "cuda")
    dataset, images = trace.worst_case_samples(
        recipe,
        stage,
        model,
        processor,
        folder / f"{stage}_rows",
        rows=cfg.per_device_train_batch_size * (args.steps + 2),
    )
    rows = Rows(dataset, cfg.max_seq_len, packing=True, seed=0)
    collator = Collator(
        images,
        processor.image_processor,
        cfg.image_aspect_ratio,
        processor.tokenizer.pad_token_id,
        model.config.image_token_id,
        flatten=model.config._attn_implementation == "flash_attention_2",
    )
    timer = StepTimer()
    trainer = train._build_trainer(
        model, processor, rows, collator, cfg, folder / stage, [timer], train.dataloader_num_workers(None)
    )
    timer.counts = trainer.token_counter.counts
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    allocated = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    reserved = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None
    predicted = plan.estimate(recipe, stage, counts, cfg.max_seq_len)["peak_bytes"]
    n_matmul = counts.decoder_linear + counts.embeddings // 2  # decoder linears + lm_head
    tokens_per_s = timer.tokens_per_second()
    row = {
        "stage": stage,
        "tokens_per_micro_batch": cfg.max_seq_len,
        "steps": trainer.state.global_step,
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_allocated_gib": _gib(allocated),
        "peak_reserved_gib": _gib(reserved),
        "plan_gib": _gib(predicted),
        "traced_gib": _gib(traced["traced_peak_bytes"]),
        "trace_error": round(traced["traced_peak_bytes"] / allocated - 1, 4) if allocated else None,
        "traced_with_allowances_gib": _gib(traced["peak_with_allowances_bytes"]),
        "plan_error": round(predicted / allocated - 1, 4) if allocated else None,
        "mfu": round(tokens_per_s * 4 * n_matmul / (peak_tflops * 1e12), 4) if peak_tflops and allocated else None,
        "attn_implementation": model.config._attn_implementation,
        "nf4_linears": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
    }
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def random_model(recipe, processor):
    """LLaVA with random weights in the recipe's shapes, decoder linears quantized to NF4 in memory."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    cfg = recipe.model
    dtype = getattr(torch, cfg.dtype)
    attn = modeling.attention_implementation(cfg.attn_implementation, dtype)
    device = modeling.device()
    torch.manual_seed(0)
    if cfg.llava:  # LLaVA-NeXT, whole from its config
        config = modeling.load_llava_config(cfg)
        with torch.device(device):
            model = modeling.llava_class(config)._from_config(config, dtype=dtype, attn_implementation=attn)
        quantize_(model.model.language_model, recipe.quantization, device)
        return modeling.frozen(model)
    with torch.device(device):
        decoder = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(cfg.decoder), dtype=dtype, attn_implementation=attn
        )
        vision = CLIPVisionModel._from_config(
            CLIPVisionConfig.from_pretrained(cfg.vision_tower), dtype=dtype, attn_implementation=attn
        )
    quantize_(decoder.model, recipe.quantization, device)
    return modeling.frozen(modeling.assemble(vision, decoder, processor.tokenizer, cfg, attn))


def quantize_(decoder, q, device) -> None:
    """Every linear layer of the decoder's blocks to bitsandbytes NF4 (what from_pretrained does while loading)."""
    import bitsandbytes as bnb

    compute = getattr(torch, q.bnb_4bit_compute_dtype)
    for parent in list(decoder.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute,
                    compress_statistics=q.bnb_4bit_use_double_quant,
                    quant_type=q.bnb_4bit_quant_type,
                    device="meta",
                )
                layer.weight = bnb.nn.Params4bit(
                    child.weight.data,
                    requires_grad=False,
                    quant_type=q.bnb_4bit_quant_type,
                    compress_statistics=q.bnb_4bit_use_double_quant,
                    module=layer,
                )
                setattr(parent, name, layer.to(device))


class StepTimer(train.TrainerCallback):
    """Tokens per second over the steps after the first (which pays for warm-up and kernel selection)."""

    counts = None
    """The trainer's token counts (its TokenCounter's), set once the trainer exists."""

    def __init__(self):
        self.start, self.tokens_at_start = None, 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start, self.tokens_at_start = time.perf_counter(), self.counts.tokens

    def on_train_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.end, self.tokens_at_end = time.perf_counter(), self.counts.tokens

    def tokens_per_second(self) -> float:
        if self.start is None:
            return 0.0
        return (self.tokens_at_end - self.tokens_at_start) / max(self.end - self.start, 1e-9)


def report(rows: list[dict], card: str, peak: float | None) -> None:
    print()
    print(
        f"{'decoder':8s} {'stage':7s} {'tokens/s':>9s} {'MFU':>6s} {'alloc GiB':>10s} {'reserved GiB':>13s} "
        f"{'traced GiB':>11s} {'trace err':>10s} {'plan GiB':>9s} {'plan err':>9s}"
    )
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        err = f"{r['plan_error']:+.1%}" if r["plan_error"] is not None else "-"
        terr = f"{r['trace_error']:+.1%}" if r["trace_error"] is not None else "-"
        print(
            f"{r['decoder']:8s} {r['stage']:7s} {r['tokens_per_s']:9,.0f} {mfu:>6s} "
            f"{r['peak_allocated_gib'] or '-':>10} {r['peak_reserved_gib'] or '-':>13} {r['traced_gib']:>11} "
            f"{terr:>10s} {r['plan_gib']:>9} {err:>9s}"
        )
    print(json.dumps({"card": card, "peak_tflops": peak, "rows": rows}))


def _gib(value) -> float | None:
    return round(value / 2**30, 3) if value is not None else None


if __name__ == "__main__":
    main()
