"""The docs and ``--help`` cannot drift from the code: every ``--flag`` that README.md and docs/
name exists in the script they name it for, every default they state is the parser's, and every
number a help string gives as its default is the flag's default."""

import argparse
import importlib
import re
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {"cnn_rnn_classifier.py": "cnn_rnn_classifier", "lrcn.py": "lrcn", "captioning.py": "captioning"}
DEMOS = {"demo.sh": "cnn_rnn_classifier.py", "demo_tiny_imagenet.sh": "cnn_rnn_classifier.py",
         "demo_lrcn.sh": "lrcn.py", "demo_captioning.sh": "captioning.py"}  # extra flags go to train
PAGES = {"classifier.md": "cnn_rnn_classifier.py", "lrcn.md": "lrcn.py", "captioning.md": "captioning.py"}
COMMANDS = ("train", "evaluate", "predict", "caption", "export")
FLAG = r"--[a-z][a-z0-9-]*[a-z0-9](?![\w*-])"  # not a pattern such as --fine-tune-*
# Flags of other programs that the docs quote in their own command lines.
OTHER_PROGRAMS = {"--git-dir", "--upgrade", "--quiet", "--index-url", "--extra-index-url", "--no-deps"}


class _Parsed(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def parser_of(main, *args):
    """The ``argparse.ArgumentParser`` that ``main(*args)`` builds, caught as it starts parsing."""
    def caught(self, *unused, **also_unused):
        raise _Parsed(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", caught):
        try:
            main(*args)
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{main} parsed no command line")


def actions(parser):
    """``{command: {flag: action}}``: the parser's options, per sub-command (``""``: no commands)."""
    found = {}
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for command, sub in (subparsers[0].choices.items() if subparsers else [("", parser)]):
        found[command] = {flag: action for action in sub._actions for flag in action.option_strings
                          if flag.startswith("--")}
    return found


def tools():
    """Every program the docs run, by the name they run it with: ``{name: {command: {flag: action}}}``."""
    programs = {}
    for script, module in SCRIPTS.items():
        programs[script] = actions(parser_of(importlib.import_module(module).parse_args, []))
    for path in sorted((ROOT / "helpers").glob("*.py")):
        module = importlib.import_module(f"helpers.{path.stem}")
        if hasattr(module, "main") and "__main__" in path.read_text(encoding="utf-8"):
            programs[f"helpers.{path.stem}"] = actions(parser_of(module.main, ["--help"]))
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        try:
            module = importlib.import_module(f"benchmarks.{path.stem}")
        except ImportError:  # what it needs is not installed here (TensorFlow on a JAX run)
            continue
        if hasattr(module, "main"):
            main = module.main
            programs[f"benchmarks/{path.name}"] = actions(
                parser_of(main, ["--help"]) if main.__code__.co_argcount else parser_of(main))
    return programs


@pytest.fixture(scope="module")
def programs():
    return tools()


def command_lines(text):
    """``(program, command, flags)`` of every command line in ``text`` (continued lines joined)."""
    text = re.sub(r"\\\n\s*", " ", text)
    pattern = re.compile(r"(?:python(?:3)? (?:-m )?|bash )(\S+\.py|helpers\.\w+|demo\w*\.sh)([^\n`|]*)")
    for program, rest in pattern.findall(text):
        words = rest.split()
        command = words[0] if words and words[0] in COMMANDS else None
        if program in DEMOS:
            program, command = DEMOS[program], "train"
        yield program, command, re.findall(rf"(?<![\w-])({FLAG})", rest)


def owners(programs, flag):
    return [(name, command) for name, commands in programs.items() for command, flags in commands.items()
            if flag in flags]


@pytest.mark.backend_independent
def test_every_flag_the_docs_run_is_the_named_script_s(programs):
    wrong = []
    for doc in DOCS:
        for program, command, flags in command_lines(doc.read_text(encoding="utf-8")):
            if program not in programs:
                continue  # pytest, pip, a shell tool
            commands = programs[program]
            known = commands.get(command or "train", commands.get("", {}))
            wrong += [f"{doc.name}: {program} {command or ''} {flag}" for flag in flags
                      if flag not in known and flag not in OTHER_PROGRAMS]
    assert not wrong, "flags the docs run that the script does not have:\n" + "\n".join(wrong)


@pytest.mark.backend_independent
def test_every_flag_the_docs_name_exists(programs):
    """A flag in a script's page belongs to that script (or to a tool the page runs); elsewhere,
    to some program of the repository."""
    wrong = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for flag in sorted(set(re.findall(rf"`({FLAG})", text)) - OTHER_PROGRAMS):
            found = owners(programs, flag)
            page_script = PAGES.get(doc.name)
            if not found or (page_script and not any(
                    name == page_script or not name.endswith(".py") or name.startswith("benchmarks/")
                    for name, _ in found)):
                wrong.append(f"{doc.name}: {flag}")
    assert not wrong, "flags the docs name that no program (or not the page's script) has:\n" + "\n".join(wrong)


def stated_defaults(text):
    """``(flag, value)`` for each default the docs state: "`--flag ...` ... default[:] VALUE" (a
    number or a backticked word) or "off by default" (``False``) in the words after the flag, up to
    the clause's end (``;``, a full stop, a blank line) or the next flag."""
    for match in re.finditer(rf"`({FLAG})[^`]*`", text):
        after = re.split(r";|\.\s|\n\n|`--", text[match.end():match.end() + 100])[0]
        value = re.search(r"\bdefault:?\s+(-?\d[\d.e-]*(?=\s*[),;]|\s*$)|`[^`]+`)", after)
        if value:
            yield match.group(1), value.group(1).strip("`")
        elif re.search(r"\boff by default", after):
            yield match.group(1), False


def same(value, default):
    if value is False or default is None or isinstance(default, bool):
        return value == default or (value is False and default in (None, False))
    if isinstance(default, (int, float)):
        try:
            return float(value) == float(default)
        except ValueError:
            return False
    return str(value) == str(default)


@pytest.mark.backend_independent
def test_every_default_the_docs_state_is_the_parser_s(programs):
    wrong = []
    for doc in DOCS:
        page_script = PAGES.get(doc.name)
        for flag, value in stated_defaults(doc.read_text(encoding="utf-8")):
            found = owners(programs, flag)
            if page_script and any(name == page_script for name, _ in found):
                found = [(name, command) for name, command in found if name == page_script]
            defaults = {repr(programs[name][command][flag].default) for name, command in found}
            if found and not all(same(value, programs[name][command][flag].default) for name, command in found):
                wrong.append(f"{doc.name}: {flag} default {value!r}, the parser's {', '.join(sorted(defaults))}")
    assert not wrong, "defaults the docs state that the parsers do not have:\n" + "\n".join(wrong)


@pytest.mark.backend_independent
def test_every_number_a_help_gives_as_default_is_the_default(programs):
    wrong = []
    for name, commands in programs.items():
        for command, flags in commands.items():
            for flag, action in flags.items():
                stated = re.search(r"\(default: (-?\d[\d.e-]*)\)\s*$", action.help or "")
                if stated and not same(stated.group(1), action.default):
                    wrong.append(f"{name} {command} {flag}: help says {stated.group(1)}, default {action.default!r}")
    assert not wrong, "\n".join(wrong)
