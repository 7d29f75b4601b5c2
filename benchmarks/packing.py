"""Packing benchmark: TRL's stock VLM SFT path (padded batches) against qllava's packed rows.

Same tiny LLaVA, same samples, same LoRA + projector training, in one process, repeats alternating
A B A B so that machine noise hits both alike:

  A  TRL as its docs show it: SFTTrainer + LlavaProcessor (with a chat template marking the assistant turns)
     + a dataset of `messages`/`images`, TRL's own collator, padded batches of --batch samples.
  B  qllava: the same samples as LLaVA JSON, tokenized once (timed, with an empty cache), packed into rows of
     --max-seq-len tokens, rows per step chosen so a step holds about as many real tokens as A's step.

The model: CLIP vision tower (2 layers, 168 px, patch 14 -> 144 image tokens per image: LLaVA-1.5's 576
scaled by 1/4, like every length here) -> MLP projector -> Mistral-family decoder with hidden 256,
4 layers, 8 heads (float32; LoRA r16 on all decoder linears, the projector trained in full).

The length mix imitates llava_v1_5_mix665k at 1/4 scale. 94% of samples have an image (144 tokens) and
1-4 question/answer turns: 55% short VQA-style ones (log-normal text, median 40 words, like the merged
VQAv2/GQA/OCR-VQA question lists) and 45% longer instruct/region ones (median 90 words, like LLaVA-Instruct,
RefCOCO, VG), sigma 0.7, at most 340 words; 6% are text-only chats like LLaVA's 40K ShareGPT ones, split
to fit the context as Vicuna's are, so many sit near the limit (median 380 words, sigma 0.5, at most 490).
Rows hold 512 tokens (2048 / 4); no sample is longer. (Words are single tokens of the tiny tokenizer.)

Precision: both runs compute in float32 by default. TRL's SFTConfig turns on bf16 autocast by default, even
on CPU, and on a CPU with AMX-BF16 that alone makes A's matmuls cheaper than B's float32 ones: that would
compare precisions, not batching. A is therefore set to bf16=False. `--bf16` runs both under bf16 autocast
instead (TRL's default for A; B's trainer is switched the same way), as a cross-check.

Prints a table and, last, one JSON line:
  trl_tokens_per_s, qllava_tokens_per_s, speedup (A's wall time / B's for the same samples),
  trl_pad_fraction, qllava_pad_fraction, packed_vs_unpacked_max_rel_err, precision.

  .venv/bin/python benchmarks/packing.py            # about 1.5 minutes on 2 CPU cores (--bf16: the cross-check)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qllava import model as modeling  # noqa: E402
from qllava import tiny, train
from qllava.packing import Collator, packed_vs_unpacked_error  # noqa: E402
from qllava.recipe import recipe_from_dict  # noqa: E402

WORDS = (
    "the a red blue green small large cat dog tree car sign road sky water person table chair window "
    "left right top bottom near far behind front holding wearing sitting standing looking what where which "
    "color shape many how is are there this image picture shows answer question word phrase number two three "
    "four five one yes no bus train plane boat street building house grass snow food plate cup"
).split()
VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=168, patch_size=14
)
DECODER = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)
CHAT_TEMPLATE = (  # mistral_instruct, with generation markers so TRL can train on the assistant turns only
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    " [/INST]{% else %} {% generation %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %} </s>"
    "{% endgeneration %}{% endif %}{% endfor %}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--batch", type=int, default=16, help="samples per step in TRL's padded run (LLaVA-1.5's per-device batch)"
    )
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="both runs under bf16 autocast (default: both float32)")
    args = parser.parse_args()
    precision = "bf16-autocast" if args.bf16 else "float32"
    if args.bf16:
        bf16_autocast_for_qllava()
    quiet()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="qllava_bench_"))
    samples = write_dataset(work, args.samples, args.seed)
    checkpoint = write_llava_checkpoint(work, samples, args.seed)
    lengths = token_lengths(checkpoint, work, args)
    rows_per_step = max(1, round(args.batch * statistics.mean(lengths) / args.max_seq_len))
    print(f"precision in both runs: {precision}")
    print(
        f"{args.samples} samples, {sum(lengths):,} tokens (mean {statistics.mean(lengths):.0f}, "
        f"max {max(lengths)}); TRL: {args.batch} samples per step; qllava: {rows_per_step} rows of "
        f"{args.max_seq_len} tokens per step"
    )

    runs = {"trl": [], "qllava": []}
    for repeat in range(args.repeats):
        for name, run in (("trl", run_trl), ("qllava", run_qllava)):
            gc.collect()  # the previous run's trainer, model and data must not weigh on this one
            result = run(checkpoint, work, samples, args, rows_per_step, repeat)
            runs[name].append(result)
            print(
                f"  repeat {repeat + 1} {name:6s}: {result['seconds']:6.1f} s  "
                f"{result['tokens'] / result['seconds']:8,.0f} tokens/s  pad {result['pad_fraction']:.1%}  "
                f"steps {result['steps']}  label tokens {result['label_tokens']:,}"
            )
    err = exactness(checkpoint, work, args)
    report(runs, err, precision)


def write_dataset(work: Path, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    (work / "images").mkdir()
    samples = []
    for i in range(n):
        has_image = rng.random() >= 0.06
        if has_image:  # short VQA-style conversations, or longer instruct / region ones
            words = min(340, max(6, int(rng.lognormvariate(math.log(40 if rng.random() < 0.55 else 90), 0.7))))
        else:  # ShareGPT-like text-only chats, split to fit the context as Vicuna's are: many near the limit
            words = min(490, max(16, int(rng.lognormvariate(math.log(380), 0.5))))
        turns = rng.randint(1, min(4, max(1, words // 10)))
        conversation = []
        for t in range(turns):
            share = words // turns
            question = " ".join(rng.choice(WORDS) for _ in range(max(2, share // 4))) + "?"
            answer = " ".join(rng.choice(WORDS) for _ in range(max(1, share - share // 4)))
            conversation += [
                {"from": "human", "value": ("<image>\n" if has_image and t == 0 else "") + question},
                {"from": "gpt", "value": answer},
            ]
        sample = {"id": f"s{i}", "conversations": conversation}
        if has_image:
            sample["image"] = f"{i}.png"
            colour = tuple(rng.randrange(256) for _ in range(3))
            Image.new("RGB", (rng.randint(120, 220), rng.randint(120, 220)), colour).save(work / "images" / f"{i}.png")
        samples.append(sample)
    (work / "data.json").write_text(json.dumps(samples))
    return samples


def write_llava_checkpoint(work: Path, samples: list[dict], seed: int) -> Path:
    """Tiny vision tower + decoder, assembled by qllava, saved as one llava-hf checkpoint both runs load."""
    texts = [t["value"].replace("<image>\n", "") for s in samples for t in s["conversations"]]
    tiny.write_vision_tower(work / "clip", seed, **VISION)
    tiny.write_decoder(work / "decoder", "mistral", texts, seed, **DECODER)
    recipe = bench_recipe(work, {"vision_tower": str(work / "clip"), "decoder": str(work / "decoder")}, 8, 512, 0)
    processor = modeling.build_processor(recipe.model)
    torch.manual_seed(seed)
    model = modeling.load_base_model(recipe, processor, quantized=False)
    model.save_pretrained(work / "llava")
    processor.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(work / "llava")
    return work / "llava"


def bench_recipe(work: Path, model_table: dict, rows: int, max_seq_len: int, repeat: int):
    return recipe_from_dict(
        {
            "model": {**model_table, "dtype": "float32", "attn_implementation": "sdpa"},
            "quantization": {"load_in_4bit": False},
            "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
            "stage1": {"data": [str(work / "data.json")], "image_folder": str(work / "images")},
            "stage2": {
                "data": [str(work / "data.json")],
                "image_folder": str(work / "images"),
                "template": "mistral_instruct",
                "max_seq_len": max_seq_len,
                "packing": True,
                "learning_rate": 1e-4,
                "projector_lr": 1e-4,
                "projector": "model" if "llava" in model_table else "fresh",
                "num_train_epochs": 1,
                "per_device_train_batch_size": rows,
                "gradient_checkpointing": False,
                "logging_steps": 1000,
                "save_steps": 0,
                "warmup_ratio": 0.0,
                "lr_scheduler_type": "constant",
            },
            "data": {"cache_dir": str(work / f"cache-{repeat}")},
            "output": {"dir": str(work / f"run-{repeat}")},
        }
    )


def token_lengths(checkpoint: Path, work: Path, args) -> list[int]:
    from qllava.data import build_stage_dataset

    recipe = bench_recipe(work, {"llava": str(checkpoint)}, 1, args.max_seq_len, "lengths")
    processor = modeling.build_processor(recipe.model)
    tokenizer = processor.tokenizer
    config = modeling.load_llava_config(recipe.model)
    dataset, _, report = build_stage_dataset(
        recipe.stage2,
        tokenizer,
        config.image_token_id,
        modeling.image_geometry(config, processor.image_processor),
        recipe.data.cache_dir,
        "stage2",
    )
    if report.skipped:
        raise SystemExit(f"benchmark data lost samples: {dict(report.skipped)}")
    return list(dataset["length"])


def run_trl(checkpoint: Path, work: Path, samples: list[dict], args, rows_per_step: int, repeat: int) -> dict:
    """TRL's documented VLM path: messages + images, LlavaProcessor, TRL's collator, peft_config."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoProcessor, LlavaForConditionalGeneration, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(checkpoint)
    dataset = datasets.Dataset.from_list([trl_example(s, work) for s in samples])
    config = SFTConfig(
        output_dir=str(work / f"trl-{repeat}"),
        per_device_train_batch_size=args.batch,
        num_train_epochs=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        max_length=None,
        assistant_only_loss=True,
        activation_checkpointing=False,
        bf16=args.bf16,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=r".*language_model\..*\.(q_proj|k_proj|v_proj|"
        r"o_proj|gate_proj|up_proj|down_proj)",
        modules_to_save=["multi_modal_projector"],
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor, peft_config=lora)
    trainer.remove_callback(PrinterCallback)
    counter = PadCounter(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": counter.tokens,
        "label_tokens": counter.label_tokens,
        "pad_fraction": 1 - counter.tokens / counter.slots,
        "steps": trainer.state.global_step,
    }


