"""Evaluation: batched greedy answers to held-out questions, and their scores.

The questions are LLaVA JSON conversations: the first human turn is the question, the first gpt turn the
reference answer. Prompts are rendered with the run's template and tokenized exactly as in training,
left-padded, and answered greedily.
"""

from __future__ import annotations

import re
import string
from contextlib import nullcontext

import torch
from PIL import Image

from . import templates
from .data import Conversation, DataReport, ImageStore, encode, image_source, pad_to_square, read_conversations


def load_questions(path: str, image_folder: str, limit: int = 0):
    """Held-out conversations of an eval file, the store of their images, and what was skipped."""
    report = DataReport()
    where = image_source(path, image_folder)
    questions = read_conversations(path, where, 0, report)
    return (questions[:limit] if limit else questions), ImageStore([where]), report


def answer(model, processor, template: str, questions: list[Conversation], images: ImageStore, image_aspect_ratio: str,
           n_image_tokens: int, batch_size: int = 16, max_new_tokens: int = 16, blank_images: bool = False,
           progress=None) -> list[str]:
    """Greedy answers to the first user turn of each conversation, in order."""
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids(templates.IMAGE_TAG)
    was_training = model.training
    model.eval()
    answers = []
    try:
        for start in range(0, len(questions), batch_size):
            batch = questions[start:start + batch_size]
            prompts = [_prompt_ids(q, template, tokenizer, image_token_id, n_image_tokens) for q in batch]
            pictures = [_image(q, images, processor.image_processor, image_aspect_ratio, blank_images)
                        for q in batch if q.image]
            answers += _generate(model, tokenizer, processor.image_processor, prompts, pictures, max_new_tokens)
            if progress:
                progress(len(answers), len(questions))
    finally:
        model.train(was_training)
    return answers


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the short-answer normalization of VQA)."""
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score_exact(predictions: list[str], questions: list[Conversation]) -> dict:
    """Exact match after normalization, overall and per category, plus chance when options are listed."""
    correct = [normalize(p) == normalize(_reference(q)) for p, q in zip(predictions, questions)]
    result = {"accuracy": sum(correct) / len(correct) if correct else 0.0, "n": len(correct)}
    by_category = {}
    for ok, q in zip(correct, questions):
        by_category.setdefault(q.extra.get("category", "all"), []).append(ok)
    result["by_category"] = {c: sum(v) / len(v) for c, v in sorted(by_category.items())}
    options = [q.extra.get("options") for q in questions]
    if options and all(options):
        result["chance"] = sum(1 / len(o) for o in options) / len(options)
    result["correct"] = correct
    return result


def _reference(q: Conversation) -> str:
    return next(text for role, text in q.turns if role == "assistant")


def _prompt_ids(q: Conversation, template: str, tokenizer, image_token_id: int, n_image_tokens: int) -> list[int]:
    rendered = templates.render(template, q.turns[:1], tokenizer.bos_token or "", tokenizer.eos_token,
                                generation_prompt=True)
    ids, _ = encode(rendered, tokenizer, image_token_id, n_image_tokens)
    return ids


def _image(q: Conversation, images: ImageStore, image_processor, image_aspect_ratio: str, blank: bool) -> Image.Image:
    if blank:
        # The image-mean colour: after CLIP normalization every pixel is ~0, the image says nothing.
        size = image_processor.crop_size
        return Image.new("RGB", (size["width"], size["height"]), tuple(int(x * 255) for x in image_processor.image_mean))
    image = images.open(q.source, q.image)
    return pad_to_square(image, image_processor.image_mean) if image_aspect_ratio == "pad" else image


def _generate(model, tokenizer, image_processor, prompts: list[list[int]], pictures, max_new_tokens: int) -> list[str]:
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if pictures:
        inputs["pixel_values"] = image_processor(images=pictures, return_tensors="pt")["pixel_values"].to(device)
    dtype = model.get_input_embeddings().weight.dtype
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    with torch.no_grad(), autocast:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return [text.strip() for text in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
