"""`qllava compare`: evaluation results side by side (one column per run, one row per metric), the difference
to the first run, and a paired bootstrap 95% interval of that difference. Differences are only computed between
results on the same questions (same benchmark, same question keys, same questions and references); for others
the report says why they are not paired. Writes report.md and a bar chart (compare.png) given an output folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .errors import DataError
from .evaluate import metrics_file

BOOTSTRAP_SAMPLES = 2000


def load_result(path: str | Path) -> dict:
    """An evaluation result: see result_file for what may name one."""
    path = result_file(Path(path))
    try:
        result = json.loads(path.read_text())
        result["metrics"], result["per_question"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f'{path}: not a qllava eval result (needs "metrics" and "per_question")') from None
    result["file"] = str(path)
    return result


def result_file(path: Path) -> Path:
    """The FILE.metrics.json a RESULT argument names: itself, the answers FILE.jsonl it scores, or the one result in
    a run or model folder's eval/ (where `qllava eval MODEL_OR_RUN` writes by default) or in a folder of results.
    Whatever is missing is named as given."""
    if path.is_dir():
        return _only_result(path)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise DataError(f"{path}: no such answers file")
        scores = metrics_file(path)
        if not scores.is_file():
            raise DataError(
                f"{path}: answers without their scores ({scores.name} is missing): run the qllava eval "
                "that wrote them again; it scores them without asking any question again"
            )
        return scores
    if not path.is_file():
        raise DataError(
            f"{path}: no such file (a result is the FILE.metrics.json that qllava eval writes beside its "
            "answers FILE.jsonl)"
        )
    return path


def _only_result(folder: Path) -> Path:
    results_dir = folder / "eval" if (folder / "eval").is_dir() else folder
    found = sorted(results_dir.glob("*.metrics.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(
            f"{folder}: no evaluation result in {results_dir} (run qllava eval {folder} first; it writes "
            "eval/BENCHMARK-DATA.metrics.json)"
        )
    raise DataError(
        f"{folder}: {results_dir} holds {len(found)} evaluation results; name the one to compare: "
        f"{', '.join(str(f) for f in found)}"
    )


def compare(paths: list[str | Path], out_dir: str | Path | None = None, seed: int = 0) -> dict:
    results = [load_result(p) for p in paths]
    labels = _labels(results)
    names = []
    for r in results:
        names += [m for m in r["metrics"] if m not in names]
    table = {name: [r["metrics"].get(name) for r in results] for name in names}
    differences = {label: difference(results[0], r, seed) for r, label in zip(results[1:], labels[1:])}
    report = {
        "runs": [
            {"label": label, "benchmark": r["benchmark"], "data": r["data"], **r["model"]}
            for label, r in zip(labels, results)
        ],
        "metrics": table,
        "difference_vs_first": differences,
    }
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(markdown(report))
        (out / "report.json").write_text(json.dumps(report, indent=1))
        bar_chart(report, out / "compare.png")
    return report


def difference(first: dict, second: dict, seed: int = 0) -> dict:
    """The paired bootstrap of second - first when both scored the same questions, else why they are not paired."""
    reason = unpaired_reason(first, second)
    if reason:
        return {"paired": False, "reason": reason}
    return {"paired": True, **paired_bootstrap(first["per_question"], second["per_question"], seed)}


def unpaired_reason(first: dict, second: dict) -> str | None:
    if first["benchmark"] != second["benchmark"]:
        return f"different benchmarks ({first['benchmark']} and {second['benchmark']})"
    ours, theirs = set(first["per_question"]), set(second["per_question"])
    if ours != theirs:
        return (
            f"different question sets ({len(ours & theirs)} questions in both, {len(ours - theirs)} only in the "
            f"first, {len(theirs - ours)} only in this one)"
        )
    if first.get("question_set") and second.get("question_set") and first["question_set"] != second["question_set"]:
        return "the same question ids with other questions or references (another question file)"
    return None


def paired_bootstrap(first: dict, second: dict, seed: int = 0) -> dict:
    """Mean per-question score difference (second - first) over shared questions, with a 95% bootstrap interval."""
    shared = sorted(set(first) & set(second))
    if not shared:
        return {"questions": 0}
    diffs = [second[q] - first[q] for q in shared]
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(BOOTSTRAP_SAMPLES))
    return {
        "questions": len(shared),
        "mean": sum(diffs) / len(diffs),
        "ci95": [means[int(0.025 * BOOTSTRAP_SAMPLES)], means[int(0.975 * BOOTSTRAP_SAMPLES) - 1]],
    }


def markdown(report: dict) -> str:
    runs = report["runs"]
    lines = ["# qllava compare", "", "| | " + " | ".join(r["label"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for key in ("backbone", "template", "recipe", "benchmark", "data", "steps"):
        lines.append(f"| {key} | " + " | ".join(cell(r.get(key)) for r in runs) + " |")
    for name, cells in metric_rows(report):
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Differences are to the first column, for runs on the same questions. Paired bootstrap "
        f"({BOOTSTRAP_SAMPLES} resamples), per-question score of the second minus the first:",
        "",
    ]
    for label, d in report["difference_vs_first"].items():
        if d["paired"]:
            lines.append(
                f"- {label} - {runs[0]['label']}: {d['mean']:+.4f}, 95% CI [{d['ci95'][0]:+.4f}, "
                f"{d['ci95'][1]:+.4f}] over {d['questions']} questions"
            )
        else:
            lines.append(f"- {label} vs {runs[0]['label']}: not paired, {d['reason']}; no difference computed")
    return "\n".join(lines) + "\n"


def metric_rows(report: dict) -> list[tuple[str, list[str]]]:
    """(metric, cells): each run's value and, for a run paired with the first, its difference to the first."""
    paired = [True] + [report["difference_vs_first"][r["label"]]["paired"] for r in report["runs"][1:]]
    rows = []
    for name, values in report["metrics"].items():
        cells = [cell(v) for v in values]
        for i in range(1, len(values)):
            if paired[i] and all(isinstance(v, (int, float)) for v in (values[0], values[i])):
                cells[i] += f" ({values[i] - values[0]:+.4f})"
        rows.append((name, cells))
    return rows


def bar_chart(report: dict, path: Path) -> None:
    chart(report).savefig(path, dpi=100)


def chart(report: dict):
    """Each run's scores as bars and, beside them, each paired run's difference to the first with its paired
    bootstrap 95% interval (the figure that says whether the difference is more than noise)."""
    from matplotlib.figure import Figure

    names = [
        n
        for n, v in report["metrics"].items()
        if all(isinstance(x, (int, float)) for x in v) and all(0 <= x <= 1 for x in v)
    ][:12]
    runs = report["runs"]
    paired = {label: d for label, d in report["difference_vs_first"].items() if d["paired"] and d.get("questions")}
    fig = Figure(figsize=(max(5, 1.1 * len(names) * len(runs)) + (3 if paired else 0), 3.8))
    ax, diff_ax = fig.subplots(1, 2, width_ratios=[3, 1]) if paired else (fig.subplots(), None)
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [report["metrics"][n][i] for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=f"{run['label']}")
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(names))], names, rotation=30, ha="right")
    ax.set(ylim=(0, 1), ylabel="score", title=f"{runs[0]['benchmark']}: " + " vs ".join(r["label"] for r in runs))
    ax.legend(fontsize=8)
    if diff_ax is not None:
        _difference_axes(diff_ax, paired, runs[0]["label"])
    fig.tight_layout()
    return fig


def _difference_axes(ax, paired: dict, first: str) -> None:
    """Per paired run: the mean per-question difference to the first run, with its 95% interval as error bars."""
    ys = list(range(len(paired)))
    means = [d["mean"] for d in paired.values()]
    below = [d["mean"] - d["ci95"][0] for d in paired.values()]
    above = [d["ci95"][1] - d["mean"] for d in paired.values()]
    ax.errorbar(means, ys, xerr=[below, above], fmt="o", capsize=4, color="black")
    ax.axvline(0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yticks(ys, [f"{label}\n- {first}" for label in paired], fontsize=8)
    ax.set_ylim(-0.5, len(paired) - 0.5)
    ax.set(xlabel="difference (paired, 95% CI)", title="paired difference")


def _labels(results: list[dict]) -> list[str]:
    labels = []
    for r in results:
        backbone = str(r["model"].get("backbone", "")).rstrip("/").split("/")[-1]
        label = f"{r['model'].get('name', '?')} ({backbone})" if backbone else r["model"].get("name", "?")
        while label in labels:
            label += "'"
        labels.append(label)
    return labels


def cell(value) -> str:
    """A value as a table shows it: a float to 4 places, a metric or detail a result lacks as "-"."""
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
