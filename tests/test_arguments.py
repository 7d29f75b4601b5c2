"""Command-line arguments: every numeric option range-checked by argparse (one line, exit status 2, nothing run),
one name for the positional model argument, override examples that mean something to their command, the units of
`plan --gpu-memory`, what `merge --no-verify` skips, and no library notice before qllava's own output."""

import argparse
import logging

import pytest

from qllava import cli
from qllava.cli import _parser, main

MODEL = "runs/none"  # never read: every case below is refused while the arguments are parsed
RECIPE = "recipes/tiny_demo.toml"
# (command line, the flag the error names, what the error says)
OUT_OF_RANGE = [
    (["chat", MODEL, "--image", "x.png", "--max-new-tokens", "0"], "--max-new-tokens", "must be >= 1, got 0"),
    (["chat", MODEL, "--image", "x.png", "--max-new-tokens", "-5"], "--max-new-tokens", "must be >= 1, got -5"),
    (["chat", MODEL, "--image", "x.png", "--max-new-tokens", "2.5"], "--max-new-tokens", "'2.5' is not an integer"),
    (["chat", MODEL, "--image", "x.png", "--temperature", "-1"], "--temperature", "must be >= 0, got -1"),
    (["chat", MODEL, "--image", "x.png", "--temperature", "nan"], "--temperature", "must be >= 0, got nan"),
    (["chat", MODEL, "--image", "x.png", "--temperature", "inf"], "--temperature", "must be >= 0, got inf"),
    (["chat", MODEL, "--image", "x.png", "--temperature", "1", "--top-p", "2"], "--top-p", "must be in (0, 1], got 2"),
    (["chat", MODEL, "--image", "x.png", "--temperature", "1", "--top-p", "0"], "--top-p", "must be in (0, 1], got 0"),
    (["chat", MODEL, "--image", "x.png", "--top-p", "0.9"], "--top-p", "takes effect only with --temperature > 0"),
    (
        ["eval", MODEL, "--benchmark", "vqa", "--data", "q.json", "--batch-size", "0"],
        "--batch-size",
        "must be >= 1, got 0",
    ),
    (["eval", MODEL, "--benchmark", "vqa", "--data", "q.json", "--limit", "-1"], "--limit", "must be >= 0, got -1"),
    (
        ["eval", MODEL, "--benchmark", "vqa", "--data", "q.json", "--max-new-tokens", "0"],
        "--max-new-tokens",
        "must be >= 1, got 0",
    ),
    (["eval", MODEL, "--benchmark", "vqa", "--data", "q.json", "--limit", "ten"], "--limit", "'ten' is not an integer"),
    (["serve", MODEL, "--port", "99999"], "--port", "must be in [1, 65535], got 99999"),
    (["serve", MODEL, "--port", "0"], "--port", "must be in [1, 65535], got 0"),
    (["plan", RECIPE, "--gpu-memory", "0GiB"], "--gpu-memory", "must be > 0, got 0GiB"),
    (["plan", RECIPE, "--gpu-memory", "-8"], "--gpu-memory", "write 24GiB (2^30 bytes) or 24GB"),
    (["plan", RECIPE, "--gpu-memory", "16G"], "--gpu-memory", "G alone is ambiguous"),
    (["plan", RECIPE, "--gpu-memory", "16TB"], "--gpu-memory", "write 24GiB"),
]


