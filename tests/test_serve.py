"""`qllava serve` on a tiny run, started as a real process on a free local port: the /answer API answers as
`qllava chat --prompt` does, the page works in a real headless Chromium (Debian's), and bad input gets a message
while the server keeps serving. Who may connect: a non-loopback address needs a password or --no-auth, signed-in
clients only when one is set, and a bounded queue that refuses a flood."""

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY_RECIPE, next_recipe, tiny_overrides
from PIL import Image

from qllava.cli import main

QUESTIONS = [
    ("eval-0.png", "What color is the shape?"),
    ("eval-1.png", "What shape is in the image?"),
    ("eval-2.png", "Is the shape on the left or on the right?"),
]
# Chromium in a closed network: no sandbox (root in CI), no GPU, none of the background calls it would make.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def noisy_run(tiny_inputs, tmp_path_factory):
    """The tiny recipe trained 2 steps a stage: its greedy answers are 256 tokens of noise that change with every
    image and question (a trained model answers in one word), so equal answers mean prompts equal token for token."""
    from qllava import train
    from qllava.recipe import load_recipe

    run = tmp_path_factory.mktemp("noisy") / "run"
    train.finetune(
        load_recipe(
            TINY_RECIPE, tiny_overrides(tiny_inputs, run) + ["stage1.max_steps=2", "stage2.max_steps=2", "eval.at=[]"]
        ),
        say=lambda _: None,
    )
    return run


@pytest.fixture(scope="module")
def server_folder(tmp_path_factory):
    """The default server's folder: its console (serve.log) and its uploads."""
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def server(noisy_run, server_folder):
    """`python -m qllava serve RUN --port PORT` (no --host: the default), ready: its URL."""
    with serving(noisy_run, server_folder) as url:
        yield url


@contextlib.contextmanager
def serving(run, folder, *options):
    """A `qllava serve` process on a free port, until the block ends; uploads go to a folder of the test's own,
    the console to folder/serve.log."""
    port = free_port()
    log = open(folder / "serve.log", "w")
    env = {**os.environ, "GRADIO_TEMP_DIR": str(folder / "uploads")}
    process = subprocess.Popen(
        [sys.executable, "-m", "qllava", "serve", str(run), "--port", str(port), *options],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, folder / "serve.log")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, process, log, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"qllava serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"qllava serve did not answer on {url} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def api_answer(client, image, question: str) -> str:
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)), question, api_name="/answer")


def test_answer_api_equals_qllava_chat_prompt(client, noisy_run, tiny_inputs, capsys):
    images = tiny_inputs / "shapes" / "images"
    answers = []
    for name, question in QUESTIONS:
        answers.append(api_answer(client, images / name, question))
        assert main(["chat", str(noisy_run), "--image", str(images / name), "--prompt", question]) == 0
        assert answers[-1] == capsys.readouterr().out.strip(), (name, question)
    assert len(set(answers)) == len(QUESTIONS) and min(map(len, answers)) > 200


def test_concurrent_requests_wait_in_one_queue_for_the_one_model(client, tiny_inputs):
    from gradio_client import handle_file

    image, question = tiny_inputs / "shapes" / "images" / "eval-0.png", QUESTIONS[0][1]
    started = time.monotonic()
    alone = api_answer(client, image, question)
    one_s = time.monotonic() - started

    def finished(job):
        return job.result(timeout=120), time.monotonic()

    jobs = [client.submit(handle_file(str(image)), question, api_name="/answer") for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(finished, jobs))
    assert [answer for answer, _ in results] == [alone] * 4
    # one at a time: the answers arrive about one generation's time apart (measured here: 1.3 to 1.5 s, with one
    # request's 1.9 s including its upload); generated side by side, they would arrive together
    ends = sorted(at for _, at in results)
    assert min(later - earlier for earlier, later in zip(ends, ends[1:])) > one_s / 4, (ends, one_s)


