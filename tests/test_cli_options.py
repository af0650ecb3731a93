"""`build` and `append` are built from one option table: an option both take reads the same in both
(help, default, type), and each command takes only what its function accepts."""
from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from indexer.build import BuildConfig, append_documents
from indexer.cli import DATA_OPTIONS, FIELDS_FROM_INDEX, PASS_OPTIONS, HelpFormatter, parser

# --model means another thing in each: build's model, or where append finds the index's own.
DIFFERENT_MEANING = {"--model"}


def subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def options(command: str) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in subparser(command)._actions if a.option_strings and a.dest != "help"}


def described(action: argparse.Action) -> dict:
    return {k: getattr(action, k) for k in ("dest", "help", "default", "type", "nargs", "choices", "required", "const")} | {
        "action": type(action).__name__}


def test_options_both_commands_take_read_the_same():
    build, append = options("build"), options("append")
    shared = set(build) & set(append)
    assert shared >= {"--data", "--text-field", "--id-field", "--batch-size", "--batch-tokens", "--shard-size",
                      "--device", "--skip-bad", "--no-progress"}
    assert shared == {flags[0] for flags, _ in DATA_OPTIONS + PASS_OPTIONS} | DIFFERENT_MEANING
    differ = {flag for flag in shared - DIFFERENT_MEANING if described(build[flag]) != described(append[flag])}
    assert differ == set(FIELDS_FROM_INDEX)  # append's fields default to what the index recorded
    for flag in FIELDS_FROM_INDEX:
        assert append[flag].default is None and append[flag].help == "default: as recorded in the index"
        assert {k: v for k, v in described(build[flag]).items() if k not in ("default", "help")} == \
               {k: v for k, v in described(append[flag]).items() if k not in ("default", "help")}


def test_each_help_shows_the_shared_options_identically(capsys):
    texts = {}
    for command in ("build", "append"):
        with pytest.raises(SystemExit):
            parser().parse_args([command, "--help"])
        texts[command] = " ".join(capsys.readouterr().out.split())  # unwrapped
    build = options("build")
    for flags, kwargs in PASS_OPTIONS + DATA_OPTIONS:
        if flags[0] not in FIELDS_FROM_INDEX and kwargs.get("help"):
            line = HelpFormatter("x")._get_help_string(build[flags[0]]) % {"default": build[flags[0]].default}
            assert all(line in t for t in texts.values()), flags


def test_append_takes_only_what_append_documents_accepts_with_its_defaults():
    params = inspect.signature(append_documents).parameters
    for flag, action in options("append").items():
        name = {"--index": "index_dir"}.get(flag, action.dest)
        assert name in params, flag
        default = params[name].default
        if default is not inspect.Parameter.empty:
            assert action.default == default, flag
    assert "--max-tokens" not in options("append") and "--preconditioner" not in options("append")


def test_build_options_are_build_config_fields_with_its_defaults():
    fields = {f.name: f for f in dataclasses.fields(BuildConfig)}
    for flag, action in options("build").items():
        assert action.dest in fields, flag
        f = fields[action.dest]
        if f.default is not dataclasses.MISSING and not isinstance(action, argparse._StoreConstAction):
            assert action.default == f.default, flag


def test_append_parses_the_shared_options():
    args = parser().parse_args(["append", "--index", "idx", "--data", "a.jsonl", "b.jsonl", "--batch-size", "4",
                                "--batch-tokens", "512", "--shard-size", "64", "--device", "auto", "--skip-bad",
                                "--no-progress", "--text-field", "body"])
    assert (args.data, args.batch_size, args.batch_tokens, args.shard_size, args.device) == \
           (["a.jsonl", "b.jsonl"], 4, 512, 64, "auto")
    assert args.skip_bad and not args.progress and args.text_field == "body" and args.id_field is None
    with pytest.raises(SystemExit):
        parser().parse_args(["append", "--index", "idx", "--data", "a.jsonl", "--batch-size", "0"])


def test_the_servers_help_names_every_option_and_its_default_once(capsys):
    """`python -m api --help`: every option has help text, and a default is stated once, the one used."""
    import re

    from api.__main__ import main as api_main
    from api.settings import ServerSettings
    with pytest.raises(SystemExit):
        api_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: " not in text  # no argparse-added second default
    for flag, default in (("--host", "127.0.0.1"), ("--port", "8000"), ("--device", "cpu"),
                          ("--request-timeout", f"{ServerSettings.model_fields['request_timeout_s'].default:g}"),
                          ("--shutdown-timeout", f"{ServerSettings.model_fields['shutdown_timeout_s'].default:g}")):
        entry = re.search(rf"{flag} [A-Z_]+ (.*?)(?= --|$)", text).group(1)
        assert entry.count("default") == 1 and f"default {default}" in entry, (flag, entry)


def test_every_indexer_option_has_help_that_states_its_default():
    """Each subcommand's --help: every option and argument has help text, and one with a default (not an
    on/off flag, not None) states that default exactly once, the one the parser uses."""
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"build", "append", "attribute", "value", "info", "demo"}
    checked = 0
    for command, p in sub.choices.items():
        formatter = p._get_formatter()
        for action in p._actions:
            if action.dest == "help":
                continue
            name = f"{command} {action.option_strings[0] if action.option_strings else action.dest}"
            assert action.help and action.help.strip(), f"{name} has no help"
            text = " ".join(formatter._expand_help(action).split())
            on_off = action.nargs == 0 or action.const is not None
            if on_off or action.default in (None, argparse.SUPPRESS) or action.required:
                continue
            shown = repr(action.default) if isinstance(action.default, str) and not action.default.strip() \
                else str(action.default)
            assert f"(default: {shown})" in text, (name, text)
            assert text.count("default") == 1, (name, text)
            checked += 1
    assert checked > 40
    helps = {c: " ".join(sub.choices[c].format_help().split()) for c in ("attribute", "value")}
    assert "cosine: scores divided by both vectors' norms; influence: the preconditioned inner product " \
           "(default: cosine)" in helps["attribute"]
    assert "(default: influence)" in helps["value"]
    data = " ".join(sub.choices["build"]._get_formatter()._expand_help(options("build")["--data"]).split())
    assert "hf://owner/name[:config][@split]" in data and "save_to_disk" in data