@pytest.mark.parametrize("argv,flag,message", OUT_OF_RANGE, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_out_of_range_numbers_are_one_line_and_exit_2_before_anything_runs(argv, flag, message, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(cli, "_quiet_libraries", lambda: ran.append("libraries"))  # reached only after parsing
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr()
    assert done.value.code == 2 and not ran and err.out == ""
    lines = err.err.splitlines()
    assert len(lines) == 1 and flag in lines[0] and message in lines[0], lines
    assert lines[0].startswith(f"qllava {argv[0]}: error: argument {flag}")


def test_every_numeric_option_is_range_checked():
    """The class, not the examples: every option that takes a number goes through one of cli's checked types."""
    checked = {
        cli.positive_int,
        cli.non_negative_int,
        cli.port_number,
        cli.temperature,
        cli.probability,
        cli.memory_gib,
    }
    found = 0
    for parser in _all_parsers():
        for action in parser._actions:
            numeric_default = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
            if action.type in (int, float) or action.type in checked or numeric_default:
                assert action.type in checked, f"{parser.prog} {action.option_strings}: type {action.type}"
                found += 1
    assert found >= 8  # chat 3, eval 3, serve 1, plan 1, and any added later


def test_numbers_in_range_are_read_as_given():
    args = _parser().parse_args(
        ["chat", MODEL, "--image", "x.png", "--max-new-tokens", "1", "--temperature", "0.7", "--top-p", "1"]
    )
    assert (args.max_new_tokens, args.temperature, args.top_p) == (1, 0.7, 1.0)
    args = _parser().parse_args(["eval", MODEL, "--benchmark", "vqa", "--data", "q", "--limit", "0"])
    assert (args.limit, args.batch_size, args.max_new_tokens) == (0, 16, 128)
    assert _parser().parse_args(["serve", MODEL, "--port", "65535"]).port == 65535


@pytest.mark.parametrize(
    "text,gib",
    [
        ("24", 24.0),
        ("24GiB", 24.0),
        ("24 gib", 24.0),
        ("16GB", 16e9 / 2**30),
        ("24576MiB", 24.0),
        ("16000MB", 16e9 / 2**30),
        ("0.5GiB", 0.5),
    ],
)
def test_gpu_memory_units_keep_their_meaning(text, gib):
    assert cli.memory_gib(text) == pytest.approx(gib)
    assert cli.memory_gib("16GB") < 14.91  # 10^9 bytes, not read as GiB


def test_one_name_for_the_model_argument_and_its_help():
    names = {}
    for parser in _all_parsers():
        for action in parser._actions:
            if not action.option_strings and action.dest in ("model", "run_path"):
                names[parser.prog.split()[-1]] = action.metavar
    both = "MODEL_OR_RUN"
    assert names == {"chat": both, "serve": both, "eval": both, "export": both, "merge": "RUN"}
    usage = " ".join(_subparser("chat").format_usage().split())
    assert "MODEL_OR_RUN" in usage and "model" not in usage.replace("MODEL_OR_RUN", "")


def test_override_examples_name_keys_the_command_reads():
    helps = {
        name: " ".join(_subparser(*name.split()).format_help().split()) for name in ("finetune", "plan", "data stats")
    }
    assert "output.dir=runs/try" in helps["finetune"]
    assert "output.dir" not in helps["plan"] and "output.dir" not in helps["data stats"]
    assert "stage2.max_seq_len=4096" in helps["plan"] and "stage2.max_seq_len=4096" in helps["data stats"]


def test_merge_no_verify_help_says_it_skips_the_weight_checks_too():
    text = " ".join(_subparser("merge").format_help().split())
    assert "--no-verify skip verification: the weight checks" in text and "as well as the logit check" in text


def test_the_offline_trust_notice_of_kernels_is_dropped_and_its_other_warnings_kept():
    from kernels._internals import hf_hub  # where the notice is logged, with the name the filter sits on

    logger = logging.getLogger("kernels._internals.hf_hub")
    assert hf_hub.logger is logger
    cli._quiet_libraries()
    cli._quiet_libraries()  # once is enough, however often main runs
    assert logger.filters.count(cli._TRUST_NOTICE) == 1
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning(
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because "
            "Hugging Face Hub is in offline mode."
        )
        logger.warning("Kernel kernels-community/x could not be loaded")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Kernel kernels-community/x could not be loaded"]


def _all_parsers() -> list[argparse.ArgumentParser]:
    parsers = [_parser()]
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
    return parsers


def _subparser(*names: str) -> argparse.ArgumentParser:
    parser = _parser()
    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser
