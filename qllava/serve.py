"""`qllava serve`: a web page to talk with a run or a merged model about an image, and an `/answer` API for
scripts (Gradio).

The model is loaded once and shared by every visitor, each of whom has their own conversation (a chat.Chat,
the code `qllava chat` runs, so prompts render the same and greedy answers are the same). Every event that
generates waits in one queue: one answer at a time, the model never loaded twice. Uploads and questions are
checked before they reach the model; what a visitor sends gets a message in the page, never a stopped server.
"""

# No `from __future__ import annotations`: Gradio reads the /answer function's type hints as objects.

import os
import socket
import threading
from pathlib import Path

from PIL import Image

from .chat import DEFAULT_MAX_NEW_TOKENS, Chat, sampling
from .inference import ContextError, Loaded, load_for_inference
from .templates import IMAGE_TAG
from .vision import VisionError

MAX_IMAGE_PIXELS = 50_000_000
"""Larger images are refused before they are decoded (the model sees them at its processor's size anyway)."""
MAX_UPLOAD = "20mb"
MODEL_QUEUE = "model"
"""The one concurrency group of every event that generates: one generation at a time."""


class ServeError(RuntimeError):
    """A server that cannot start (gradio missing, the port taken), said before the model is loaded."""


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 7860, quantized: bool = True,
          say=print) -> None:
    """Load the model, serve the page and the API at http://HOST:PORT until interrupted (Ctrl-C)."""
    gr = _gradio()
    _check_port_free(host, port)
    say(f"loading {model_path}")
    loaded = load_for_inference(model_path, quantized=quantized)
    app = build_app(loaded, str(model_path))
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True, show_error=True,
        max_file_size=MAX_UPLOAD, theme=_offline_theme(gr))
    say(f"serving {model_path} on http://{host}:{port} (API: /answer); Ctrl-C stops")
    app.block_thread()


