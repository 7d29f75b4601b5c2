"""`qllava chat`: a conversation about one image with a run folder or a merged folder.

The image opens the first user turn (as in training); later turns are text. Prompts are rendered with the
model's training template and tokenized exactly as in training.
"""

from __future__ import annotations

from pathlib import Path

from .inference import generate, load_for_inference, prompt_ids
from .vision import open_image


class Chat:
    def __init__(self, model_path: str | Path, image_path: str | Path):
        self.image = open_image(image_path)  # a bad image fails before minutes of model loading
        self.loaded = load_for_inference(model_path)
        self.turns: list[tuple[str, str]] = []

    def reply(self, text: str, max_new_tokens: int = 256, streamer=None, **sampling) -> str:
        """The model's answer to the next user message; the exchange is kept for the following turns."""
        text = text if self.turns else "<image>\n" + text
        prompt = prompt_ids(self.loaded, self.turns + [("user", text)], [self.image])
        answer = generate(self.loaded, [prompt], [self.image], max_new_tokens, streamer=streamer, **sampling)[0]
        self.turns += [("user", text), ("assistant", answer)]
        return answer
