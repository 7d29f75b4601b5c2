"""`qllava serve`: a web page to talk with a run or a merged model about an image, and an `/answer` API for
scripts (Gradio).

The model is loaded once and shared by every visitor, each of whom has their own conversation (a chat.Chat,
the code `qllava chat` runs, so prompts render the same and greedy answers are the same). Every event that
generates waits in one queue: one answer at a time, the model never loaded twice. Uploads and questions are
checked before they reach the model; what a visitor sends gets a message in the page and one line in the
console, never a stopped server nor a traceback (those are kept for the server's own bugs).

Who may connect is decided before the model is loaded: an address other machines can reach needs a password
(Gradio's sign-in) or a deliberate --no-auth, and the queue of waiting requests is bounded, so a flood of
requests is told "busy" instead of filling memory.
"""

# No `from __future__ import annotations`: Gradio reads the /answer function's type hints as objects.

import contextlib
import errno
import ipaddress
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
AUTH_ENV = "QLLAVA_SERVE_AUTH"
"""USER:PASSWORD for the sign-in, kept out of the command line (and so out of shell history and `ps`)."""
EVERY_HOST = "127.0.0.1: this machine only; 0.0.0.0: every network"

Credentials = list[tuple[str, str]]


class ServeError(RuntimeError):
    """A server that cannot or may not start (gradio missing, the port taken, an address not of this machine, a
    network address without a password, a bad auth setting), said before the model is loaded."""


def serve(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    quantized: bool = True,
    auth: Credentials | None = None,
    no_auth: bool = False,
    max_queue: int = 16,
    say=print,
) -> None:
    """Load the model, serve the page and the API at http://HOST:PORT until interrupted (Ctrl-C). `auth`: the
    user names and passwords that may sign in (None: anyone who reaches the address may use the model, which a
    non-loopback `host` allows only with `no_auth`). At most `max_queue` requests wait for the model."""
    _gradio()  # gradio missing is said before anything else
    loopback = check_access(host, port, auth, no_auth)
    _check_port_free(host, port)
    say(f"loading {model_path}")
    loaded = load_for_inference(model_path, quantized=quantized)
    app = start(build_app(loaded, str(model_path), say), host, port, auth, max_queue)
    access = (
        "sign-in required"
        if auth
        else "no sign-in, this machine only"
        if loopback
        else "no sign-in, open to the network (--no-auth)"
    )
    say(
        f"serving {model_path} on http://{host}:{port} (API: /answer); {access}; at most {max_queue} requests "
        "wait; Ctrl-C stops"
    )
    app.block_thread()


def load_auth(
    auth: str | None = None, auth_file: str | Path | None = None, no_auth: bool = False, environ=os.environ
) -> Credentials | None:
    """Who may sign in: --auth USER:PASSWORD, else --auth-file (one USER:PASSWORD a line, one line per user),
    else $QLLAVA_SERVE_AUTH; None when none is given. Errors name where the text came from, never the password."""
    if no_auth and environ.get(AUTH_ENV):  # argparse keeps --auth and --auth-file apart from --no-auth
        raise ServeError(f"--no-auth, but {AUTH_ENV} is set: unset it, or leave out --no-auth to ask for it")
    if auth is not None:
        return [_credentials(auth, "--auth")]
    if auth_file is not None:
        return _load_auth_file(Path(auth_file))
    if environ.get(AUTH_ENV):  # set but empty counts as unset
        return [_credentials(environ[AUTH_ENV], AUTH_ENV)]
    return None


def _load_auth_file(path: Path) -> Credentials:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ServeError(f"--auth-file {path}: no such file") from None
    except UnicodeDecodeError:
        raise ServeError(f"--auth-file {path}: not UTF-8 text; write USER:PASSWORD on a line") from None
    except OSError as e:
        raise ServeError(f"--auth-file {path}: cannot be read ({e.strerror})") from None
    users = [
        _credentials(line, f"--auth-file {path} line {number}") for number, line in enumerate(lines, 1) if line.strip()
    ]
    if not users:
        raise ServeError(f"--auth-file {path} is empty: write USER:PASSWORD on a line")
    names = [name for name, _ in users]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # Gradio would keep one of the passwords and drop the other silently
        raise ServeError(f"--auth-file {path}: user {twice[0]} is given twice; keep one line per user")
    return users


def _credentials(text: str, source: str) -> tuple[str, str]:
    user, colon, password = text.strip().partition(":")
    user = user.strip()  # Gradio's sign-in strips the name typed in
    if not (user and colon and password):
        raise ServeError(f"{source}: write USER:PASSWORD (a user name, a colon, then the password)")
    return user, password


def check_access(host: str, port: int, auth: Credentials | None, no_auth: bool) -> bool:
    """Whether `host` is reachable from this machine only (a loopback address); refuses, before anything is
    bound or loaded, a host that other machines can reach when there is no password and no --no-auth."""
    loopback = all(ipaddress.ip_address(address).is_loopback for address in _resolved(host, port))
    if not (loopback or auth or no_auth):
        raise ServeError(
            f"--host {host} lets other machines use the model, and no password is set: give one with "
            f"--auth-file FILE (a line USER:PASSWORD) or {AUTH_ENV}=USER:PASSWORD (or --auth "
            "USER:PASSWORD, which shell history keeps), or pass --no-auth to serve without one "
            "deliberately"
        )
    return loopback


def _resolved(host: str, port: int) -> list[str]:
    """The addresses `host` stands for, looked up as the server will bind it (uvicorn: IPv6 when it has a ':')."""
    bare = _bare(host)
    try:
        found = socket.getaddrinfo(bare, port, _family(bare), socket.SOCK_STREAM) if bare.strip() else []
    except (socket.gaierror, UnicodeError):
        found = []
    if not found:
        raise ServeError(
            f"--host {host}: not an address, nor a name this machine can look up; pass one of its "
            f"addresses ({EVERY_HOST})"
        )
    return [info[4][0] for info in found]