def build_app(loaded: Loaded, name: str):
    """The page (image, conversation, temperature, max new tokens, reset) and the /answer endpoint."""
    gr = _gradio()
    from gradio.data_classes import FileData

    def answer(image: FileData, question: str) -> str:
        """The greedy answer to one question about one image, as `qllava chat --prompt` gives it."""
        question = checked_question(question)
        chat = new_chat(loaded, image)
        check_fits(chat, question, DEFAULT_MAX_NEW_TOKENS)
        return chat.reply(question)

    def respond(question, image, temperature, max_new_tokens, session):
        """Streams the conversation with the next answer growing in it; `session` = (image path, Chat)."""
        question = checked_question(question)
        path = (image or {}).get("path")
        if session is None or session[0] != path:
            session = (path, new_chat(loaded, image))  # new_chat refuses a missing image, with a message
        chat = session[1]
        check_fits(chat, question, int(max_new_tokens))
        asked = {"role": "user", "content": question}
        yield shown_turns(chat.turns) + [asked], session, ""  # the question moves into the conversation at once
        for text in streamed_reply(chat, question, int(max_new_tokens), sampling(float(temperature))):
            yield shown_turns(chat.turns) + [asked, {"role": "assistant", "content": text}], session, gr.skip()
        yield shown_turns(chat.turns), session, gr.skip()  # gr.skip(): what the visitor types meanwhile stays

    with gr.Blocks(title=f"qllava: {name}") as app:
        gr.Markdown(f"### qllava: {name}\n{loaded.kind} model, template `{loaded.template or 'chat template'}`. "
                    "Upload an image and ask about it; a new image or Reset starts a new conversation.")
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=300)
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy)")
                max_new_tokens = gr.Slider(1, 1024, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens")
                reset = gr.Button("Reset")
            with gr.Column(scale=2):
                # The model's text as it is: Markdown would turn a "*" or "_" of an answer into formatting.
                chatbot = gr.Chatbot(label="Conversation", height=560, render_markdown=False)
                question = gr.Textbox(label="Question", placeholder="Ask about the image, then press Enter")
                send = gr.Button("Send", variant="primary")
        gr.api(answer, api_name="answer", concurrency_id=MODEL_QUEUE, concurrency_limit=1)
        # preprocess=False: the image arrives as the uploaded file's record, so a file that is not an image
        # reaches our check (and its message) instead of failing inside Gradio's own decoding. "multiple": a
        # question sent while an answer is still coming is answered next, not dropped.
        gr.on([question.submit, send.click], respond, [question, image, temperature, max_new_tokens, session],
              [chatbot, session, question], preprocess=False, api_visibility="private", trigger_mode="multiple",
              concurrency_id=MODEL_QUEUE, concurrency_limit=1)
        gr.on([image.change, reset.click, chatbot.clear], lambda: ([], None), None, [chatbot, session], queue=False,
              api_visibility="private")
    return app


def checked_question(question: str | None) -> str:
    question = (question or "").strip()
    if not question:
        raise _gradio().Error("Type a question about the image first.")
    return question


def check_fits(chat: Chat, question: str, max_new_tokens: int) -> None:
    """A question that, with its answer, would not fit the decoder's context gets a message in the page (the check
    `qllava chat` and `qllava eval` make), never an answer of noise."""
    try:
        chat.prompt(question, max_new_tokens)
    except ContextError as e:
        raise _gradio().Error(str(e)) from None


def new_chat(loaded: Loaded, upload: dict | None) -> Chat:
    """A conversation about an uploaded image (Gradio's file record), or a message for the page saying why the
    file cannot be one: none uploaded, not an image, too large, unreadable."""
    gr = _gradio()
    if not (upload and upload.get("path")):
        raise gr.Error("Upload an image first.")
    path = upload["path"]
    name = upload.get("orig_name") or Path(path).name
    too_large = gr.Error(f"{name} is too large (at most {MAX_IMAGE_PIXELS // 10**6} megapixels): scale it down "
                         "first.")
    try:
        with Image.open(path) as probe:  # reads the header only: the size is known before any decoding
            width, height = probe.size
    except Image.DecompressionBombError:  # Pillow's own, far larger, limit
        raise too_large from None
    except (OSError, ValueError):
        raise gr.Error(f"{name} is not an image (PNG, JPEG, WebP, ...).") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise too_large
    try:
        return Chat(loaded, path)
    except VisionError as e:  # a header that reads, data that do not (a truncated file)
        raise gr.Error(str(e).replace(str(path), name)) from None


def streamed_reply(chat: Chat, question: str, max_new_tokens: int, options: dict):
    """Yields the answer as it grows, token by token, then Chat.reply's own (the stripped text `qllava chat`
    prints). Generation runs in a thread; an error there is raised here."""
    from transformers import TextIteratorStreamer
    streamer = TextIteratorStreamer(chat.loaded.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    outcome = {}

    def generate():
        try:
            outcome["answer"] = chat.reply(question, max_new_tokens, streamer, **options)
        except Exception as e:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = e
            streamer.end()  # the loop below would otherwise wait for tokens forever

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["answer"]


def shown_turns(turns: list[tuple[str, str]]) -> list[dict]:
    """A Chat's turns as the page's messages (without the image tag that opens the first one)."""
    return [{"role": role, "content": text.removeprefix(IMAGE_TAG + "\n")} for role, text in turns]


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed port is free
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ServeError(f"cannot serve on {host}:{port} ({e.strerror}): pass another --port, or stop "
                             "what holds it") from None


def _offline_theme(gr):
    """Gradio's default look with the system's fonts: the default theme fetches its fonts from the web, which
    a machine without internet (or a visitor's browser behind a firewall) cannot reach."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports to Gradio's servers
    try:
        import gradio
    except ImportError:
        raise ServeError("qllava serve needs gradio: pip install 'qllava[serve]' (or pip install gradio)") from None
    return gradio
