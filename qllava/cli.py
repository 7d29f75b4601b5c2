"""The `qllava` command: parses arguments and calls one function per command. The only place that decides
what is printed; expected problems (bad recipe, bad data, an existing run) end in a one-paragraph message
and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import sys
import textwrap
import warnings

from .scorers import BENCHMARKS

# Range-checked option types: a number out of range is one line from argparse and exit status 2, before any work.
# Every numeric option of every command uses one of these (or a new one here).


def _number(kind: type, low: float, high: float | None = None, low_open: bool = False, name: str = ""):
    """An argparse type: a finite `kind` (int or float) >= low (> low when low_open) and, given high, <= high."""
    if high is None:
        bounds = f"> {low:g}" if low_open else f">= {low:g}"
    else:
        bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    parse.__name__ = name or kind.__name__
    return parse


positive_int = _number(int, 1, name="positive integer")
non_negative_int = _number(int, 0, name="non-negative integer")
port_number = _number(int, 1, 65535, name="port")
temperature = _number(float, 0, name="temperature")
probability = _number(float, 0, 1, low_open=True, name="probability")

GIB = 2**30
MEMORY_UNITS = {"gib": GIB, "mib": 2**20, "gb": 10**9, "mb": 10**6, "": GIB}


def memory_gib(text: str) -> float:
    """--gpu-memory in GiB: "24GiB" or "24" (GiB), "24576MiB", "16GB" (10^9 bytes: 14.90 GiB), "16000MB".
    "G" and "M" alone are refused: a card sold as "24 GB" holds 24 GiB, so the unit must be said."""
    match = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in MEMORY_UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write 24GiB (2^30 bytes) or 24GB (10^9 bytes; a card sold as "
            "24 GB has 24GiB); G alone is ambiguous"
        )
    size = float(match.group(1)) * MEMORY_UNITS[match.group(2)] / GIB
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return size


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    # Overrides may come after options (`--overwrite stage2.max_steps=10`), which argparse leaves over.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = args.overrides + extra
    _check_combinations(parser, args)
    _quiet_libraries()
    from . import console

    try:
        return args.run(args) or 0
    except _user_errors() as e:
        from rich.markup import escape  # messages quote paths and sample ids: "[3]" is not markup

        from .errors import user_message

        console.console.print(f"[bold red]error:[/] {escape(user_message(e))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.stop_progress()
        console.say(interrupted_message(args, argv))
        return 130


def _check_combinations(parser: argparse.ArgumentParser, args) -> None:
    """Options that are each in range but would be silently ignored together."""
    if getattr(args, "top_p", 1.0) != 1.0 and getattr(args, "temperature", None) == 0:
        command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        command.error("argument --top-p: takes effect only with --temperature > 0 (at 0, decoding is greedy)")


def interrupted_message(args, argv: list[str]) -> str:
    """What Ctrl-C leaves on screen: for the commands that resume, the exact command that continues."""
    if args.command == "finetune":
        again = [a for a in argv if a not in ("--overwrite", "--resume")] + ["--resume"]
        note = _restart_note(args)
        lead = f"interrupted; {note}; run it with:" if note else "interrupted; continue with:"
        return f"{lead}\n  qllava {shlex.join(again)}"
    if args.command == "eval":
        return f"interrupted; the answers so far are kept, and the same command continues:\n  qllava {shlex.join(argv)}"
    return "interrupted"


def _restart_note(args) -> str | None:
    """Why the --resume command would start the interrupted stage over (it wrote no checkpoint), or None."""
    from .recipe import RecipeError, load_recipe
    from .resume import interrupted_note

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError:
        return None
    return interrupted_note(recipe, recipe.stages(args.stage))


def cmd_finetune(args) -> int:
    from . import console, train
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    stages = recipe.stages(args.stage)
    metrics = train.finetune(
        recipe, stages, overwrite=args.overwrite, resume=args.resume, progress=console.TrainingProgress, say=console.say
    )
    from accelerate import PartialState

    state = PartialState()
    # Under torchrun, a process that exits with its gloo group still alive can abort (SIGABRT, "terminate
    # called without an active exception") after a run that succeeded: gloo's threads still hold work while
    # the interpreter shuts down. Every process waits for the others, then takes the group down itself.
    state.wait_for_everyone()
    state.destroy_process_group()
    if not state.is_main_process:
        return 0
    console.console.print(console.stage_table(metrics))
    accuracy = console.accuracy_table(metrics)
    if accuracy is not None:
        console.console.print(accuracy)
    from .run import STAGES, RunFolder

    folders = [f"{name}/" for name in STAGES if RunFolder(recipe.run_dir).complete(name)]
    console.say(f"run written to {recipe.run_dir} ({', '.join(['metrics.json', *folders])})")
    return 0


def cmd_data_stats(args) -> int:
    from . import console, stats
    from .errors import DataError
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    problems = 0
    for name in recipe.stages(args.stage):
        data = stats.stage_data(recipe, name)
        console.print_stats(stats.stage_stats(recipe, name, data))
        if args.check_images:
            with console.counting(f"{name}: decoding images", unit="images") as progress:
                check = stats.check_images(recipe, data, progress)
            console.print_image_check(name, check)
            problems += len(check["problems"])
    if problems:
        raise DataError(
            f"{problems} image file(s) cannot be used as training would use them (listed above): remove "
            "or fix each one, then train (a sample whose image is missing is skipped and counted)"
        )
    return 0


def cmd_merge(args) -> int:
    from . import console, merge

    report = merge.merge(
        args.run_path, args.out, dtype=args.dtype, overwrite=args.overwrite, verify=not args.no_verify, say=console.say
    )
    console.say(
        f"merged checkpoint written to {args.out}: {report['output_bytes'] / 2**30:.2f} GiB in "
        f"{report['seconds']:.0f}s, peak RAM {report['peak_ram_gib']:.2f} GiB"
    )
    return 0


def cmd_export(args) -> int:
    from . import console, export

    report = export.export_gguf(args.model, args.gguf, gguf_type=args.type, overwrite=args.overwrite, say=console.say)
    for note in report["notes"]:
        console.say(f"note: {note}")
    console.say(f"written in {report['seconds']:.0f}s:")
    for path, size in report["files"]:
        console.say(f"  {path}  {size / 2**20:,.1f} MiB")
    console.say(f"try it:\n  {report['command']}")
    return 0


def cmd_chat(args) -> int:
    from transformers import TextStreamer

    from . import console
    from .chat import Chat, sampling
    from .inference import ContextError

    chat = Chat(args.model, args.image)
    options = sampling(args.temperature, args.top_p)
    streamer = TextStreamer(chat.loaded.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.prompt is not None:
        chat.reply(args.prompt, args.max_new_tokens, streamer, **options)
        return 0
    console.say(
        f"chatting with {args.model} about {args.image} (template "
        f"{chat.loaded.template or 'of the checkpoint'}); an empty line or Ctrl-D ends"
    )
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            return 0
        if not text:
            return 0
        try:
            chat.prompt(text, args.max_new_tokens)
        except ContextError as e:  # the conversation is as it was: a shorter question may still fit
            console.say(f"not asked: {e}")
            continue
        print("model> ", end="", flush=True)
        chat.reply(text, args.max_new_tokens, streamer, **options)


def cmd_serve(args) -> int:
    from . import console, serve

    auth = serve.load_auth(args.auth, args.auth_file, args.no_auth)
    serve.serve(
        args.model,
        args.host,
        args.port,
        quantized=args.quantized,
        auth=auth,
        no_auth=args.no_auth,
        max_queue=args.max_queue,
        say=console.say,
    )
    return 0


def cmd_eval(args) -> int:
    from . import console, evaluate

    with console.counting(f"{args.benchmark}") as progress:
        result = evaluate.evaluate(
            args.model,
            args.benchmark,
            args.data,
            args.images,
            args.out,
            args.annotations,
            args.batch_size,
            args.limit,
            args.max_new_tokens,
            progress=progress,
        )
    console.print_eval(result)
    console.say(
        f"answers: {result['answers']} ({result['asked_now']} asked now, "
        f"{result['questions'] - result['asked_now']} already there); metrics: "
        f"{result['answers'].removesuffix('.jsonl')}.metrics.json"
    )
    return 0


def cmd_compare(args) -> int:
    from . import compare, console

    report = compare.compare(args.results, args.out)
    console.console.print(console.compare_table(report))
    if args.out:
        console.say(f"report written to {args.out}/report.md and {args.out}/compare.png")
    return 0


def cmd_plan(args) -> int:
    import json

    from . import console, plan
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    stages = recipe.stages(args.stage)
    with console.tables_to_stderr(args.json):
        result = plan.plan(recipe, args.gpu_memory, stages)
        console.print_plan(result)
        if args.trace:
            from . import trace

            traced = trace.trace(recipe, stages, args.device, args.gpu_memory)
            console.print_trace(traced, args.gpu_memory)
    if args.json and args.trace:
        print(
            json.dumps(
                {"recipe": result["recipe"], "gpu_memory_gib": args.gpu_memory, "device": args.device, "stages": traced}
            )
        )
    elif args.json:
        parts = {
            s: {k: v for k, v in e.items() if k != "parts"}
            | {"parts_gib": {k: round(v / 2**30, 3) for k, v in e["parts"].items()}}
            for s, e in result["stages"].items()
        }
        print(json.dumps({k: v for k, v in result.items() if k != "stages"} | {"stages": parts}))
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (flags, and options without a default, excepted)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default == "" or default is argparse.SUPPRESS)
        if shown and action.option_strings and not action.required and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """qllava's parser; its subcommands' parsers are of this class too, so every --help shows the defaults, and
    every argument error is one line (the usage is one --help away) and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