def start(app, host: str, port: int, auth: Credentials | None = None, max_queue: int = 16):
    """`app` serving in the background: one answer at a time, at most `max_queue` requests waiting (Gradio
    refuses more with "busy" until one is answered), signed-in visitors only when `auth` is given."""
    gr = _gradio()
    app.queue(default_concurrency_limit=1, max_size=max_queue).launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=False,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
        max_file_size=MAX_UPLOAD,
        theme=_offline_theme(gr),
    )
    return app


def build_app(loaded: Loaded, name: str, say=print):
    """The page (image, conversation, temperature, max new tokens, reset) and the /answer endpoint. `say`
    prints the console's line for each visitor input refused."""
    gr = _gradio()
    from gradio.data_classes import FileData

    def answer(image: FileData, question: str) -> str:
        """The greedy answer to one question about one image, as `qllava chat --prompt` gives it."""
        with refusals_said(say):
            question = checked_question(question)
            chat = new_chat(loaded, image)
            check_fits(chat, question, DEFAULT_MAX_NEW_TOKENS)
        return chat.reply(question)

    def respond(question, image, temperature, max_new_tokens, session):
        """Streams the conversation with the next answer growing in it; `session` = (image path, Chat)."""
        with refusals_said(say):
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
        gr.Markdown(
            f"### qllava: {name}\n{loaded.kind} model, template `{loaded.template or 'chat template'}`. "
            "Upload an image and ask about it; a new image or Reset starts a new conversation."
        )
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
        gr.on(
            [question.submit, send.click],
            respond,
            [question, image, temperature, max_new_tokens, session],
            [chatbot, session, question],
            preprocess=False,
            api_visibility="private",
            trigger_mode="multiple",
            concurrency_id=MODEL_QUEUE,
            concurrency_limit=1,
        )
        gr.on(
            [image.change, reset.click, chatbot.clear],
            lambda: ([], None),
            None,
            [chatbot, session],
            queue=False,
            api_visibility="private",
        )
    return app


@contextlib.contextmanager
def refusals_said(say):
    """Says each refusal of a visitor's input (raised by refusal()) as one console line, then lets it reach the
    visitor's page; anything else is left to Gradio, which prints a server bug's traceback."""
    try:
        yield
    except _gradio().Error as e:
        if e.print_exception:
            raise
        say(f"refused a request: {' '.join(str(e.message).split())}")  # a file name's line breaks stay in one line
        raise


def refusal(message: str):
    """The error a visitor sees for their own bad input: the message, and no traceback in the console."""
    return _gradio().Error(message, print_exception=False)


def checked_question(question: str | None) -> str:
    question = (question or "").strip()
    if not question:
        raise refusal("Type a question about the image first.")
    return question


def check_fits(chat: Chat, question: str, max_new_tokens: int) -> None:
    """A question that, with its answer, would not fit the decoder's context gets a message in the page (the check
    `qllava chat` and `qllava eval` make), never an answer of noise."""
    try:
        chat.prompt(question, max_new_tokens)
    except ContextError as e:
        raise refusal(str(e)) from None


def new_chat(loaded: Loaded, upload: dict | None) -> Chat:
    """A conversation about an uploaded image (Gradio's file record), or a message for the page saying why the
    file cannot be one: none uploaded, not an image, too large, unreadable."""
    if not (upload and upload.get("path")):
        raise refusal("Upload an image first.")
    path = upload["path"]
    name = upload.get("orig_name") or Path(path).name
    too_large = refusal(f"{name} is too large (at most {MAX_IMAGE_PIXELS // 10**6} megapixels): scale it down first.")
    try:
        with Image.open(path) as probe:  # reads the header only: the size is known before any decoding
            width, height = probe.size
    except Image.DecompressionBombError:  # Pillow's own, far larger, limit
        raise too_large from None
    except (OSError, ValueError):
        raise refusal(f"{name} is not an image (PNG, JPEG, WebP, ...).") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise too_large
    try:
        return Chat(loaded, path)
    except VisionError as e:  # a header that reads, data that do not (a truncated file)
        raise refusal(str(e).replace(str(path), name)) from None


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
    bare = _bare(host)
    with socket.socket(_family(bare)) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed port is free
        try:
            probe.bind((bare, port))
        except OSError as e:
            raise ServeError(f"cannot serve on {host}:{port} ({e.strerror}): {_bind_advice(e.errno, host)}") from None


def _bind_advice(number: int, host: str) -> str:
    if number == errno.EADDRINUSE:
        return "pass another --port, or stop what holds it"
    if number == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine; pass one of its addresses to --host ({EVERY_HOST})"
    if number == errno.EACCES:
        return "ports below 1024 need administrator rights; pass --port 1024 or above"
    return "check --host and --port"


def _bare(host: str) -> str:
    """The address without the brackets a URL puts around IPv6 ("[::1]"), which Gradio accepts too."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _family(bare_host: str) -> int:
    return socket.AF_INET6 if ":" in bare_host else socket.AF_INET


def _offline_theme(gr):
    """Gradio's default look with the system's fonts: the default theme fetches its fonts from the web, which
    a machine without internet (or a visitor's browser behind a firewall) cannot reach."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports to Gradio's servers
    try:
        import gradio
    except ImportError:
        raise ServeError("qllava serve needs gradio: pip install 'qllava[serve]' (or pip install gradio)") from None
    return gradio