def listening_addresses(port: int) -> set:
    """The local addresses of the sockets listening on `port`, from Linux's socket tables."""
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
                # the address in 32-bit words of the host's (little-endian) byte order
                raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
                found.add(str(ipaddress.ip_address(raw)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_the_server_listens_on_127_0_0_1_only_by_default(server):
    assert listening_addresses(urllib.parse.urlparse(server).port) == {"127.0.0.1"}


def bad_files(folder):
    """(file, the message the server gives about it): not an image, too large, cut short."""
    (folder / "notes.png").write_text("not an image")
    Image.new("1", (9000, 9000)).save(folder / "huge.png")  # 81 megapixels in a 10 KB file
    Image.new("RGB", (64, 64), "red").save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    return [
        (folder / "notes.png", "notes.png is not an image (PNG, JPEG, WebP, ...)."),
        (folder / "huge.png", "huge.png is too large (at most 50 megapixels): scale it down first."),
        (folder / "cut.png", "image cut.png: cannot be read as an image (image file is truncated)"),
    ]


def test_bad_input_gets_a_message_and_the_server_keeps_serving(client, server_folder, tiny_inputs, tmp_path):
    from gradio_client.exceptions import AppError

    image = tiny_inputs / "shapes" / "images" / "eval-0.png"
    cases = [(image, "  ", "Type a question about the image first.")] + [
        (path, "What color is the shape?", message) for path, message in bad_files(tmp_path)
    ]
    for path, question, message in cases:
        with pytest.raises(AppError) as refused:
            api_answer(client, path, question)
        assert str(refused.value) == message
    assert api_answer(client, image, QUESTIONS[0][1])
    # the server's console: one line per refused input (the visitor's problem), no traceback
    console = (server_folder / "serve.log").read_text()
    for _, _, message in cases:
        assert console.splitlines().count(f"refused a request: {message}") == 1, console
    assert "Traceback" not in console, console


def test_streamed_reply_grows_to_the_chat_answer(noisy_run, tiny_inputs):
    from qllava.chat import Chat
    from qllava.serve import new_chat, streamed_reply

    image = tiny_inputs / "shapes" / "images" / "eval-0.png"
    chat = Chat(noisy_run, image)
    shown = list(streamed_reply(chat, QUESTIONS[0][1], 12, {}))
    assert len(shown) >= 4 and all(
        later.strip().startswith(earlier.strip()) for earlier, later in zip(shown, shown[1:])
    )
    assert shown[-1] == Chat(chat.loaded, image).reply(QUESTIONS[0][1], 12) == chat.turns[-1][1]
    assert new_chat(chat.loaded, {"path": str(image)}).loaded is chat.loaded  # every visitor shares the one model


@pytest.fixture(scope="module")
def noisy_next_run(next_inputs, tmp_path_factory):
    """recipes/tiny_next.toml trained 2 steps a stage: LLaVA-NeXT, whose image token counts follow image sizes."""
    from qllava import train

    run = tmp_path_factory.mktemp("noisy_next") / "run"
    train.finetune(
        next_recipe(next_inputs, run, "stage1.max_steps=2", "stage2.max_steps=2", "eval.at=[]"), say=lambda _: None
    )
    return run


def test_a_llava_next_run_answers_as_qllava_chat_prompt(noisy_next_run, next_inputs, tmp_path, capsys):
    from gradio_client import Client

    images = next_inputs / "shapes" / "images"
    assert len({Image.open(images / name).size for name, _ in QUESTIONS}) == len(QUESTIONS)  # three aspect ratios
    with serving(noisy_next_run, tmp_path) as url:
        client = Client(url, verbose=False)
        answers = [api_answer(client, images / name, question) for name, question in QUESTIONS]
    for answer, (name, question) in zip(answers, QUESTIONS):
        assert main(["chat", str(noisy_next_run), "--image", str(images / name), "--prompt", question]) == 0
        assert answer == capsys.readouterr().out.strip(), (name, question)
    assert len(set(answers)) == len(QUESTIONS) and min(map(len, answers)) > 200


def test_serve_refuses_a_port_in_use_before_loading(noisy_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(noisy_run), "--port", str(port)]) == 2
    said = capsys.readouterr().out
    assert f"cannot serve on 127.0.0.1:{port} (Address already in use): pass another --port" in said
    assert "loading" not in said


def serve_error(argv: list[str], capsys) -> str:
    """What `qllava ARGV` says when it refuses with exit status 2 (nothing served)."""
    assert main(argv) == 2
    return capsys.readouterr().out


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "192.0.2.1"])
def test_serve_refuses_an_address_other_machines_reach_without_a_password(host, monkeypatch, capsys):
    from qllava import serve

    serve._gradio()  # imported before sockets are forbidden below

    def no_socket(*args, **kwargs):
        raise AssertionError("a socket was opened before the refusal")

    monkeypatch.setattr(socket, "socket", no_socket)
    monkeypatch.delenv("QLLAVA_SERVE_AUTH", raising=False)
    said = serve_error(["serve", "no-such-run", "--host", host, "--port", "7860"], capsys)
    assert f"--host {host} lets other machines use the model, and no password is set" in said
    for way in ("--auth-file FILE", "QLLAVA_SERVE_AUTH=USER:PASSWORD", "--auth USER:PASSWORD", "--no-auth"):
        assert way in said
    assert "loading" not in said  # the model folder does not even exist: refused before it was looked at


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("192.0.2.1", False),
    ],
)
def test_only_loopback_addresses_are_served_without_a_password(host, loopback):
    from qllava.serve import ServeError, check_access

    assert check_access(host, 7860, [("alice", "secret")], no_auth=False) is loopback
    assert check_access(host, 7860, None, no_auth=True) is loopback  # --no-auth: deliberately open
    if loopback:
        assert check_access(host, 7860, None, no_auth=False) is True
    else:
        with pytest.raises(ServeError, match="--no-auth"):
            check_access(host, 7860, None, no_auth=False)


