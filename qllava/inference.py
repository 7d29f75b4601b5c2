"""Talking to a trained model: load a run folder (4-bit base + projector + adapter) or a merged folder, build
prompts exactly as training tokenized them, check that they fit the decoder's context, and generate (batched,
left-padded, greedy unless asked).

A merged folder records the run's template in qllava.json; a folder without one (any llava-hf checkpoint)
falls back to the processor's own chat template.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import model as modeling
from . import templates, vision
from .data import encode, expand_images
from .folders import QLLAVA_FILE, check_model_folder
from .recipe import load_recipe
from .run import RunFolder

CHAT_TEMPLATE = "chat_template"
"""The template name recorded for a checkpoint without a qllava template: its processor's own chat template."""


class ContextError(ValueError):
    """A prompt that, with the tokens of its answer, does not fit the decoder's context."""


@dataclass
class Loaded:
    model: object
    processor: object
    template: str | None
    """The LLaVA template the model was trained with; None: use the processor's chat template."""
    image_aspect_ratio: str
    kind: str
    """"run" (4-bit base + adapter) or "merged"."""

    @property
    def geometry(self) -> vision.ImageGeometry:
        return modeling.image_geometry(self.model.config, self.processor.image_processor)


def load_for_inference(path: str | Path, quantized: bool = True) -> Loaded:
    """A run folder (RUN with stage1/ or stage2/) or a merged / llava-hf folder (config.json); another kind of
    folder is refused (FolderError) before anything is loaded."""
    path = Path(path)
    settings = prompt_settings(path)
    template = None if settings["template"] == CHAT_TEMPLATE else settings["template"]
    if RunFolder.holds_run(path):
        model, processor, _ = modeling.load_run(path, quantized=quantized)
        return Loaded(model, processor, template, settings["image_aspect_ratio"], "run")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    place = {"device_map": {"": modeling.device()}} if torch.cuda.is_available() else {}
    model = AutoModelForImageTextToText.from_pretrained(path, dtype="auto", **place).eval()
    return Loaded(model, AutoProcessor.from_pretrained(path), template, settings["image_aspect_ratio"], "merged")


def prompt_settings(path: str | Path) -> dict:
    """How a model folder's prompts are rendered and its images prepared, read from its files (no model loaded):
    {"template": the LLaVA template, or CHAT_TEMPLATE for the processor's own, "image_aspect_ratio": ...}."""
    path = Path(path)
    if check_model_folder(path).kind == "run":
        stage = RunFolder(path).final_stage()
        cfg = getattr(load_recipe(stage / "recipe.toml"), stage.name)
        return {"template": cfg.template, "image_aspect_ratio": cfg.image_aspect_ratio}
    info = json.loads((path / QLLAVA_FILE).read_text()) if (path / QLLAVA_FILE).exists() else {}
    return {
        "template": info.get("template") or CHAT_TEMPLATE,
        "image_aspect_ratio": info.get("image_aspect_ratio", "pad"),
    }


def prompt_ids(loaded: Loaded, turns: list[tuple[str, str]], images: list = ()) -> list[int]:
    """Token ids of a conversation ending with a user turn, up to where the assistant starts to answer; `images`
    are the conversation's, in the order of their tags: PIL images or their (width, height) (a LLaVA-NeXT image's
    token count depends on its size, and on nothing else)."""
    tokenizer = loaded.processor.tokenizer
    if loaded.template is None:
        messages = [{"role": role, "content": text} for role, text in turns]
        text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True)
        rendered = templates.Rendered(text.removeprefix(tokenizer.bos_token or ""), ())
    else:
        rendered = templates.render(
            loaded.template, turns, tokenizer.bos_token or "", tokenizer.eos_token, generation_prompt=True
        )
    image_token_id = tokenizer.convert_tokens_to_ids(templates.IMAGE_TAG)
    ids = encode(rendered, tokenizer, image_token_id)[0]
    sizes = [image if isinstance(image, tuple) else image.size for image in images]
    widths = [loaded.geometry.tokens_of(size) for size in sizes]
    if len(widths) != ids.count(image_token_id):
        raise ValueError(f"{ids.count(image_token_id)} image tags in the conversation, {len(widths)} images given")
    return expand_images(ids, image_token_id, widths).tolist()


def context_length(loaded: Loaded) -> int | None:
    """Positions the decoder was built for (its max_position_embeddings), or None when its config does not say."""
    config = loaded.model.config
    return getattr(getattr(config, "text_config", config), "max_position_embeddings", None)


def check_context(loaded: Loaded, prompt_tokens: int, max_new_tokens: int, what: str, shorten: str) -> None:
    """ContextError when a prompt of `prompt_tokens` and an answer of up to `max_new_tokens` do not fit the decoder's
    context: past it the model reads positions it never learned and answers noise, without a word. `what` names
    the prompt ("question 17"), `shorten` says how to make it shorter."""
    context = context_length(loaded)
    if context is None or prompt_tokens + max_new_tokens <= context:
        return
    room = context - prompt_tokens
    fix = f"lower the max new tokens to {room} or less, or {shorten}" if room > 0 else shorten
    raise ContextError(
        f"{what} is {prompt_tokens:,} tokens (image tokens included): with up to {max_new_tokens:,} "
        f"new tokens that is more than the decoder's context of {context:,} positions (its "
        f"max_position_embeddings): {fix}"
    )


def blank_image(loaded: Loaded) -> Image.Image:
    """An image that says nothing (the held-out control): the image-mean colour at the processor's size."""
    return vision.blank_image(loaded.processor.image_processor)


def generate(
    loaded: Loaded, prompts: list[list[int]], images: list[Image.Image], max_new_tokens: int, streamer=None, **sampling
) -> list[str]:
    """Answers to left-padded prompts; `images` (RGB, prepared here as in training) in the order of their image
    tokens."""
    model, tokenizer = loaded.model, loaded.processor.tokenizer
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if images:
        pixels = vision.image_inputs(images, loaded.processor.image_processor, loaded.image_aspect_ratio)
        inputs.update({key: value.to(device) for key, value in pixels.items()})
    dtype = model.get_input_embeddings().weight.dtype
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    sampling = {"do_sample": False, **sampling}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                streamer=streamer,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
    finally:
        model.train(was_training)
    return [text.strip() for text in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
