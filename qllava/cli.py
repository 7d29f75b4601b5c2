"""The `qllava` command: parses arguments and calls one function per command. The only place that decides
what is printed; expected problems (bad recipe, bad data, an existing run) end in a one-paragraph message
and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings



def main(argv: list[str] | None = None) -> int:
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
        console.console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.console.print("[yellow]interrupted[/]")
        return 130


def cmd_finetune(args) -> int:
    from . import console, train
    from .recipe import load_recipe
    recipe = load_recipe(args.recipe, args.overrides)
    stages = {"1": ("stage1",), "2": ("stage2",), "all": train.STAGES}[args.stage]
    metrics = train.finetune(recipe, stages, overwrite=args.overwrite, progress=console.TrainingProgress,
                             say=console.say)
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
    for name in {"1": ("stage1",), "2": ("stage2",), "all": ("stage1", "stage2")}[args.stage]:
        console.print_stats(stats.stage_stats(recipe, name))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qllava", description="QLoRA fine-tuning of LLaVA-style models on one GPU.")
    commands = parser.add_subparsers(dest="command", required=True)
    finetune = commands.add_parser("finetune", help="run LLaVA stage 1 and/or stage 2 as a recipe says")
    finetune.add_argument("recipe", help="recipe TOML file, e.g. recipes/mistral_qlora.toml")
    finetune.add_argument("overrides", nargs="*", metavar="table.key=value",
                          help="override recipe values, e.g. stage2.max_steps=10 output.dir=runs/try")
    finetune.add_argument("--stage", choices=("1", "2", "all"), default="all", help="which stages to run (default all)")
    finetune.add_argument("--overwrite", action="store_true", help="replace the stage folders of an existing run")
    finetune.set_defaults(run=cmd_finetune)

    data = commands.add_parser("data", help="inspect a recipe's data").add_subparsers(dest="data_command", required=True)
    data_stats = data.add_parser("stats", help="samples, lengths, skips and padded vs packed padding, per stage")
    data_stats.add_argument("recipe")
    data_stats.add_argument("overrides", nargs="*", metavar="table.key=value")
    data_stats.add_argument("--stage", choices=("1", "2", "all"), default="all")
    data_stats.set_defaults(run=cmd_data_stats)
    return parser


def _user_errors() -> tuple:
    from .data import DataError
    from .recipe import RecipeError
    from .templates import TemplateError
    return (RecipeError, DataError, TemplateError, FileExistsError, FileNotFoundError)


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