def trl_example(sample: dict, work: Path) -> dict:
    messages = []
    for turn in sample["conversations"]:
        text = turn["value"].replace("<image>\n", "")
        content = ([{"type": "image"}] if "<image>" in turn["value"] else []) + [{"type": "text", "text": text}]
        messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": content})
    images = [Image.open(work / "images" / sample["image"]).convert("RGB")] if "image" in sample else []
    return {"messages": messages, "images": images}


class PadCounter:
    """Wraps TRL's collator to count real tokens, label tokens and padded slots."""

    def __init__(self, collator):
        self.collator, self.tokens, self.label_tokens, self.slots = collator, 0, 0, 0

    def __call__(self, examples):
        batch = self.collator(examples)
        self.tokens += int(batch["attention_mask"].sum())
        self.label_tokens += int((batch["labels"] != -100).sum())
        self.slots += batch["attention_mask"].numel()
        return batch


def run_qllava(checkpoint: Path, work: Path, samples: list[dict], args, rows_per_step: int, repeat: int) -> dict:
    start = time.perf_counter()
    recipe = bench_recipe(work, {"llava": str(checkpoint)}, rows_per_step, args.max_seq_len, repeat)
    result = train.run_stage(recipe, "stage2", say=lambda _: None)
    seconds = time.perf_counter() - start
    m = result.metrics
    tokens = m["data"]["tokens"]
    return {
        "seconds": seconds,
        "tokens": tokens,
        "label_tokens": m["data"]["label_tokens"],
        "pad_fraction": m["pad_fraction"],
        "steps": m["steps"],
    }


