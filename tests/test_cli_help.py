"""Every option of the five commands that has a default says it in --help."""
import argparse
import importlib

import pytest

PARSERS = [("app", "build_parser"), ("bench", "build_parser"), ("convert", "build_parser"),
           ("eval", "build_parser"), ("eval", "build_merge_parser"), ("train", "build_parser")]
FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
         argparse._HelpAction, argparse._VersionAction, argparse._CountAction)


def _spellings(default) -> set[str]:
    """How a default may be written in a help text: as is, or a float as %g (2.0: "2")."""
    out = {str(default).lower()}
    if isinstance(default, float):
        out.add(format(default, "g"))
    return out


def _without_default(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if isinstance(action, FLAGS) or action.help == argparse.SUPPRESS:
            continue
        if action.default in (None, False, argparse.SUPPRESS):
            continue
        shown = formatter._expand_help(action).lower() if action.help else ""
        if not any(s in shown for s in _spellings(action.default)):
            missing.append(f"{'/'.join(action.option_strings) or action.dest} "
                           f"(default {action.default!r}): {action.help!r}")
    return missing


@pytest.mark.parametrize("module, builder", PARSERS)
def test_help_shows_every_default(module, builder):
    parser = getattr(importlib.import_module(f"moshivis_mlx.cli.{module}"), builder)()
    assert _without_default(parser) == []
    parser.format_help()  # every %(default) expands


def test_the_check_sees_a_missing_default():
    p = argparse.ArgumentParser()
    p.add_argument("--shown", type=float, default=2.0, help="seconds (default 2)")
    p.add_argument("--expanded", type=int, default=7, help="count (default %(default)s)")
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--flag", action="store_true")
    assert [m.split()[0] for m in _without_default(p)] == ["--hidden"]


# The least each command needs besides -q (the app and the benchmark need nothing).
REQUIRED = {"app": [], "bench": [], "train": [],
            "convert": ["--hf-repo", "kyutai/x", "--out", "o"],
            "eval": ["--task", "coco", "--data", "d", "--images", "i", "--out", "o"]}


@pytest.mark.parametrize("module", ["app", "bench", "convert", "eval", "train"])
@pytest.mark.parametrize("given, preset", [
    (["-q", "q4"], "q4"), (["--quantize", "Q8"], "q8"), (["-q", "bf16"], "bf16"),
    (["-q", "4"], "q4"), (["-q", "none"], "bf16"),  # the app's earlier spelling
    (["--quant", "q4"], "q4"),  # the benchmark's and the converter's earlier spelling
])
def test_quantization_is_spelled_alike_in_the_five_commands(module, given, preset):
    parser = importlib.import_module(f"moshivis_mlx.cli.{module}").build_parser()
    assert parser.parse_args(REQUIRED[module] + given).quantize == preset
    help_text = " ".join(parser.format_help().split())
    assert "-q q8|q4|bf16, --quantize q8|q4|bf16" in help_text
    assert "--quant " not in help_text  # the alias is hidden


@pytest.mark.parametrize("module", ["app", "bench", "convert", "eval", "train"])
def test_an_unknown_quantization_is_a_usage_error(module, capsys):
    parser = importlib.import_module(f"moshivis_mlx.cli.{module}").build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(REQUIRED[module] + ["-q", "q3"])
    assert e.value.code == 2
    assert "choose q8 (8-bit, group 64), q4 (4-bit, group 32) or bf16" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["app", "eval"])
def test_the_end_of_an_answer_is_spelled_alike_with_one_default(module):
    from moshivis_mlx.session import ANSWER_SILENCE_S, MAX_ANSWER_S

    parser = importlib.import_module(f"moshivis_mlx.cli.{module}").build_parser()
    args = parser.parse_args(REQUIRED[module])
    assert (args.answer_silence, args.max_answer_seconds) == (ANSWER_SILENCE_S, MAX_ANSWER_S)
    args = parser.parse_args(REQUIRED[module] + ["--silence-s", "0.5", "--max-answer-s", "3"])
    assert (args.answer_silence, args.max_answer_seconds) == (0.5, 3.0)


@pytest.mark.parametrize("module", ["app", "eval"])
@pytest.mark.parametrize("flag, value", [("--answer-silence", "nan"), ("--answer-silence", "0"),
                                         ("--max-answer-seconds", "inf"),
                                         ("--max-answer-seconds", "-1")])
def test_an_answer_end_that_cannot_end_is_a_usage_error(module, flag, value, capsys):
    main = importlib.import_module(f"moshivis_mlx.cli.{module}").main
    with pytest.raises(SystemExit) as e:
        main(REQUIRED[module] + [flag, value])
    assert e.value.code == 2
    assert f"{flag} must be in (0, 3600] seconds" in capsys.readouterr().err
