"""The `qllava` command: parses arguments and calls one function per command. The only place that decides
what is printed; expected problems (bad recipe, bad data, an existing run) end in a one-paragraph message
and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
import textwrap
import warnings

from .scorers import BENCHMARKS


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
    _quiet_libraries()
    from . import console
    try:
        return args.run(args) or 0
    except _user_errors() as e:
        from rich.markup import escape  # messages quote paths and sample ids: "[3]" is not markup
        console.console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.stop_progress()
        console.say(interrupted_message(args, argv))
        return 130


def interrupted_message(args, argv: list[str]) -> str:
    """What Ctrl-C leaves on screen: for the commands that resume, the exact command that continues."""
    if args.command == "finetune":
        again = [a for a in argv if a not in ("--overwrite", "--resume")] + ["--resume"]
        return f"interrupted; continue with:\n  qllava {shlex.join(again)}"
    if args.command == "eval":
        return f"interrupted; the answers so far are kept, and the same command continues:\n  qllava {shlex.join(argv)}"
    return "interrupted"


def cmd_finetune(args) -> int:
    from . import console, train
    from .recipe import load_recipe
    recipe = load_recipe(args.recipe, args.overrides)
    stages = recipe.stages(args.stage)
    metrics = train.finetune(recipe, stages, overwrite=args.overwrite, resume=args.resume,
                             progress=console.TrainingProgress, say=console.say)
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
    console.say(f"run written to {recipe.run_dir} (metrics.json, stage1/, stage2/)")
    return 0


def cmd_data_stats(args) -> int:
    from . import console, stats
    from .recipe import load_recipe
    recipe = load_recipe(args.recipe, args.overrides)
    for name in recipe.stages(args.stage):
        console.print_stats(stats.stage_stats(recipe, name))
    return 0


def cmd_merge(args) -> int:
    from . import console, merge
    report = merge.merge(args.run_dir, args.out, dtype=args.dtype, overwrite=args.overwrite, verify=not args.no_verify,
                         say=console.say)
    console.say(f"merged checkpoint written to {args.out}: {report['output_bytes'] / 2**30:.2f} GiB in "
                f"{report['seconds']:.0f}s, peak RAM {report['peak_ram_gib']:.2f} GiB")
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
    chat = Chat(args.model, args.image)
    options = sampling(args.temperature, args.top_p)
    streamer = TextStreamer(chat.loaded.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.prompt is not None:
        chat.reply(args.prompt, args.max_new_tokens, streamer, **options)
        return 0
    console.say(f"chatting with {args.model} about {args.image} (template {chat.loaded.template}); "
                "an empty line or Ctrl-D ends")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            return 0
        if not text:
            return 0
        print("model> ", end="", flush=True)
        chat.reply(text, args.max_new_tokens, streamer, **options)


def cmd_serve(args) -> int:
    from . import console, serve
    serve.serve(args.model, args.host, args.port, quantized=args.quantized, say=console.say)
    return 0


def cmd_eval(args) -> int:
    from . import console, evaluate
    with console.counting(f"{args.benchmark}") as progress:
        result = evaluate.evaluate(args.model, args.benchmark, args.data, args.images, args.out, args.annotations,
                                   args.batch_size, args.limit, args.max_new_tokens, progress=progress)
    console.print_eval(result)
    console.say(f"answers: {result['answers']} ({result['asked_now']} asked now, "
                f"{result['questions'] - result['asked_now']} already there); metrics: "
                f"{result['answers'].removesuffix('.jsonl')}.metrics.json")
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
    result = plan.plan(recipe, args.gpu_memory, stages)
    console.print_plan(result)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "stages"} |
                         {"stages": {s: {k: v for k, v in e.items() if k != "parts"} | {"parts_gib": {
                             k: round(v / 2**30, 3) for k, v in e["parts"].items()}} for s, e in result["stages"].items()}}))
    return 0


def _memory_gib(text: str) -> float:
    """--gpu-memory: "24GiB", "24GB", "24G" or "24", in GiB."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(gib|gb|g)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: write it like 24GiB")
    return float(match.group(1))


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
    """qllava's parser; its subcommands' parsers are of this class too, so every --help shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


RECIPE_HELP = "recipe TOML file, e.g. recipes/mistral_qlora.toml"
OVERRIDES_HELP = "override recipe values, e.g. stage2.max_steps=10 output.dir=runs/try"
STAGE_HELP = "which stages: 1, 2 or all"
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")  # qllava.export.GGUF_TYPES (not imported: --help stays fast)


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(prog="qllava", description="QLoRA fine-tuning of LLaVA-style models on one GPU.")
    parser.add_argument("--version", action="version", version=f"qllava {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    finetune = commands.add_parser("finetune", help="run LLaVA stage 1 and/or stage 2 as a recipe says")
    finetune.add_argument("recipe", help=RECIPE_HELP)
    finetune.add_argument("overrides", nargs="*", metavar="table.key=value", help=OVERRIDES_HELP)
    finetune.add_argument("--stage", choices=("1", "2", "all"), default="all", help=STAGE_HELP)
    finetune.add_argument("--overwrite", action="store_true", help="replace the stage folders of an existing run")
    finetune.add_argument("--resume", action="store_true",
                          help="keep finished stages and continue an unfinished one from its latest checkpoint")
    finetune.set_defaults(run=cmd_finetune)

    data = commands.add_parser("data", help="inspect a recipe's data").add_subparsers(dest="data_command", required=True)
    data_stats = data.add_parser("stats", help="samples, lengths, skips and padded vs packed padding, per stage")
    data_stats.add_argument("recipe", help=RECIPE_HELP)
    data_stats.add_argument("overrides", nargs="*", metavar="table.key=value", help=OVERRIDES_HELP)
    data_stats.add_argument("--stage", choices=("1", "2", "all"), default="all", help=STAGE_HELP)
    data_stats.set_defaults(run=cmd_data_stats)

    merge = commands.add_parser("merge", help="export a run as a plain transformers LLaVA checkpoint")
    merge.add_argument("run_dir", help="a run folder (runs/NAME)")
    merge.add_argument("--out", required=True, help="folder to write the merged checkpoint to")
    merge.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                       help="dtype of the merged weights")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    merge.add_argument("--no-verify", action="store_true", help="skip the merged == base + adapter logit check")
    merge.set_defaults(run=cmd_merge)

    exp = commands.add_parser("export", help="write a run or merged model as GGUF files for llama.cpp (also Ollama, "
                              "LM Studio): the text model and mmproj-*.gguf")
    exp.add_argument("model", metavar="RUN_OR_MERGED", help="a run folder (merged on the fly) or a merged folder")
    exp.add_argument("--gguf", required=True, metavar="OUT_DIR", help="folder to write NAME-TYPE.gguf and "
                     "mmproj-NAME-F16.gguf to (F32 with --type f32)")
    exp.add_argument("--type", choices=GGUF_TYPES, default="f16",
                     help="the text model's weights; q4_k_m is made by llama.cpp's llama-quantize (on PATH)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    exp.set_defaults(run=cmd_export)

    chat = commands.add_parser("chat", help="talk to a run or merged model about an image")
    chat.add_argument("model", help="a run folder or a merged folder")
    chat.add_argument("--image", required=True, help="the image file to talk about")
    chat.add_argument("--prompt", help="one question; without it, an interactive conversation")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    chat.add_argument("--temperature", type=float, default=0.0, help="> 0 samples instead of greedy decoding")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature > 0)")
    chat.set_defaults(run=cmd_chat)

    srv = commands.add_parser("serve", help="a web page to talk with a run or merged model about an image, and an "
                              "/answer API")
    srv.add_argument("model", metavar="MODEL_OR_RUN", help="a run folder or a merged folder")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on: 127.0.0.1 is this machine only, "
                     "0.0.0.0 every network")
    srv.add_argument("--port", type=int, default=7860, help="port to listen on (refused before loading if taken)")
    srv.add_argument("--quantized", action=argparse.BooleanOptionalAction, default=True,
                     help="a run's base in 4-bit, as trained; --no-quantized loads it in its recipe's dtype")
    srv.set_defaults(run=cmd_serve)

    ev = commands.add_parser("eval", help="answer a benchmark's questions (resumable) and score them",
                             epilog=eval_formats())
    ev.add_argument("model", metavar="MODEL_OR_RUN", help="a run folder or a merged folder")
    ev.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="how the questions are read and scored")
    ev.add_argument("--data", required=True, help="the question file, in LLaVA's format")
    ev.add_argument("--images", default="", help="folder the questions' image paths are relative to (default: the current folder)")
    ev.add_argument("--annotations", help="ground truth: problems.json (scienceqa), the coco_pope_*.json folder (pope), "
                    "TextVQA/GQA annotation JSON (vqa), the MME_Benchmark folder (mme)")
    ev.add_argument("--out", help="answers file (LLaVA's JSON lines; default MODEL/eval/BENCHMARK-DATA.jsonl); "
                    "resumed if present")
    ev.add_argument("--batch-size", type=int, default=16, help="questions generated together")
    ev.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens")
    ev.set_defaults(run=cmd_eval)

    cmp = commands.add_parser("compare", help="evaluation results side by side, with paired bootstrap intervals")
    cmp.add_argument("results", nargs="+", metavar="RESULT", help="FILE.metrics.json (or the answers FILE.jsonl)")
    cmp.add_argument("--out", help="folder for report.md, report.json and compare.png")
    cmp.set_defaults(run=cmd_compare)

    pl = commands.add_parser("plan", help="will the recipe fit the card? parameter counts and peak memory per stage")
    pl.add_argument("recipe", help=RECIPE_HELP)
    pl.add_argument("overrides", nargs="*", metavar="table.key=value", help=OVERRIDES_HELP)
    pl.add_argument("--gpu-memory", type=_memory_gib, default=24.0, metavar="SIZE",
                    help="the card's memory in GiB, e.g. 16GiB")
    pl.add_argument("--stage", choices=("1", "2", "all"), default="all", help=STAGE_HELP)
    pl.add_argument("--json", action="store_true", help="also print one JSON object, last")
    pl.set_defaults(run=cmd_plan)
    return parser


def eval_formats() -> str:
    """`qllava eval --help`'s epilog: each benchmark's files, from the table in scorers."""
    lines = ["question files (official LLaVA's; every line is one question, whatever its id):"]
    for name, benchmark in BENCHMARKS.items():
        lines.append(textwrap.fill(benchmark.files, 110, initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13))
    lines.append("answers file: LLaVA's model_vqa*.py records (question_id, prompt, text, answer_id, model_id, metadata), "
                 "which\nLLaVA's eval_science_qa.py, eval_pope.py, eval_textvqa.py, convert_gqa_for_eval.py and MME's "
                 "tools read")
    return "\n".join(lines) + "\n"


def _user_errors() -> tuple:
    from .checkpoint import CheckpointError
    from .errors import DataError
    from .export import ExportError
    from .recipe import RecipeError
    from .merge import MergeError
    from .model import BaseMismatchError
    from .serve import ServeError
    from .templates import TemplateError
    from .vision import VisionError
    return (RecipeError, DataError, TemplateError, VisionError, MergeError, BaseMismatchError, ServeError,
            CheckpointError, ExportError, FileExistsError, FileNotFoundError)


def _quiet_libraries() -> None:
    """Keep the terminal for qllava's own output: library progress bars and advisory warnings off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
