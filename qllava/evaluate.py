"""`qllava eval`: batched greedy answers to a benchmark's questions, resumable, and their scores; and the same
code scoring the recipe's held-out questions during `qllava finetune` (HeldOut).

Answers are appended to an answers file as each batch finishes, so an interrupted evaluation continues
where it stopped: questions already in the file are not asked again. The file's lines are the records
LLaVA's model_vqa*.py writes (question_id with its JSON type, prompt, text, answer_id, model_id, metadata), so
LLaVA's own scorers read it; qllava keeps in "metadata" its question key, the model's fingerprint and the
settings that shape an answer (max_new_tokens, template, image preparation): an answers file is only continued
with the model and the settings it was begun with. The metrics (and every question's score, for paired
comparisons) go to FILE.metrics.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from . import scorers
from .errors import DataError
from .folders import check_model_folder
from .inference import (
    CHAT_TEMPLATE,
    QLLAVA_FILE,
    ContextError,
    Loaded,
    blank_image,
    check_context,
    context_length,
    generate,
    load_for_inference,
    prompt_ids,
    prompt_settings,
)
from .run import RunFolder
from .vision import image_header, open_image


def evaluate(
    model_path: str | Path,
    benchmark: str,
    data: str,
    images: str = "",
    out: str | Path | None = None,
    annotations: str | None = None,
    batch_size: int = 16,
    limit: int = 0,
    max_new_tokens: int = 128,
    loaded: Loaded | None = None,
    blank_images: bool = False,
    progress=None,
) -> dict:
    """Answer the benchmark's questions not yet in `out`, score them all, write FILE.metrics.json; return it."""
    model_path = Path(model_path)
    if loaded is None:
        check_model_folder(model_path)
    items = first_questions(scorers.load_items(benchmark, data, annotations), limit)
    out = Path(out) if out else default_answers_file(model_path, benchmark, data)
    fingerprint = model_fingerprint(model_path)
    settings = generation_settings(loaded or model_path, max_new_tokens, blank_images)
    records = read_records(out, fingerprint)
    check_settings(out, records, settings, items)
    done = {key: record["text"] for key, record in records.items()}
    todo = [item for item in items if item.question_id not in done]
    if todo and loaded is None:
        if not blank_images:
            check_images(todo, images, "--images")  # before minutes of model loading
        loaded = load_for_inference(model_path)
    if todo:
        check_questions_fit(loaded, todo, images, max_new_tokens, blank_images)  # before any answer is generated
        out.parent.mkdir(parents=True, exist_ok=True)
        drop_cut_lines(out)
        with out.open("a") as answers_file:
            for batch, texts in answer_batches(loaded, todo, images, batch_size, max_new_tokens, blank_images):
                for item, text in zip(batch, texts):
                    done[item.question_id] = text
                    record = answer_record(item, text, model_path.name, fingerprint, settings)
                    answers_file.write(json.dumps(record) + "\n")
                answers_file.flush()
                os.fsync(answers_file.fileno())  # what is on disk survives a kill: the resume point
                if progress:
                    progress(len(items) - len(todo) + sum(1 for q in todo if q.question_id in done), len(items))
    metrics, per_question = scorers.score(benchmark, items, done)
    result = {
        "benchmark": benchmark,
        "data": str(data),
        "answers": str(out),
        "questions": len(items),
        "question_set": question_set(items),
        "asked_now": len(todo),
        "model": describe_model(model_path),
        "settings": settings,
        "metrics": metrics,
        "per_question": per_question,
    }
    metrics_file(out).write_text(json.dumps(result, indent=1))
    return result


def first_questions(items: list[scorers.EvalItem], limit: int) -> list[scorers.EvalItem]:
    """The first `limit` questions (0: all). A negative limit is refused: as a slice it would silently leave the
    last questions out and report the rest as the result."""
    if limit < 0:
        raise DataError(f"limit {limit}: must be >= 0 (0: every question)")
    return items[:limit] if limit else items


def generation_settings(model: Path | Loaded, max_new_tokens: int, blank_images: bool = False) -> dict:
    """What, besides the weights and the question, decides an answer: an answers file holds one set of them."""
    if isinstance(model, Loaded):
        shaping = {"template": model.template or CHAT_TEMPLATE, "image_aspect_ratio": model.image_aspect_ratio}
    else:
        shaping = prompt_settings(model)
    return {"max_new_tokens": max_new_tokens, **shaping, "blank_images": blank_images}


def check_settings(path: Path, records: dict[str, dict], settings: dict, items: list[scorers.EvalItem]) -> None:
    """Refuse to continue an answers file whose answers were made with other settings, or asked other questions
    under the same keys: mixed in, they would be scored as answers to this evaluation. Records without settings
    (LLaVA's own answers files) are taken as they are."""
    recorded = [_metadata(r)["settings"] for r in records.values() if isinstance(_metadata(r).get("settings"), dict)]
    changed = {key: value for s in recorded for key, value in s.items() if settings.get(key) != value}
    if changed:
        differences = "; ".join(f"{key} {value!r} there, {settings.get(key)!r} now" for key, value in changed.items())
        raise DataError(
            f"{path} holds answers made with other settings ({differences}): continue it with the "
            "settings it was begun with, or pass another --out (or remove the file) to answer again"
        )
    prompts = {item.question_id: item.prompt for item in items}
    other = [
        key
        for key, r in records.items()
        if "settings" in _metadata(r) and key in prompts and r.get("prompt") != prompts[key]
    ]
    if other:
        raise DataError(
            f"{path} holds answers to other questions under the same ids ({len(other)}, e.g. "
            f"{', '.join(other[:3])}: another question file?): pass another --out (or remove the file)"
        )


