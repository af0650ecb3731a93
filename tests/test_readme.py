"""Every command line the README and docs/ show names flags its command has, and every flag in their
option tables exists: checked against the commands' own --help (argparse, in process)."""
from __future__ import annotations

import re

import pytest

from .support import REPO

COMMANDS = ("build", "append", "attribute", "value", "info", "demo")
# The README keeps one example per feature; the full option tables and references live in docs/.
PAGES = ("README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")))


def pages_text() -> str:
    return "\n".join((REPO / page).read_text() for page in PAGES)


def help_text(command: str) -> str:
    if command == "api":
        from api.__main__ import main
        argv = ["--help"]
    else:
        from indexer.cli import main
        argv = [command, "--help"]
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(argv)
    return out.getvalue()


def command_lines(text: str) -> list[tuple[str, str]]:
    """(command, its whole line, continuations joined) for `python -m indexer CMD` and `python -m api`."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        for m in re.finditer(r"python -m (indexer (\w+)|api)\b([^`\n#|&;]*)", line):
            found.append(("api" if m.group(1) == "api" else m.group(2), m.group(3)))
    return found


def test_readme_command_lines_use_flags_their_commands_have():
    assert len(command_lines((REPO / "README.md").read_text())) >= 8  # set-up, build, append, info, serve, bulk
    lines = command_lines(pages_text())
    assert len(lines) > 10
    helps = {c: help_text(c) for c in {c for c, _ in lines}}
    missing = [(c, flag) for c, rest in lines for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest)
               if flag not in helps[c]]
    assert not missing, missing


def test_readme_option_tables_name_existing_flags():
    text = pages_text()
    everything = "".join(help_text(c) for c in (*COMMANDS, "api"))
    flags = {f for row in text.splitlines() if row.startswith("| `--") for f in re.findall(r"`(--[a-z][a-z-]*)", row)}
    assert len(flags) > 15
    assert sorted(f for f in flags if f not in everything) == []
