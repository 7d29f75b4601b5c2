"""Peak RAM, time and output size of `qllava merge` for a 7B-shaped run, on CPU, without any download.

Writes random-weight checkpoints with the real shapes (Mistral-7B decoder: hidden 4096, 32 layers,
intermediate 14336, 32 heads / 8 KV heads, vocab 32000 with the real Mistral tokenizer from
mistral-common; CLIP ViT-L/14-336 vision tower), a stage-2 run folder with a 1024->4096->4096 projector
and a LoRA r128 adapter on every decoder linear layer (335,544,320 parameters), then runs
`qllava merge RUN --out OUT --dtype bfloat16 --no-verify` in a child process and reports its peak
resident memory: the merge streams the base weight by weight, so that is the streamed merge alone.
Verification is left out: it loads the whole model once (a 7B in bfloat16: about 15 GiB, on the GPU when
there is one) and runs two forward passes of it.

With --check-equal, another child merges the same run the way qllava did before it streamed (the whole
model in memory, peft's merge_and_unload) and checks that every weight written by the stream equals it bit
for bit (it needs about 17 GiB of RAM itself, and reports its own peak).

Needs ~20 GiB of RAM for --check-equal (8 GiB without) and ~32 GiB of disk (~46 with --before); about 10
minutes on 2 cores.

With --before DIR, the qllava of DIR (a checkout of an earlier commit: `git worktree add DIR COMMIT`) merges
the same run first, and the files both write are compared byte for byte; --runs N times this checkout's merge
N times.

  .venv/bin/python benchmarks/merge_7b.py [--work /tmp/qllava_merge7b] [--check-equal] [--keep] [--before DIR]
      [--runs N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MISTRAL_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
TARGETS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/qllava_merge7b")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    parser.add_argument(
        "--check-equal",
        action="store_true",
        help="check the output against merging the whole model in memory (needs ~17 GiB)",
    )
    parser.add_argument(
        "--before",
        metavar="DIR",
        help="also merge with the qllava of DIR (a checkout of an earlier commit), in the same run",
    )
    parser.add_argument("--runs", type=int, default=1, help="how many times to time the streamed merge")
    args = parser.parse_args()
    work = Path(args.work)
    if not (work / "run" / "stage2" / "adapter_model.safetensors").exists():
        shutil.rmtree(work, ignore_errors=True)
        for step in ("decoder", "vision", "run"):
            started = time.perf_counter()
            _child(step, work)
            print(f"wrote the {step} in {time.perf_counter() - started:.0f}s", flush=True)
    print(f"{'merge (bf16, 7B-shaped, CPU)':32s} {'wall s':>8s} {'peak RAM GiB':>13s} {'output GiB':>11s}")
    figures = {}
    if args.before:  # the same merge by the earlier checkout, in the same run
        before = _streamed(work, work / "merged_before", Path(args.before).resolve(), f"streamed ({args.before})")
        figures.update({f"before_{k}": v for k, v in before.items()})
    for _ in range(args.runs):
        figures.update(_streamed(work, work / "merged", ROOT, "streamed, weight by weight"))
        figures.setdefault("merge_seconds_each", []).append(figures["merge_seconds"])
    if args.before:
        figures["same_files_as_before"] = _same_files(work / "merged", work / "merged_before")
        print(f"the files written are byte for byte those {args.before} wrote: {figures['same_files_as_before']}")
        shutil.rmtree(work / "merged_before")
    if args.check_equal:
        figures.update(_check_equal(work))
        print(
            f"every weight equals merging in memory: {figures['equal_to_in_memory_merge']} (that merge: "
            f"{figures['in_memory_seconds']:.0f} s, peak RAM {figures['in_memory_peak_ram_gib']:.1f} GiB)"
        )
    print(json.dumps(figures))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _streamed(work: Path, out: Path, root: Path, label: str) -> dict:
    """`qllava merge` run by the qllava in `root`, in a process of its own: its wall time and peak RAM."""
    code = (
        "import json; from qllava.merge import merge; "
        f"r = merge({str(work / 'run')!r}, {str(out)!r}, dtype='bfloat16', overwrite=True, verify=False, "
        "say=lambda m: None); print(json.dumps(r))"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    report = json.loads(done.stdout.strip().splitlines()[-1])
    peak = report["peak_ram_gib"]  # the merging process's own peak (not the checkpoint writers')
    print(f"{label:32s} {seconds:8.0f} {peak:13.1f} {report['output_bytes'] / 2**30:11.1f}", flush=True)
    return {
        "merge_seconds": round(seconds, 1),
        "peak_ram_gib": round(peak, 2),
        "output_gib": round(report["output_bytes"] / 2**30, 2),
    }


def _same_files(one: Path, other: Path) -> bool:
    """Whether both folders hold the same weight files and index, byte for byte."""
    import filecmp

    names = sorted(p.name for p in one.iterdir() if p.name.startswith("model."))
    return names == sorted(p.name for p in other.iterdir() if p.name.startswith("model.")) and all(
        filecmp.cmp(one / name, other / name, shallow=False) for name in names
    )


def _check_equal(work: Path) -> dict:
    """Merge as qllava did before it streamed (whole model in memory, peft), compare with the streamed output."""
    code = (
        "import json, resource, time; from pathlib import Path; from qllava import model as modeling; "
        "from qllava.merge import check_written; t = time.perf_counter(); "
        f"m = modeling.load_run(Path({str(work / 'run')!r}), quantized=False, dtype='bfloat16')[0]; "
        f"m = m.merge_and_unload(); s = time.perf_counter() - t; check_written(m, Path({str(work / 'merged')!r})); "
        "print(json.dumps({'in_memory_seconds': round(s, 1), 'equal_to_in_memory_merge': True, "
        "'in_memory_peak_ram_gib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(step: str, work: Path) -> None:
    """Each checkpoint is written by its own process, so their memory is gone before the merge runs."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.merge_7b import write_{step}; "
        f"write_{step}(__import__('pathlib').Path({str(work)!r}))"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    )


