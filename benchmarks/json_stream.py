"""Reading a LLaVA JSON list as a stream: seconds, samples/s and memory on a llava_v1_5_mix665k-shaped file.

Writes the mix of benchmarks/data_scale.py at the real mix's size (665,298 samples, about 433 MB; deterministic)
unless --data names a file, then reads it --repeat times, each in a child process, through qllava's LLaVA JSON
reader (`qllava.data.formats._json_samples`, what `data stats` and training read with) and, for reference, with
`json.load` (the whole list in memory at once, as official LLaVA reads it). Each read counts the samples and
touches every one (its "conversations"), as preparation does. Per reader: the best and median wall time of the
read alone (imports excluded), samples/s, MB/s, and the child's peak RSS during the read (its peak is reset after
the imports, which take about 0.4 GB) and how far above its RSS before the read that peak is (what the reader
holds).

--code DIR reads with the qllava of another checkout (a `git worktree` of an older commit), so two readers are
compared by the same script on the same file and machine.

  .venv/bin/python benchmarks/json_stream.py [--samples 665298] [--data FILE] [--repeat 5] [--code DIR]
      [--no-json-load] [--keep]

Last line: one JSON object. Needs the file's size on disk; `json.load` holds about 4.5 times its size in RAM
(2 GB for the 665K mix). About 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
reader, path = sys.argv[2], sys.argv[3]
from pathlib import Path
try:
    from qllava.data.formats import _json_samples  # the package qllava.data
except ImportError:
    from qllava.data import _json_samples  # the module of a checkout from before it
import qllava.data


def status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def read_all():
    if reader == "json.load":
        with open(path, encoding="utf-8") as f:
            yield from json.load(f)
    else:
        yield from _json_samples(Path(path))


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS: the peak then is the read's, not the imports'
before = status_mb("VmRSS")
started = time.perf_counter()
samples = turns = 0
for sample in read_all():
    samples += 1
    turns += len(sample["conversations"])
seconds = time.perf_counter() - started
peak = status_mb("VmHWM")
print(json.dumps({"seconds": seconds, "samples": samples, "turns": turns, "rss_before_mb": before,
                  "peak_rss_mb": peak, "module": qllava.data.__file__}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=None, help="samples of the mix to write (default: 665,298)")
    parser.add_argument("--data", help="read this LLaVA JSON file instead of writing the mix")
    parser.add_argument("--work", default="/tmp/qllava_json_stream")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--code", default=str(ROOT), help="the checkout whose qllava reads the file")
    parser.add_argument("--no-json-load", action="store_true", help="skip the json.load reference")
    parser.add_argument("--keep", action="store_true", help="keep the written mix")
    args = parser.parse_args()
    import data_scale

    path = Path(args.data) if args.data else None
    if path is None:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        path = data_scale.write_mix(work, args.samples or data_scale.REAL_MIX, 0)
    size_mb = path.stat().st_size / 1e6
    print(f"{path}: {size_mb:.1f} MB", flush=True)
    summary = {"file": str(path), "file_mb": round(size_mb, 1)}
    for reader in ("qllava", "json.load")[: 1 if args.no_json_load else 2]:
        runs = [read_once(args.code, reader, path) for _ in range(args.repeat)]
        result = summarize(runs, size_mb)
        summary[reader] = result
        print(
            f"{reader:>9}: {result['samples']:,} samples in {result['best_s']:.2f} s best, "
            f"{result['median_s']:.2f} s median ({result['samples_per_s']:,.0f} samples/s, "
            f"{result['mb_per_s']:.0f} MB/s); peak RSS {result['peak_rss_mb']:.0f} MB, "
            f"{result['read_rss_mb']:.1f} MB above the RSS before the read",
            flush=True,
        )
    summary["code"] = runs[0]["module"]
    if not args.data and not args.keep:
        path.unlink()
    print(json.dumps(summary))


def read_once(code: str, reader: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, code, reader, str(path)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{reader} failed on {path}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict], size_mb: float) -> dict:
    seconds = [r["seconds"] for r in runs]
    best = min(seconds)
    return {
        "samples": runs[0]["samples"],
        "best_s": round(best, 2),
        "median_s": round(statistics.median(seconds), 2),
        "runs_s": [round(s, 2) for s in seconds],
        "samples_per_s": round(runs[0]["samples"] / best),
        "mb_per_s": round(size_mb / best, 1),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs)),
        "read_rss_mb": round(max(r["peak_rss_mb"] - r["rss_before_mb"] for r in runs), 1),
    }


if __name__ == "__main__":
    main()