RECIPE_HELP = "recipe TOML file, e.g. recipes/mistral_qlora.toml"
STAGE_HELP = "which stages: 1, 2 or all"
MODEL_OR_RUN = "MODEL_OR_RUN"
"""The positional argument of the commands that load a model: a run folder or a merged one."""
MODEL_OR_RUN_HELP = "a run folder (runs/NAME) or a merged folder (qllava merge's --out), or a llava-hf checkpoint"


def overrides_help(example: str) -> str:
    """--help for a command's recipe overrides, with an example of keys that matter to that command."""
    return f"override recipe values, e.g. {example}"


GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")  # qllava.export.GGUF_TYPES (not imported: --help stays fast)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="qllava", description="QLoRA fine-tuning of LLaVA-style models on one GPU.")
    parser.add_argument("--version", action="version", version=f"qllava {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    finetune = commands.add_parser("finetune", help="run LLaVA stage 1 and/or stage 2 as a recipe says")
    finetune.add_argument("recipe", help=RECIPE_HELP)
    finetune.add_argument(
        "overrides",
        nargs="*",
        metavar="table.key=value",
        help=overrides_help("stage2.max_steps=10 output.dir=runs/try"),
    )
    finetune.add_argument("--stage", choices=("1", "2", "all"), default="all", help=STAGE_HELP)
    finetune.add_argument("--overwrite", action="store_true", help="replace the stage folders of an existing run")
    finetune.add_argument(
        "--resume",
        action="store_true",
        help="keep finished stages and continue an unfinished one from its latest checkpoint",
    )
    finetune.set_defaults(run=cmd_finetune)

    data = commands.add_parser("data", help="inspect a recipe's data").add_subparsers(
        dest="data_command", required=True
    )
    data_stats = data.add_parser("stats", help="samples, lengths, skips and padded vs packed padding, per stage")
    data_stats.add_argument("recipe", help=RECIPE_HELP)
    data_stats.add_argument(
        "overrides",
        nargs="*",
        metavar="table.key=value",
        help=overrides_help("stage2.max_seq_len=4096 data.num_proc=4"),
    )
    data_stats.add_argument("--stage", choices=("1", "2", "all"), default="all", help=STAGE_HELP)
    data_stats.add_argument(
        "--check-images",
        action="store_true",
        help="also decode every image the samples use, as training will (a file cut short passes "
        "the header check); exit status 2 naming each file that fails",
    )
    data_stats.set_defaults(run=cmd_data_stats)

    merge = commands.add_parser("merge", help="export a run as a plain transformers LLaVA checkpoint")
    merge.add_argument("run_path", metavar="RUN", help="a run folder written by qllava finetune (runs/NAME)")
    merge.add_argument("--out", required=True, help="folder to write the merged checkpoint to")
    merge.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="dtype of the merged weights"
    )
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    merge.add_argument(
        "--no-verify",
        action="store_true",
        help="skip verification: the weight checks (peft's merge against base + adapter in float32, "
        "every written weight against peft's merge, bit for bit) as well as the logit check of the "
        "written folder against base + adapter",
    )
    merge.set_defaults(run=cmd_merge)

    exp = commands.add_parser(
        "export",
        help="write a run or merged model as GGUF files for llama.cpp (also Ollama, "
        "LM Studio): the text model and mmproj-*.gguf",
    )
    exp.add_argument(
        "model", metavar="MODEL_OR_RUN", help="a run folder (merged on the fly) or a folder qllava merge wrote"
    )
    exp.add_argument(
        "--gguf",
        required=True,
        metavar="OUT_DIR",
        help="folder to write NAME-TYPE.gguf and mmproj-NAME-F16.gguf to (F32 with --type f32)",
    )
    exp.add_argument(
        "--type",
        choices=GGUF_TYPES,
        default="f16",
        help="the text model's weights; q4_k_m is made by llama.cpp's llama-quantize (on PATH)",
    )
    exp.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    exp.set_defaults(run=cmd_export)

    chat = commands.add_parser("chat", help="talk to a run or merged model about an image")
    chat.add_argument("model", metavar=MODEL_OR_RUN, help=MODEL_OR_RUN_HELP)
    chat.add_argument("--image", required=True, help="the image file to talk about")
    chat.add_argument("--prompt", help="one question; without it, an interactive conversation")
    chat.add_argument("--max-new-tokens", type=positive_int, default=256, help="longest answer, in tokens")
    chat.add_argument(
        "--temperature", type=temperature, default=0.0, help="0 decodes greedily, > 0 samples at that temperature"
    )
    chat.add_argument(
        "--top-p", type=probability, default=1.0, help="nucleus sampling threshold in (0, 1]; needs --temperature > 0"
    )
    chat.set_defaults(run=cmd_chat)

    srv = commands.add_parser(
        "serve", help="a web page to talk with a run or merged model about an image, and an /answer API"
    )
    srv.add_argument("model", metavar=MODEL_OR_RUN, help=MODEL_OR_RUN_HELP)
    srv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on: 127.0.0.1 is this machine only, "
        "0.0.0.0 every network; any but a loopback address needs a sign-in or --no-auth",
    )
    srv.add_argument(
        "--port", type=port_number, default=7860, help="port to listen on, 1 to 65535 (refused before loading if taken)"
    )
    srv.add_argument(
        "--quantized",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a run's base in 4-bit, as trained; --no-quantized loads it in its recipe's dtype",
    )
    access = srv.add_mutually_exclusive_group()
    access.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        help="visitors and API clients sign in (shell history "
        "keeps this: prefer --auth-file or QLLAVA_SERVE_AUTH=USER:PASSWORD)",
    )
    access.add_argument("--auth-file", metavar="PATH", help="a file with one USER:PASSWORD line per user")
    access.add_argument(
        "--no-auth",
        action="store_true",
        help="serve an address other machines can reach without "
        "a password, deliberately (without auth, only a loopback --host is served)",
    )
    srv.add_argument(
        "--max-queue",
        type=positive_int,
        default=16,
        metavar="N",
        help="requests that may wait for the model; more are refused as busy until one is answered",
    )
    srv.set_defaults(run=cmd_serve)

    ev = commands.add_parser(
        "eval", help="answer a benchmark's questions (resumable) and score them", epilog=eval_formats()
    )
    ev.add_argument("model", metavar=MODEL_OR_RUN, help=MODEL_OR_RUN_HELP)
    ev.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="how the questions are read and scored")
    ev.add_argument("--data", required=True, help="the question file, in LLaVA's format")
    ev.add_argument(
        "--images", default="", help="folder the questions' image paths are relative to (default: the current folder)"
    )
    ev.add_argument(
        "--annotations",
        help="ground truth: problems.json (scienceqa), the coco_pope_*.json folder (pope), "
        "TextVQA/GQA annotation JSON (vqa), the MME_Benchmark folder (mme)",
    )
    ev.add_argument(
        "--out",
        help="answers file (LLaVA's JSON lines; default MODEL_OR_RUN/eval/BENCHMARK-DATA.jsonl); "
        "continued if present, when made by the same model with the same settings",
    )
    ev.add_argument("--batch-size", type=positive_int, default=16, help="questions generated together")
    ev.add_argument("--limit", type=non_negative_int, default=0, help="only the first N questions (0: all)")
    ev.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=128,
        help="longest answer, in tokens (recorded with each answer: a file is continued only with its own)",
    )
    ev.set_defaults(run=cmd_eval)

    cmp = commands.add_parser("compare", help="evaluation results side by side, with paired bootstrap intervals")
    cmp.add_argument(
        "results",
        nargs="+",
        metavar="RESULT",
        help="FILE.metrics.json, the answers FILE.jsonl, or a run or merged folder whose eval/ holds one result",
    )
    cmp.add_argument("--out", help="folder for report.md, report.json and compare.png")
    cmp.set_defaults(run=cmd_compare)

    pl = commands.add_parser("plan", help="will the recipe fit the card? parameter counts and peak memory per stage")
    pl.add_argument("recipe", help=RECIPE_HELP)
    pl.add_argument(
        "overrides",
        nargs="*",
        metavar="table.key=value",
        help=overrides_help("stage2.per_device_train_batch_size=2 stage2.max_seq_len=4096"),
    )
    pl.add_argument(
        "--gpu-memory",
        type=memory_gib,
        default=24.0,
        metavar="SIZE",
        help="the card's memory: 16GiB (or 16, in GiB), 16384MiB, or 16GB meaning 10^9 bytes (14.9 GiB; "
        "a card sold as 16 GB has 16GiB); G alone is refused as ambiguous",
    )
    pl.add_argument("--stage", choices=("1", "2", "all"), default="all", help=STAGE_HELP)
    pl.add_argument("--json", action="store_true", help="print one JSON object on stdout (the tables go to stderr)")
    pl.add_argument(
        "--trace",
        action="store_true",
        help="run two real training steps of each stage on fake tensors (no weights, no GPU; 6-16 s for a "
        "7B stage on 2 cores) and count their memory and FLOPs",
    )
    pl.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="with --trace: the device whose training paths are traced (cuda: a card's, with its "
        "allowances; cpu: this machine's, as the tests check against real execution)",
    )
    pl.set_defaults(run=cmd_plan)
    return parser


def eval_formats() -> str:
    """`qllava eval --help`'s epilog: each benchmark's files, from the table in scorers."""
    lines = ["question files (official LLaVA's; every line is one question, whatever its id):"]
    for name, benchmark in BENCHMARKS.items():
        lines.append(textwrap.fill(benchmark.files, 110, initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13))
    lines.append(
        "answers file: LLaVA's model_vqa*.py records (question_id, prompt, text, answer_id, model_id, metadata), "
        "which\nLLaVA's eval_science_qa.py, eval_pope.py, eval_textvqa.py, convert_gqa_for_eval.py and MME's "
        "tools read"
    )
    return "\n".join(lines) + "\n"


def _user_errors() -> tuple:
    from .checkpoint import CheckpointError
    from .errors import DataError
    from .export import ExportError
    from .folders import FolderError
    from .inference import ContextError
    from .merge import MergeError
    from .model import BaseMismatchError
    from .recipe import RecipeError
    from .resume import ResumeError
    from .serve import ServeError
    from .templates import TemplateError
    from .trace import TraceError
    from .vision import VisionError

    return (
        RecipeError,
        DataError,
        TemplateError,
        VisionError,
        MergeError,
        BaseMismatchError,
        ServeError,
        CheckpointError,
        ResumeError,
        FolderError,
        ContextError,
        ExportError,
        FileExistsError,
        FileNotFoundError,
        TraceError,
    )


class _OfflineTrustNotice(logging.Filter):
    """Drops the one notice the `kernels` package logs each time bitsandbytes (on CPUs with AVX512-BF16) fetches its
    CPU kernel while the hub is offline: that the kernel's publisher was not re-checked. Its other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Skipping publisher trust check")


_TRUST_NOTICE = _OfflineTrustNotice()  # one instance: logging adds a filter once however often main() runs


def _quiet_libraries() -> None:
    """Keep the terminal for qllava's own output: library progress bars and advisory warnings off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("kernels._internals.hf_hub").addFilter(_TRUST_NOTICE)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