def check_questions_fit(
    loaded: Loaded, items: list[scorers.EvalItem], images: str, max_new_tokens: int, blank_images: bool = False
) -> None:
    """ContextError naming the questions that, with their image and an answer of up to `max_new_tokens`, do not fit
    the decoder's context (image token counts from the files' headers: nothing is decoded)."""
    context = context_length(loaded)
    if context is None:
        return
    blank = blank_image(loaded) if blank_images else None
    lengths = {}
    for item in items:
        picture = []
        if item.image:
            picture = [blank.size if blank is not None else upright_size_of(os.path.join(images, item.image))]
        lengths[item.question_id] = len(question_prompt(loaded, item, picture))
    too_long = {key: n for key, n in lengths.items() if n + max_new_tokens > context}
    if not too_long:
        return
    room = context - max(too_long.values())
    examples = ", ".join(f"{key} ({n:,} tokens)" for key, n in list(too_long.items())[:3])
    fix = (
        f"remove them from the question file, or lower --max-new-tokens to {room} or less"
        if room > 0
        else "remove them from the question file"
    )
    raise ContextError(
        f"{len(too_long)} of {len(items)} questions with an answer of up to {max_new_tokens:,} new "
        f"tokens do not fit the decoder's context of {context:,} positions (its "
        f"max_position_embeddings), e.g. {examples}, image tokens included: {fix}"
    )


def upright_size_of(path: str) -> tuple[int, int]:
    """(width, height) of an image as the model will get it (turned upright), from its header; or the file's
    problem, named."""
    header = image_header(path)
    if header.problem:
        raise DataError(f"{path}: {header.problem}")
    return header.size


def answer_batches(
    loaded: Loaded,
    items: list[scorers.EvalItem],
    images: str,
    batch_size: int,
    max_new_tokens: int,
    blank_images: bool = False,
):
    """(batch, answers) for consecutive batches of the items, as each batch is generated."""
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        yield batch, answer(loaded, batch, images, max_new_tokens, blank_images)


def answer(
    loaded: Loaded, items: list[scorers.EvalItem], images: str, max_new_tokens: int, blank_images: bool = False
) -> list[str]:
    """Greedy answers to one batch of questions, in order; a question that would not fit the decoder's context
    (ContextError) is never answered."""
    prompts, pictures = [], []
    for item in items:
        picture = (
            [blank_image(loaded) if blank_images else open_image(os.path.join(images, item.image))]
            if item.image
            else []
        )
        prompts.append(question_prompt(loaded, item, picture))
        check_context(
            loaded, len(prompts[-1]), max_new_tokens, f"question {item.question_id}", "remove it from the questions"
        )
        pictures += picture
    return generate(loaded, prompts, pictures, max_new_tokens)


def question_prompt(loaded: Loaded, item: scorers.EvalItem, picture: list) -> list[int]:
    """The token ids that ask one question (its image, or the image's size, in `picture`)."""
    question = ("<image>\n" + item.question) if item.image else item.question
    return prompt_ids(loaded, [("user", question)], picture)


def answer_record(item: scorers.EvalItem, text: str, model_id: str, fingerprint: str, settings: dict) -> dict:
    """An answers-file line as LLaVA's model_vqa*.py writes it; qllava's own fields go in its metadata."""
    return {
        "question_id": item.source_id,
        "prompt": item.prompt,
        "text": text,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": {"key": item.question_id, "model_fingerprint": fingerprint, "settings": settings},
    }


class HeldOut:
    """The recipe's [eval] questions, scored by `qllava eval`'s code at the points it names (before, stage1,
    stage2, blank_images: stage 2 with blank images in place of the real ones)."""

    def __init__(self, recipe, say=print, done: dict | None = None):
        self.recipe, self.say = recipe, say
        self.items = first_questions(scorers.load_items(recipe.eval.benchmark, recipe.eval.data), recipe.eval.limit)
        check_images(self.items, recipe.eval.image_folder, "eval.image_folder")
        self.scores: dict = {k: v for k, v in (done or {}).items() if k.startswith(("accuracy_", "by_category_"))}

    def unscored(self, point: str) -> bool:
        """A point the recipe asks for that has no score yet."""
        return point in self.recipe.eval.at and f"accuracy_{point}" not in self.scores

    def score(self, point: str, model, processor, blank_images: bool = False) -> None:
        """Score on the main process only (the others wait at the stage's end); points already scored are kept."""
        from accelerate import PartialState

        if not self.unscored(point) or not PartialState().is_main_process:
            return
        cfg, stage2 = self.recipe.eval, self.recipe.stage2
        loaded = Loaded(model, processor, stage2.template, stage2.image_aspect_ratio, "run")
        answers = {}
        for batch, texts in answer_batches(
            loaded, self.items, cfg.image_folder, cfg.batch_size, cfg.max_new_tokens, blank_images
        ):
            answers.update({item.question_id: text for item, text in zip(batch, texts)})
        metrics, _ = scorers.score(cfg.benchmark, self.items, answers)
        self.scores[f"accuracy_{point}"] = metrics["accuracy"]
        self.scores[f"by_category_{point}"] = {
            k.removeprefix("accuracy_"): v for k, v in metrics.items() if k.startswith("accuracy_")
        }
        if "chance" in metrics:
            self.scores["chance"] = metrics["chance"]
        self.say(f"held-out accuracy {point}: {metrics['accuracy']:.3f} ({len(self.items)} questions)")