def bf16_autocast_for_qllava() -> None:
    """qllava trains float32 on CPU by design; for the --bf16 cross-check its trainer gets TRL's bf16 autocast."""
    sft_config = train.SFTConfig
    train.SFTConfig = lambda *a, **k: sft_config(*a, **{**k, "bf16": True})


def exactness(checkpoint: Path, work: Path, args) -> float:
    """Packed vs unpacked loss and gradients on this benchmark's model and data (float32)."""
    from qllava.data import build_stage_dataset

    recipe = bench_recipe(work, {"llava": str(checkpoint)}, 1, args.max_seq_len, "lengths")
    processor = modeling.build_processor(recipe.model)
    config = modeling.load_llava_config(recipe.model)
    dataset, images, _ = build_stage_dataset(
        recipe.stage2,
        processor.tokenizer,
        config.image_token_id,
        modeling.image_geometry(config, processor.image_processor),
        recipe.data.cache_dir,
        "stage2",
    )
    items = [dataset[i] for i in range(6)]
    model = modeling.attach_lora(modeling.load_base_model(recipe, processor, quantized=False), recipe.lora)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.02)
    modeling.projector(model).requires_grad_(True)
    model.train()
    collators = [
        Collator(
            images,
            processor.image_processor,
            "pad",
            processor.tokenizer.pad_token_id,
            config.image_token_id,
            packing=packing,
        )
        for packing in (True, False)
    ]
    return packed_vs_unpacked_error(model, *collators, [[items[:3]], [items[3:5], items[5:]]])


def report(runs: dict, err: float, precision: str) -> None:
    total = {name: sum(r["seconds"] for r in rs) for name, rs in runs.items()}
    tokens = {name: sum(r["tokens"] for r in rs) for name, rs in runs.items()}
    pad = {name: statistics.mean(r["pad_fraction"] for r in rs) for name, rs in runs.items()}
    pairs = [a["seconds"] / b["seconds"] for a, b in zip(runs["trl"], runs["qllava"])]
    print()
    print(f"{'run':28s} {'wall s':>8s} {'tokens/s':>10s} {'pad':>7s} {'label tokens':>13s}")
    for name, label in (("trl", "A  TRL stock VLM (padded)"), ("qllava", "B  qllava packed")):
        print(
            f"{label:28s} {total[name]:8.1f} {tokens[name] / total[name]:10,.0f} {pad[name]:7.1%} "
            f"{runs[name][0]['label_tokens']:13,}"
        )
    print(
        f"speedup (A wall / B wall): {total['trl'] / total['qllava']:.2f}x  (per repeat: "
        f"{', '.join(f'{p:.2f}x' for p in pairs)});  packed vs unpacked max relative error {err:.1e}"
    )
    print(
        json.dumps(
            {
                "trl_tokens_per_s": round(tokens["trl"] / total["trl"], 1),
                "qllava_tokens_per_s": round(tokens["qllava"] / total["qllava"], 1),
                "speedup": round(total["trl"] / total["qllava"], 3),
                "trl_pad_fraction": round(pad["trl"], 4),
                "qllava_pad_fraction": round(pad["qllava"], 4),
                "packed_vs_unpacked_max_rel_err": err,
                "precision": precision,
            }
        )
    )


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


if __name__ == "__main__":
    main()
