"""Memory and time of loading a Mistral-7B-shaped decoder in NF4 on CPU, through qllava's loader.

Writes a random-weight checkpoint with Mistral-7B's real shapes (bf16, three safetensors shards of <= 5 GB, 14.5
GB; written shard by shard, so writing it needs ~5 GB of RAM), then loads it in a child process per way:

  mapped    AutoModelForCausalLM.from_pretrained(..., quantization_config=NF4) as transformers does it by default:
            every shard memory-mapped (what qllava did before benchmarks/load_7b.py existed)
  qllava    qllava.model.load_decoder: the same call, with the checkpoint read through safetensors' pread backend
            (model.unmapped_checkpoints), so nothing is mapped

and reports, per way, the wall time, the peak resident memory (RSS: what `top`, a memory monitor or a container
limit sees; the largest of the child's own ru_maxrss and of RSS sampled every 0.1 s), its peaks apart in
anonymous memory (the process's own allocations) and in resident pages of mapped files (sampled from
/proc/PID/status), and the size of the loaded model. Last line: JSON.

  .venv/bin/python benchmarks/load_7b.py [--work DIR] [--keep]   # ~10 minutes on 2 cores; ~16 GB of disk
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.merge_7b import MISTRAL_7B  # noqa: E402

SHARD_BYTES = 5 * 10**9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/qllava_load7b")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--ways", nargs="+", default=["mapped", "qllava"], choices=["mapped", "qllava"])
    args = parser.parse_args()
    folder = Path(args.work) / "mistral-7b-shaped"
    if not (folder / "model.safetensors.index.json").exists():
        started = time.perf_counter()
        _run(f"from benchmarks.load_7b import write_checkpoint; write_checkpoint({str(folder)!r})")
        print(f"wrote a {checkpoint_gb(folder):.1f} GB checkpoint in {time.perf_counter() - started:.0f} s", flush=True)
    results = {way: measure(way, folder) for way in args.ways}
    print(
        f"{'load NF4, 7B-shaped, CPU':26s} {'wall s':>7s} {'peak RSS GB':>12s} {'anonymous GB':>13s} "
        f"{'file-mapped GB':>15s} {'model GB':>9s}"
    )
    for way, r in results.items():
        print(
            f"{way:26s} {r['seconds']:7.0f} {r['peak_rss_gb']:12.1f} {r['peak_anonymous_gb']:13.1f} "
            f"{r['peak_file_mapped_gb']:15.1f} {r['model_gb']:9.2f}"
        )
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(
        json.dumps(
            {
                "checkpoint_gb": results[args.ways[0]]["checkpoint_gb"],
                **{f"{way}_{k}": v for way, r in results.items() for k, v in r.items() if k != "checkpoint_gb"},
            }
        )
    )


def write_checkpoint(folder: str) -> None:
    """Mistral-7B's tensors with random bf16 values, in shards of <= 5 GB, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = MistralConfig(**MISTRAL_7B, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in MistralForCausalLM(config).state_dict().items()}
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for k, names in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        del tensors
    total = sum(2 * s.numel() for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(folder)


def checkpoint_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9


LOAD = """
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from qllava import model as modeling
nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"])
started = time.perf_counter()
if sys.argv[2] == "mapped":
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, quantization_config=nf4,
                                                 attn_implementation="sdpa")
else:
    model = modeling.load_decoder(sys.argv[1], torch.bfloat16, nf4, "sdpa")
seconds = time.perf_counter() - started
size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
print(json.dumps({"seconds": seconds, "model_gb": size / 1e9,
                  "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}))
"""


def measure(way: str, folder: Path) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen(
        [sys.executable, "-c", LOAD, str(folder), way],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def watch():
        status = Path(f"/proc/{child.pid}/status")
        while not stop.is_set():
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
            except OSError:
                return
            if "VmRSS" not in fields:  # exited, not yet reaped
                return
            for key in peaks:
                peaks[key] = max(peaks[key], int(fields[key].split()[0]) * 1024)
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = child.communicate()
    stop.set()
    watcher.join()
    if child.returncode:
        raise SystemExit(f"loading ({way}) failed:\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    rss = max(peaks["VmRSS"] / 1e9, report["max_rss_gb"])
    return {
        "seconds": round(report["seconds"], 1),
        "peak_rss_gb": round(rss, 2),
        "peak_anonymous_gb": round(peaks["RssAnon"] / 1e9, 2),
        "peak_file_mapped_gb": round(peaks["RssFile"] / 1e9, 2),
        "model_gb": round(report["model_gb"], 2),
        "checkpoint_gb": round(checkpoint_gb(folder), 2),
    }


def _run(code: str) -> None:
    subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"],
        check=True,
        cwd=ROOT,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


if __name__ == "__main__":
    main()