def check_images(items: list[scorers.EvalItem], folder: str, setting: str) -> None:
    """Every question's image is there (before any model is loaded), or an error naming the setting."""
    missing = [item.image for item in items if item.image and not os.path.isfile(os.path.join(folder, item.image))]
    if missing:
        raise DataError(
            f"{setting}: the images of {len(missing)} of {len(items)} questions are not in "
            f"{folder or 'the current folder'} (e.g. {', '.join(missing[:3])})"
        )


def read_answers(path: Path, fingerprint: str | None = None) -> dict[str, str]:
    """question key -> answer text of an answers file (see read_records)."""
    return {key: record["text"] for key, record in read_records(path, fingerprint).items()}


def read_records(path: Path, fingerprint: str | None = None) -> dict[str, dict]:
    """question key -> record of an answers file; a line cut by a crash is ignored. Answers of another model (its
    weights changed since, or another folder) are refused rather than silently mixed in. A file written by LLaVA
    itself has no keys: its n-th answer to an id is that id's n-th question."""
    if not path.exists():
        return {}
    records = [r for r in map(_parsed, path.read_text().splitlines()) if r is not None]
    derived = iter(scorers.question_keys(r["question_id"] for r in records if "key" not in _metadata(r)))
    done = {}
    for record in records:
        meta = _metadata(record)
        if fingerprint and meta.get("model_fingerprint", fingerprint) != fingerprint:
            raise DataError(
                f"{path} holds answers of another model (or of this one before it was retrained): "
                "remove it or pass another --out"
            )
        done[meta["key"] if "key" in meta else next(derived)] = record
    return done


def drop_cut_lines(path: Path) -> None:
    """Rewrite the answers file without lines a kill cut short, so that it stays JSON lines for LLaVA's scorers."""
    if not path.exists():
        return
    text = path.read_text()
    whole = [line for line in text.splitlines() if _parsed(line) is not None]
    if whole != text.splitlines() or (text and not text.endswith("\n")):
        path.write_text("".join(line + "\n" for line in whole))


def question_set(items: list[scorers.EvalItem]) -> str:
    """Identifies the questions a result scored (keys, questions asked, references): compare pairs only equals."""
    content = [(item.question_id, item.question, item.reference) for item in items]
    return hashlib.sha256(json.dumps(content, default=str).encode()).hexdigest()[:16]


def _parsed(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "question_id" in record and "text" in record else None


def _metadata(record: dict) -> dict:
    return record.get("metadata") or {}


def model_fingerprint(path: Path) -> str:
    """Identifies the weights behind an answer: names, sizes and times of the folder's weight files."""
    files = sorted(
        f
        for f in path.rglob("*.safetensors")
        if "eval" not in f.relative_to(path).parts and "checkpoints" not in f.relative_to(path).parts
    )
    key = [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def metrics_file(answers: Path) -> Path:
    return answers.with_name(answers.name.removesuffix(".jsonl") + ".metrics.json")


def default_answers_file(model_path: Path, benchmark: str, data: str) -> Path:
    folder = RunFolder(model_path).eval_dir if RunFolder.holds_run(model_path) else model_path / "eval"
    return folder / f"{benchmark}-{Path(data).stem}.jsonl"


def describe_model(path: Path) -> dict:
    """What a comparison labels a column with: backbone, template, recipe, data, steps."""
    run = path
    info_file = path / QLLAVA_FILE
    if info_file.exists():  # a merged folder remembers its run
        run = Path(json.loads(info_file.read_text()).get("source_run", path))
    try:
        stage = RunFolder(run).final_stage()
    except FileNotFoundError:  # a llava-hf folder, or a merged one whose run is gone
        return {"name": path.name, "path": str(path)}
    from .recipe import load_recipe

    recipe = load_recipe(stage / "recipe.toml")
    cfg = getattr(recipe, stage.name)
    steps = json.loads((stage / "metrics.json").read_text()).get("steps")
    return {
        "name": path.name,
        "path": str(path),
        "backbone": recipe.model.llava or recipe.model.decoder,
        "vision_tower": recipe.model.vision_tower,
        "template": cfg.template,
        "recipe": recipe.source,
        "data": cfg.data,
        "stage": stage.name,
        "steps": steps,
    }
