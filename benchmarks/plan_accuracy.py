"""plan accuracy: the analytic peak of `qllava plan` against the traced peak of `qllava plan --trace`, per shipped 7B
recipe and stage, at real shapes (fake tensors: no weights, no GPU), and the room each leaves on a 24 GiB card with
the trace's allowances.

  python3 benchmarks/plan_accuracy.py            # about 5 minutes on 2 cores
  python3 benchmarks/plan_accuracy.py --recipes mistral_qlora

Prints one table (recipe x stage: analytic, traced, difference, free on 24 GiB with allowances, trace time), then
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qllava import plan, trace  # noqa: E402
from qllava.recipe import load_recipe  # noqa: E402

RECIPES = ["mistral_qlora", "vicuna_qlora", "scienceqa_mistral", "scienceqa_vicuna", "llava_next_mistral_qlora"]
GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--gpu-memory", type=float, default=24.0, help="GiB")
    args = parser.parse_args()
    rows = []
    for name in args.recipes:
        recipe = load_recipe(ROOT / "recipes" / f"{name}.toml")
        stages = ("stage1", "stage2")  # both, also where a recipe leaves stage 1 off (a user may turn it on)
        analytic = plan.plan(recipe, args.gpu_memory, stages)
        traced = trace.trace(recipe, stages, "cuda", args.gpu_memory)
        for stage, t in traced.items():
            a = analytic["stages"][stage]["peak_bytes"]
            rows.append(
                {
                    "recipe": name,
                    "stage": stage,
                    "tokens_per_micro_batch": t["tokens_per_micro_batch"],
                    "analytic_gib": round(a / GIB, 3),
                    "traced_gib": round(t["traced_peak_bytes"] / GIB, 3),
                    "difference": round(a / t["traced_peak_bytes"] - 1, 4),
                    "with_allowances_gib": round(t["peak_with_allowances_bytes"] / GIB, 3),
                    "free_gib": round(t["free_bytes"] / GIB, 3),
                    "op_at_peak": t["op_at_peak"]["op"],
                    "trace_seconds": t["trace_seconds"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        f"| recipe | stage | tokens/micro-batch | analytic GiB | traced GiB | difference | with allowances GiB | "
        f"free on {args.gpu_memory:g} GiB | trace time |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['recipe']} | {r['stage']} | {r['tokens_per_micro_batch']:,} | {r['analytic_gib']:.2f} | "
            f"{r['traced_gib']:.2f} | {r['difference']:+.1%} | {r['with_allowances_gib']:.2f} | "
            f"{r['free_gib']:.2f} | {r['trace_seconds']:.0f} s |"
        )
    print(json.dumps({"gpu_memory_gib": args.gpu_memory, "rows": rows}))


if __name__ == "__main__":
    main()