def test_serve_says_when_the_address_is_not_this_machines(capsys):
    port = free_port()
    # 192.0.2.1 is reserved for documentation (RFC 5737): no machine has it, so the bind cannot succeed
    said = serve_error(["serve", "no-such-run", "--host", "192.0.2.1", "--port", str(port), "--no-auth"], capsys)
    assert (
        f"cannot serve on 192.0.2.1:{port} (Cannot assign requested address): 192.0.2.1 is not an address of "
        "this machine; pass one of its addresses to --host (127.0.0.1: this machine only; 0.0.0.0: every "
        "network)"
    ) in said
    assert "--port" not in said and "loading" not in said
    said = serve_error(["serve", "no-such-run", "--host", "no-such-host.invalid", "--port", str(port)], capsys)
    assert "--host no-such-host.invalid: not an address, nor a name this machine can look up" in said


def test_auth_comes_from_the_flag_the_file_or_the_environment(tmp_path):
    from qllava.serve import AUTH_ENV, load_auth

    users = tmp_path / "users"
    users.write_text("alice:correct horse\n\n  bob :battery:staple  \n")
    assert load_auth(auth_file=users, environ={}) == [("alice", "correct horse"), ("bob", "battery:staple")]
    assert load_auth(environ={AUTH_ENV: "carol:pw"}) == [("carol", "pw")]
    assert load_auth("dave:pw", environ={AUTH_ENV: "carol:pw"}) == [("dave", "pw")]  # the flag wins
    assert load_auth(environ={AUTH_ENV: ""}) is None and load_auth(environ={}) is None
    assert load_auth(no_auth=True, environ={}) is None