def _random_(module, std: float = 0.02) -> None:
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=std)


def write_decoder(work: Path) -> None:
    import mistral_common
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    folder = work / "mistral-7b-shaped"
    folder.mkdir(parents=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": True,
            }
        )
    )
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig(**MISTRAL_7B, dtype="bfloat16"))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    _random_(model)
    model.save_pretrained(folder, max_shard_size="2GB")


def write_vision(work: Path) -> None:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    folder = work / "clip-vit-l-336-shaped"
    model = CLIPVisionModel(CLIPVisionConfig(**CLIP_L_336)).to(torch.bfloat16)
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(folder)


def write_run(work: Path) -> None:
    """A stage-2 run folder as `qllava finetune` writes it, with random projector and adapter weights."""
    import torch
    from safetensors.torch import save_file

    from qllava import model as modeling
    from qllava.recipe import recipe_from_dict

    stage = work / "run" / "stage2"
    stage.mkdir(parents=True)
    recipe = recipe_from_dict(
        {
            "model": {
                "vision_tower": str(work / "clip-vit-l-336-shaped"),
                "decoder": str(work / "mistral-7b-shaped"),
                "attn_implementation": "sdpa",
            },
            "stage1": {"data": ["captions.json"]},
            "stage2": {"data": ["chat.json"], "template": "mistral_instruct"},
            "output": {"dir": str(work / "run")},
        }
    )
    (stage / "recipe.toml").write_text(recipe.to_toml())
    modeling.build_processor(recipe.model).save_pretrained(stage)
    h, v = MISTRAL_7B["hidden_size"], CLIP_L_336["hidden_size"]
    save_file(
        {
            "linear_1.weight": torch.randn(h, v) * 0.02,
            "linear_1.bias": torch.zeros(h),
            "linear_2.weight": torch.randn(h, h) * 0.02,
            "linear_2.bias": torch.zeros(h),
        },
        str(stage / modeling.PROJECTOR_FILE),
    )
    r, kv = recipe.lora.r, h // MISTRAL_7B["num_attention_heads"] * MISTRAL_7B["num_key_value_heads"]
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, MISTRAL_7B["intermediate_size"]),
        "up_proj": (h, MISTRAL_7B["intermediate_size"]),
        "down_proj": (MISTRAL_7B["intermediate_size"], h),
    }
    adapter = {}
    for layer in range(MISTRAL_7B["num_hidden_layers"]):
        for block, names in TARGETS.items():
            for name in names:
                n_in, n_out = shapes[name]
                prefix = f"base_model.model.model.language_model.layers.{layer}.{block}.{name}"
                adapter[f"{prefix}.lora_A.weight"] = torch.randn(r, n_in) * 0.01
                adapter[f"{prefix}.lora_B.weight"] = torch.randn(n_out, r) * 0.001
    assert sum(t.numel() for t in adapter.values()) == 335_544_320
    save_file(adapter, str(stage / "adapter_model.safetensors"))
    targets = "|".join(recipe.lora.target_modules)
    (stage / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": r,
                "lora_alpha": recipe.lora.lora_alpha,
                "lora_dropout": recipe.lora.lora_dropout,
                "bias": "none",
                "base_model_name_or_path": None,
                "target_modules": rf".*language_model\..*\.({targets})",
                "modules_to_save": None,
            }
        )
    )
    (stage / "metrics.json").write_text(json.dumps({"stage": "stage2"}))  # written last: the stage is complete


if __name__ == "__main__":
    main()
