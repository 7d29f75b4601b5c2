"""Data at real scale: preparing a llava_v1_5_mix665k-shaped mix, and how fast the collator feeds a GPU.

Writes a mix shaped like llava_v1_5_mix665k at 20,000 and 100,000 samples (deterministic; the 20K mix is the
first 20K samples of the 100K one), then runs `qllava data stats` on each in a child process with an empty
cache, with the real Mistral-7B v0.1 tokenizer (from mistral-common) and CLIP ViT-L/14-336 geometry (576 image
tokens per image), and measures:

  - wall time of the whole command (Python start and imports included) and per added sample;
  - peak memory of the command's process tree, sampled every 0.1 s: resident (RSS, summed over processes) and
    proportional (PSS: pages shared between processes counted once), plus the main process's own peak RSS;
  - the size of the tokenized cache.

From the two sizes it extrapolates linearly to the real mix (665,298 samples). Then it measures the
collator's throughput (samples/s) on packed rows of the 20K mix with COCO-like 640x480 JPEGs, LLaVA's
pad-to-square and CLIP preprocessing at 336 px, with 0 and 2 DataLoader workers.

The mix: 80% image conversations (1-8 question/answer turns: short VQA-style answers, or longer instruct
answers), 20% long text-only chats (ShareGPT-like, some beyond 2048 tokens and so skipped, as LLaVA's
are split to fit). Text is English-like prose drawn from a fixed word list.

  .venv/bin/python benchmarks/data_scale.py [--sizes 20000 100000] [--work DIR] [--skip-collator]

Last line: one JSON object. Needs ~7 GB of RAM (the unchanged tokenizer's 100K run), ~2 GB of disk; a few
minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL_MIX = 665_298
WORDS = (
    "the a an of to and in is are was on with for at by from this that these those it its there here "
    "man woman person people child dog cat horse bird car bus train truck bicycle street road sign light "
    "table chair plate cup bowl pizza sandwich food kitchen room window door wall floor bed couch picture "
    "image photo scene background foreground left right top bottom middle front behind near next above "
    "below red blue green yellow white black brown orange gray small large tall short old young two three "
    "four several many some one sitting standing walking holding wearing looking riding eating playing "
    "parked open closed bright dark wooden metal glass clear cloudy sunny because which while however also "
    "likely appears seems suggests possibly various different important typically usually describe explain "
    "what where why how who when could would should can will may might number color shape text written "
    "reads says shows contains include including between during after before water grass tree trees sky "
    "building buildings city field beach snow mountain ocean river boat plane airport station market"
).split()
PUNCT = [".", ",", "?", "!", ";", ":"]
TINY = 2  # images written for real; the rest are hard links to them (distinct paths, one decode cost)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--work", default="/tmp/qllava_data_scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-collator", action="store_true")
    parser.add_argument("--collator-seconds", type=float, default=20.0, help="time spent per worker setting")
    parser.add_argument("--keep", action="store_true", help="keep the written mixes and caches")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    assets = write_assets(work, max(args.sizes), args.seed)
    results = []
    for n in sorted(args.sizes):
        data = write_mix(work, n, args.seed)
        recipe = write_recipe(work, assets, data, n)
        result = measure_stats(recipe, work / f"cache_{n}", n)
        results.append(result)
        print(
            f"{n:>9,} samples: {result['wall_s']:6.1f} s wall, peak RSS {result['peak_rss_gb']:5.2f} GB "
            f"(PSS {result['peak_pss_gb']:5.2f} GB, main process {result['main_rss_gb']:5.2f} GB), "
            f"cache {result['cache_gb']:.3f} GB, {result['samples_used']:,} used",
            flush=True,
        )
    summary = extrapolate(results) if len(results) > 1 else {"sizes": args.sizes}
    if len(results) > 1:
        print_table(results, summary)
    if not args.skip_collator:
        smallest = sorted(args.sizes)[0]
        recipe = work / f"recipe_{smallest}.toml"
        for workers in (0, 2):
            rate = collator_throughput(recipe, work / f"cache_{smallest}", workers, args.collator_seconds)
            summary[f"collator_samples_per_s_{workers}_workers"] = rate["samples_per_s"]
            print(
                f"collator, {workers} workers: {rate['samples_per_s']:.1f} samples/s "
                f"({rate['images_per_s']:.1f} images/s, {rate['batches']} batches)",
                flush=True,
            )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))


# ---- the mix ----------------------------------------------------------------------------------------------


def prose(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        word = rng.choice(WORDS)
        if i == 0 or out[-1].endswith((".", "?", "!")):
            word = word.capitalize()
        if rng.random() < 0.03:
            word = str(rng.randint(0, 2024))
        if rng.random() < 0.08:
            word += rng.choice(PUNCT)
        out.append(word)
    return " ".join(out) + "."


def sample(i: int, seed: int) -> dict:
    """Sample i of the mix, the same whatever the mix's size."""
    rng = random.Random(seed * 1_000_003 + i)
    if rng.random() < 0.2:  # ShareGPT-like text-only chat: long, a few turns
        words = int(min(2200, max(60, rng.lognormvariate(5.1, 0.8))))
        turns = rng.randint(1, 6)
        conversation = []
        for _ in range(turns):
            share = words // turns
            conversation += [
                {"from": "human", "value": prose(rng, max(4, share // 5))},
                {"from": "gpt", "value": prose(rng, max(8, share - share // 5))},
            ]
        return {"id": f"sharegpt_{i}", "model": "", "conversations": conversation}
    turns = 1 + min(7, int(rng.expovariate(0.6)))
    vqa = rng.random() < 0.6
    conversation = []
    for t in range(turns):
        question = prose(rng, rng.randint(3, 9)).rstrip(".") + "?"
        if vqa:
            answer = prose(rng, rng.randint(1, 3)).rstrip(".")
        else:
            answer = prose(rng, int(min(300, max(3, rng.lognormvariate(2.4, 0.8)))))
        conversation += [
            {"from": "human", "value": ("<image>\n" if t == 0 else "") + question},
            {"from": "gpt", "value": answer},
        ]
    return {"id": f"{i:09d}", "image": image_path(i), "conversations": conversation}


def image_path(i: int) -> str:
    return f"coco/train2017/{i:012d}.jpg"


def write_mix(work: Path, n: int, seed: int) -> Path:
    path = work / f"mix_{n}.json"
    with path.open("w") as f:
        f.write("[\n")
        for i in range(n):
            f.write(("," if i else "") + json.dumps(sample(i, seed)) + "\n")
        f.write("]\n")
    return path


def coco_like_jpegs(folder: Path, seed: int) -> list[Path]:
    """640x480 JPEGs with photo-like detail (smooth colour fields plus grain), ~100-150 KB each, like COCO's."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for k in range(TINY):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((640, 480), Image.BICUBIC), dtype=np.int16)
        grain = rng.normal(0, 18, base.shape)
        pixels = np.clip(base + grain, 0, 255).astype(np.uint8)
        path = folder / f"source_{k}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def write_assets(work: Path, n_max: int, seed: int) -> dict:
    """Tokenizer + Mistral-7B config, CLIP ViT-L/14-336 config + image processor, and the image folder."""
    import mistral_common
    from transformers import CLIPImageProcessor

    decoder, vision, images = work / "mistral-7b-v0.1", work / "clip-vit-large-patch14-336", work / "images"
    for folder in (decoder, vision, images / "coco" / "train2017"):
        folder.mkdir(parents=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", decoder / "tokenizer.model")
    (decoder / "tokenizer_config.json").write_text(
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
    configs = ROOT / "qllava" / "configs"
    shutil.copy(configs / "mistral-7b-v0.1.json", decoder / "config.json")
    shutil.copy(configs / "clip-vit-large-patch14-336.json", vision / "config.json")
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(vision)
    sources = coco_like_jpegs(work, seed)
    for i in range(n_max):  # every image sample has its own path, as COCO's do
        os.link(sources[i % TINY], images / image_path(i))
    return {"decoder": decoder, "vision": vision, "images": images}


def write_recipe(work: Path, assets: dict, data: Path, n: int) -> Path:
    path = work / f"recipe_{n}.toml"
    path.write_text(f"""
[model]
vision_tower = "{assets["vision"]}"
decoder = "{assets["decoder"]}"
[stage1]
data = ["{data}"]
image_folder = "{assets["images"]}"
[stage2]
data = ["{data}"]
image_folder = "{assets["images"]}"
template = "mistral_instruct"
max_seq_len = 2048
per_device_train_batch_size = 4
[data]
cache_dir = "{work / f"cache_{n}"}"
[output]
dir = "{work / "run"}"
""")
    return path


# ---- measuring --------------------------------------------------------------------------------------------


def measure_stats(recipe: Path, cache: Path, n: int) -> dict:
    """`qllava data stats --stage 2` in a child process with an empty cache: wall time, peak memory, cache size."""
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "qllava", "data", "stats", str(recipe), "--stage", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peaks = {"rss": 0, "pss": 0}
    stop = threading.Event()

    def watch():
        parent = psutil.Process(child.pid)
        while not stop.is_set():
            try:
                tree = [parent] + parent.children(recursive=True)
                rss = pss = 0
                for p in tree:
                    try:
                        full = p.memory_full_info()
                        rss, pss = rss + full.rss, pss + full.pss
                    except psutil.Error:
                        pass
                peaks["rss"], peaks["pss"] = max(peaks["rss"], rss), max(peaks["pss"], pss)
            except psutil.Error:
                return
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    stop.set()
    watcher.join()
    if status:
        raise SystemExit(f"qllava data stats failed on {n} samples:\n{output[-3000:]}")
    used = re.search(r"samples used\W+([\d,]+)", output)
    cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    prepared = [line for line in output.splitlines() if "prepar" in line.lower()]
    seconds = re.search(r"data prepared in ([\d.]+) s", output)
    return {
        "samples": n,
        "samples_used": int(used[1].replace(",", "")) if used else 0,
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(peaks["rss"] / 1e9, 3),
        "peak_pss_gb": round(peaks["pss"] / 1e9, 3),
        "main_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),
        "cache_gb": round(cache_bytes / 1e9, 4),
        "prepare_s": float(seconds[1]) if seconds else None,
        "printed": prepared,
    }


def extrapolate(results: list[dict]) -> dict:
    """Linear in the number of samples between the two largest sizes, extended to the real mix."""
    small, large = results[-2], results[-1]
    added = large["samples"] - small["samples"]
    out = {"sizes": [r["samples"] for r in results]}
    for r in results:
        k = r["samples"] // 1000
        out.update(
            {
                f"wall_s_{k}k": r["wall_s"],
                f"peak_rss_gb_{k}k": r["peak_rss_gb"],
                f"peak_pss_gb_{k}k": r["peak_pss_gb"],
                f"cache_gb_{k}k": r["cache_gb"],
            }
        )
    per = {key: (large[key] - small[key]) / added for key in ("wall_s", "peak_rss_gb", "peak_pss_gb", "cache_gb")}
    if large["prepare_s"] is not None:  # what `qllava data stats` itself reports (imports and start-up excluded)
        out["prepare_ms_per_sample"] = round(large["prepare_s"] / large["samples"] * 1e3, 3)
    out["ms_per_sample"] = round(per["wall_s"] * 1e3, 3)
    out["rss_kb_per_sample"] = round(per["peak_rss_gb"] * 1e6, 2)
    out["pss_kb_per_sample"] = round(per["peak_pss_gb"] * 1e6, 2)
    for key in ("wall_s", "peak_rss_gb", "peak_pss_gb", "cache_gb"):
        out[f"{key}_665k"] = round(large[key] + per[key] * (REAL_MIX - large["samples"]), 2)
    return out


def print_table(results: list[dict], summary: dict) -> None:
    print(f"{'samples':>9s} {'wall s':>8s} {'peak RSS GB':>12s} {'peak PSS GB':>12s} {'cache GB':>9s}")
    for r in results:
        print(
            f"{r['samples']:>9,} {r['wall_s']:8.1f} {r['peak_rss_gb']:12.2f} {r['peak_pss_gb']:12.2f} "
            f"{r['cache_gb']:9.3f}"
        )
    print(
        f"{REAL_MIX:>9,} {summary['wall_s_665k']:8.0f} {summary['peak_rss_gb_665k']:12.2f} "
        f"{summary['peak_pss_gb_665k']:12.2f} {summary['cache_gb_665k']:9.3f}  (extrapolated)"
    )
    print(
        f"per added sample: {summary['ms_per_sample']:.3f} ms, {summary['rss_kb_per_sample']:.1f} KB RSS, "
        f"{summary['pss_kb_per_sample']:.1f} KB PSS"
    )
    if "prepare_ms_per_sample" in summary:
        print(
            f"preparation alone (as data stats reports it), largest mix: {summary['prepare_ms_per_sample']:.3f} ms "
            "per sample"
        )
    for r in results:
        for line in r["printed"]:
            print(f"  {r['samples']:,}: {line.strip()}")


def collator_throughput(recipe_path: Path, cache: Path, workers: int, seconds: float) -> dict:
    """Samples/s through the training DataLoader (packed rows, images decoded and preprocessed) for a while."""
    import torch

    from qllava import model as modeling
    from qllava.data import build_stage_dataset
    from qllava.packing import Collator, Rows
    from qllava.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    cfg = recipe.stage2
    processor = modeling.build_processor(recipe.model)
    config = modeling.load_llava_config(recipe.model)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(modeling.IMAGE_TOKEN)
    samples, images, _ = build_stage_dataset(
        cfg,
        processor.tokenizer,
        image_token_id,
        modeling.image_geometry(config, processor.image_processor),
        str(cache),
        "stage2",
    )
    rows = Rows(samples, cfg.max_seq_len, packing=True, seed=cfg.seed)
    collator = Collator(
        images, processor.image_processor, cfg.image_aspect_ratio, processor.tokenizer.pad_token_id, image_token_id
    )

    def collate(batch_rows):  # the training collator, plus how many samples the batch holds
        return collator(batch_rows), sum(len(row) for row in batch_rows)

    loader = torch.utils.data.DataLoader(
        rows, batch_size=cfg.per_device_train_batch_size, collate_fn=collate, num_workers=workers, shuffle=False
    )
    n_samples = n_images = batches = 0
    started = None
    for batch, n in loader:
        if started is None:  # the first batch pays for starting the workers
            started = time.perf_counter()
            continue
        n_samples += n
        n_images += batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
        batches += 1
        if time.perf_counter() - started > seconds:
            break
    wall = time.perf_counter() - started
    return {"samples_per_s": n_samples / wall, "images_per_s": n_images / wall, "batches": batches}


if __name__ == "__main__":
    main()
