"""`qllava chat`: a conversation about one image with a run folder or a merged folder.

The image opens the first user turn (as in training); later turns are text. Prompts are rendered with the
model's training template and tokenized exactly as in training. `qllava serve` holds one Chat per visitor
over the one model it loaded.
"""

from __future__ import annotations

from pathlib import Path

from .inference import Loaded, check_context, generate, load_for_inference, prompt_ids
from .vision import open_image

DEFAULT_MAX_NEW_TOKENS = 256


class Chat:
    def __init__(self, model: str | Path | Loaded, image_path: str | Path):
        """`model`: a run or merged folder, or a model already loaded (the server shares one)."""
        self.image = open_image(image_path)  # a bad image fails before minutes of model loading
        self.loaded = model if isinstance(model, Loaded) else load_for_inference(model)
        self.turns: list[tuple[str, str]] = []

    def reply(self, text: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, streamer=None, **sampling) -> str:
        """The model's answer to the next user message; the exchange is kept for the following turns."""
        prompt = self.prompt(text, max_new_tokens)
        answer = generate(self.loaded, [prompt], [self.image], max_new_tokens, streamer=streamer, **sampling)[0]
        self.turns += [("user", self._opening(text)), ("assistant", answer)]
        return answer

    def prompt(self, text: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[int]:
        """The token ids that ask the next user message, or ContextError when they and the answer would not fit
        the decoder's context (the conversation is left as it was)."""
        prompt = prompt_ids(self.loaded, self.turns + [("user", self._opening(text))], [self.image])
        shorten = "start a new conversation" if self.turns else "ask a shorter question"
        what = "the conversation with this question" if self.turns else "the question with its image"
        check_context(self.loaded, len(prompt), max_new_tokens, what, shorten)
        return prompt

    def _opening(self, text: str) -> str:
        """The image opens the first user turn, as in training."""
        return text if self.turns else "<image>\n" + text


def sampling(temperature: float, top_p: float = 1.0) -> dict:
    """generate()'s sampling arguments: greedy at temperature 0, else sampling at that temperature."""
    return {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