@pytest.mark.parametrize(
    "text, problem",
    [
        ("alice", "line 2: write USER:PASSWORD (a user name, a colon, then the password)"),
        (":s3cret", "line 2: write USER:PASSWORD"),
        ("alice:", "line 2: write USER:PASSWORD"),
        ("bob:s3cret", "user bob is given twice; keep one line per user"),
    ],
)
def test_a_bad_auth_file_is_refused_naming_the_line_never_the_password(text, problem, tmp_path):
    from qllava.serve import ServeError, load_auth

    users = tmp_path / "users"
    users.write_text(f"bob:hunter2\n{text}\n")
    with pytest.raises(ServeError) as refused:
        load_auth(auth_file=users, environ={})
    assert str(refused.value).startswith(f"--auth-file {users}") and problem in str(refused.value)
    assert "hunter2" not in str(refused.value) and "s3cret" not in str(refused.value)


def test_auth_settings_that_cannot_be_used_are_refused(tmp_path, capsys):
    from qllava.serve import AUTH_ENV, ServeError, load_auth

    for auth, environ, message in [
        (None, {AUTH_ENV: "nopassword"}, f"{AUTH_ENV}: write USER:PASSWORD"),
        ("alice", {}, "--auth: write USER:PASSWORD"),
    ]:
        with pytest.raises(ServeError, match=message):
            load_auth(auth, environ=environ)
    with pytest.raises(ServeError, match=f"--no-auth, but {AUTH_ENV} is set"):
        load_auth(no_auth=True, environ={AUTH_ENV: "alice:pw"})
    with pytest.raises(ServeError, match=f"--auth-file {tmp_path / 'none'}: no such file"):
        load_auth(auth_file=tmp_path / "none", environ={})
    (tmp_path / "blank").write_text("\n  \n")
    with pytest.raises(ServeError, match="is empty: write USER:PASSWORD on a line"):
        load_auth(auth_file=tmp_path / "blank", environ={})
    for argv, flag in [
        (["--auth", "a:b", "--no-auth"], "--no-auth: not allowed with argument --auth"),
        (["--max-queue", "0"], "--max-queue: must be >= 1, got 0"),
        (["--max-queue", "lots"], "--max-queue: 'lots' is not an integer"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            main(["serve", "no-such-run", *argv])
        assert stopped.value.code == 2 and flag in capsys.readouterr().err


def test_with_auth_only_signed_in_clients_get_answers(noisy_run, client, tiny_inputs, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    image, question = tiny_inputs / "shapes" / "images" / "eval-0.png", QUESTIONS[0][1]
    (tmp_path / "users").write_text("alice:correct horse\nbob:battery:staple\n")
    with serving(noisy_run, tmp_path, "--auth-file", str(tmp_path / "users")) as url:
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(url, verbose=False)
        for auth in (("alice", "wrong"), ("mallory", "correct horse"), ("bob", "battery")):
            with pytest.raises(ValueError, match="Could not login to"):  # Gradio answers 400 "Incorrect credentials."
                Client(url, auth=auth, verbose=False)
        # the API itself is closed, not only the page: a call without signing in is refused
        assert raw_answer_call(url, question).code == 401
        signed_in = Client(url, auth=("bob", "battery:staple"), verbose=False)
        assert api_answer(signed_in, image, question) == api_answer(client, image, question)
    assert "sign-in required" in (tmp_path / "serve.log").read_text()


def raw_answer_call(url: str, question: str) -> urllib.error.HTTPError:
    """The HTTP error a plain POST to the /answer API (no client library, no sign-in) gets."""
    call = urllib.request.Request(
        url + "gradio_api/call/answer",
        data=json.dumps({"data": [None, question]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(call, timeout=30)
    return refused.value


@contextlib.contextmanager
def stub_server(monkeypatch, chat, **options):
    """serve's app and launch settings around a stand-in for the model's conversation (`chat(loaded, image)`),
    in this process on a free local port: (URL, the console's lines)."""
    from qllava import serve

    monkeypatch.setattr(serve, "Chat", chat)
    said = []
    app = serve.start(
        serve.build_app(SimpleNamespace(kind="stub", template="plain"), "stub", said.append),
        "127.0.0.1",
        free_port(),
        **options,
    )
    try:
        yield app.local_url, said
    finally:
        app.close()


def test_a_full_queue_refuses_politely_and_the_waiting_requests_are_answered(monkeypatch, tiny_inputs):
    from gradio_client import Client, handle_file
    from gradio_client.utils import QueueError, Status

    started, release = threading.Event(), threading.Event()

    class HeldChat:
        """Answers only when the test lets it: the first request holds the model while the others queue."""

        def __init__(self, loaded, image):
            pass

        def prompt(self, question, max_new_tokens):
            return [1]

        def reply(self, question):
            started.set()
            assert release.wait(60)
            return f"answer to {question}"

    image = handle_file(str(tiny_inputs / "shapes" / "images" / "eval-0.png"))
    with stub_server(monkeypatch, HeldChat, max_queue=1) as (url, said):
        client = Client(url, verbose=False)
        answering = client.submit(image, "first", api_name="/answer")
        assert started.wait(60)
        waiting = client.submit(image, "second", api_name="/answer")
        deadline = time.monotonic() + 60
        while waiting.status().code != Status.IN_QUEUE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting.status().code == Status.IN_QUEUE
        with pytest.raises(QueueError, match="Queue is full"):  # the client's words; a page says "busy"
            client.submit(image, "third", api_name="/answer").result(timeout=60)
        refused = raw_answer_call(url, "fourth")  # what the server itself answers
        assert refused.code == 503
        assert json.loads(refused.read())["detail"] == "Queue is full. Max size is 1 and size is 1."
        release.set()
        assert [answering.result(timeout=60), waiting.result(timeout=60)] == ["answer to first", "answer to second"]
        assert client.predict(image, "fifth", api_name="/answer") == "answer to fifth"  # room again
    assert said == []


def test_a_server_bug_keeps_its_traceback_and_a_bad_input_gets_one_line(monkeypatch, tiny_inputs, capfd):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    class BrokenChat:
        def __init__(self, loaded, image):
            pass

        def prompt(self, question, max_new_tokens):
            return [1]

        def reply(self, question):
            raise RuntimeError("a bug in the server")

    image = handle_file(str(tiny_inputs / "shapes" / "images" / "eval-0.png"))
    with stub_server(monkeypatch, BrokenChat) as (url, said):
        client = Client(url, verbose=False)
        capfd.readouterr()
        with pytest.raises(AppError):
            client.predict(image, "What color is the shape?", api_name="/answer")
        bug = capfd.readouterr()
        with pytest.raises(AppError, match="Type a question about the image first."):
            client.predict(image, " ", api_name="/answer")
        visitor = capfd.readouterr()
    assert "Traceback" in bug.err and "RuntimeError: a bug in the server" in bug.err
    assert "Traceback" not in visitor.out + visitor.err
    assert said == ["refused a request: Type a question about the image first."]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the system (Debian's `chromium` package), driven by Playwright; Playwright's own
    browser download is never used."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip(
            "no chromium on PATH: install Debian's (apt-get install chromium; .ci/run does) to run the browser test"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


def ask_in_page(page, image, question: str) -> None:
    """What a person does: upload the image, wait for it to show, type the question, press Enter."""
    from playwright.sync_api import expect

    page.locator("input[type=file]").set_input_files(str(image))
    expect(page.get_by_label("Remove Image")).to_be_visible(timeout=30_000)  # drawn once the upload is done
    page.get_by_label("Question").fill(question)
    page.get_by_label("Question").press("Enter")


# Records every text the last answer shows while it grows (a MutationObserver sees each update of the page).
WATCH_ANSWERS = """() => { window.seen = [];
  new MutationObserver(() => { const bots = document.querySelectorAll('.message.bot');
    if (bots.length) window.seen.push(bots[bots.length - 1].innerText); })
  .observe(document.body, {childList: true, subtree: true, characterData: true}); }"""


@pytest.mark.browser
def test_the_page_streams_the_chat_answer_in_a_real_browser(browser, server, client, noisy_run, tiny_inputs, tmp_path):
    from playwright.sync_api import expect

    from qllava.chat import Chat

    image = tiny_inputs / "shapes" / "images" / "eval-1.png"
    chat = Chat(noisy_run, image)
    expected = [chat.reply(QUESTIONS[1][1]), chat.reply(QUESTIONS[2][1], 6)]
    assert expected[0] == api_answer(client, image, QUESTIONS[1][1])
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    page.goto(server)
    page.evaluate(WATCH_ANSWERS)
    ask_in_page(page, image, QUESTIONS[1][1])
    answer = page.locator(".message.bot").last
    expect(answer).to_have_text(expected[0], use_inner_text=True, timeout=120_000)
    expect(page.locator(".message.user").last).to_have_text(QUESTIONS[1][1])
    expect(page.locator(".generating")).to_have_count(0, timeout=60_000)
    # streamed: the answer grew in the page, each text shown a beginning of the final one ("Loading content" is
    # Gradio's placeholder for a message about to be drawn)
    final = " ".join(expected[0].split())
    shown = [" ".join(text.split()) for text in dict.fromkeys(page.evaluate("window.seen"))]
    shown = [text for text in shown if text not in ("", "Loading content")]
    assert len(shown) >= 3 and shown[-1] == final and [t for t in shown if not final.startswith(t)] == []
    page.screenshot(path=tmp_path / "serve.png")
    assert Image.open(tmp_path / "serve.png").size == (1200, 760)
    # a second turn about the same image, with max new tokens set on the page, continues the conversation
    set_number(page, "Max new tokens", "6")
    page.get_by_label("Question").fill(QUESTIONS[2][1])
    page.get_by_label("Question").press("Enter")
    expect(page.locator(".message.bot")).to_have_count(2, timeout=120_000)
    expect(page.locator(".message.bot").last).to_have_text(expected[1], use_inner_text=True, timeout=60_000)
    expect(page.locator(".generating")).to_have_count(0, timeout=60_000)
    page.get_by_role("button", name="Reset", exact=True).click()
    expect(page.locator(".message")).to_have_count(0)
    # a new conversation about the same image, sampled at temperature 2: not the greedy answer
    set_number(page, "Temperature (0: greedy)", "2")
    page.get_by_label("Question").fill(QUESTIONS[1][1])
    page.get_by_label("Question").press("Enter")
    expect(page.locator(".message.user")).to_have_text([QUESTIONS[1][1]], timeout=60_000)
    expect(page.locator(".message.bot")).to_have_count(1, timeout=120_000)
    expect(page.locator(".generating")).to_have_count(0, timeout=60_000)
    sampled = " ".join(page.locator(".message.bot").last.inner_text().split())
    assert sampled and sampled != " ".join(Chat(chat.loaded, image).reply(QUESTIONS[1][1], 6).split())
    page.close()


def set_number(page, slider: str, value: str) -> None:
    """Types a value into a slider's number box, as a person does."""
    page.get_by_label(f"number input for {slider}").fill(value)
    page.get_by_label(f"number input for {slider}").press("Tab")


@pytest.mark.browser
def test_the_page_shows_a_message_for_bad_input(browser, server, tiny_inputs, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page()
    page.goto(server)
    page.get_by_label("Question").fill("What color is the shape?")
    page.get_by_label("Question").press("Enter")
    expect(page.get_by_text("Upload an image first.")).to_be_visible(timeout=30_000)
    for path, message in bad_files(tmp_path):
        page.goto(server)
        ask_in_page(page, path, "What color is the shape?")
        expect(page.get_by_text(message)).to_be_visible(timeout=30_000)
    page.goto(server)
    ask_in_page(page, tiny_inputs / "shapes" / "images" / "eval-0.png", " ")
    expect(page.get_by_text("Type a question about the image first.")).to_be_visible(timeout=30_000)
    page.close()
