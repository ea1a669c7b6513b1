"""Each command's --help lists exactly the exit codes it can return, and its usage
line shows every required argument as required."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from hbp_image_tasks import check_viewer, errors, fetch_input, ingest, ingest_ngs, upload_results

PACKAGE = Path(errors.__file__).parent
COMMANDS = {
    "fetch_input": fetch_input,
    "ingest_ngs": ingest_ngs,
    "upload_results": upload_results,
    "ingest": ingest,
    "check_viewer": check_viewer,
}
# cli only re-raises the Interrupted of the block it guards and maps the rest to
# 1 and 130 (always listed), so its raise statements say nothing about a command.
PLUMBING = {"cli"}


def package_imports(module: str) -> set[str]:
    """Returns the package modules that ``module`` imports with relative imports."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(alias.name for alias in node.names)
    return {name for name in names if (PACKAGE / f"{name}.py").exists()}


def reachable_modules(command: str) -> set[str]:
    """Returns the package modules that the command's module imports, directly or not."""
    seen: set[str] = set()
    todo = [command]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(package_imports(module) - PLUMBING)
    return seen


def raised_error_types(module: str) -> set[type[errors.HbpError]]:
    """Returns the package errors that ``module`` raises or hands to a raiser.

    Counted: ``raise X(...)`` and ``error_type=X`` (the functions that raise a
    caller's error type), with X resolved in the module's namespace.
    """
    namespace = vars(importlib.import_module(f"hbp_image_tasks.{module}"))
    found: set[type[errors.HbpError]] = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            named = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        elif isinstance(node, ast.keyword) and node.arg == "error_type":
            named = node.value
        else:
            continue
        try:
            value = eval(compile(ast.Expression(named), module, "eval"), dict(namespace))
        except Exception:  # a variable (self.error_type, a caught error): counted where set
            continue
        if isinstance(value, type) and issubclass(value, errors.HbpError):
            found.add(value)
    return found


def codes_in_help(command: str, capsys) -> tuple[list[int], str]:
    """Returns the codes listed under "exit codes:" in the command's --help, and the help."""
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command].main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    block = text.split("\nexit codes:\n", 1)[1].split("\n\n", 1)[0]
    return [int(line.split()[0]) for line in block.splitlines() if line.strip()], text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_exactly_the_exit_codes_the_command_can_return(command, capsys):
    raised: set[type[errors.HbpError]] = set()
    for module in reachable_modules(command):
        raised |= raised_error_types(module)
    can_return = set(errors.ALWAYS_POSSIBLE)
    for error_type in raised:
        can_return |= errors.exit_codes_of(error_type)
    listed, _ = codes_in_help(command, capsys)
    assert listed == sorted(can_return)
    assert listed == errors.command_exit_codes(command)


@pytest.mark.parametrize(
    "command, absent",
    [
        ("fetch_input", [errors.EXIT_CONVERSION, errors.EXIT_UPLOAD]),
        ("ingest_ngs", [errors.EXIT_SOURCE, errors.EXIT_UPLOAD]),
        ("upload_results", [errors.EXIT_SOURCE, errors.EXIT_CONVERSION]),
        ("check_viewer", [errors.EXIT_CONVERSION, errors.EXIT_UPLOAD, errors.EXIT_INTERRUPTED]),
    ],
)
def test_help_leaves_out_the_other_steps_exit_codes(command, absent, capsys):
    listed, _ = codes_in_help(command, capsys)
    assert not set(absent) & set(listed)


def test_check_viewer_explains_its_codes_in_its_own_words(capsys):
    _, text = codes_in_help("check_viewer", capsys)
    assert "  3    the viewer could not load or render the dataset" in text
    assert "the same command resumes" not in text


def without_optional_parts(usage: str) -> str:
    """Returns the usage text with every [...] group removed."""
    previous = None
    while previous != usage:
        previous, usage = usage, re.sub(r"\[[^\[\]]*\]", "", usage)
    return usage


@pytest.mark.parametrize(
    "command, required",
    [
        ("fetch_input", ["URL", "--destination DIR"]),
        ("ingest_ngs", ["SOURCE", "--destination DIR"]),
        ("upload_results", ["RESULTS_DIR", "--container NAME"]),
        (
            "ingest",
            ["--source URL", "--download-dir DIR", "--results-dir DIR", "(--container NAME |"],
        ),
        ("check_viewer", ["URL"]),
    ],
)
def test_usage_shows_required_arguments_outside_brackets(command, required, capsys):
    with pytest.raises(SystemExit):
        COMMANDS[command].main(["--help"])
    usage = capsys.readouterr().out.split("\n\n", 1)[0]
    assert usage.startswith(f"usage: {command} ")
    mandatory = " ".join(without_optional_parts(usage).split())
    for argument in required:
        assert argument in mandatory


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_arguments_argparse_requires_are_shown_as_required(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command].main([])
    assert exit_info.value.code == errors.EXIT_USAGE
    stderr = capsys.readouterr().err
    usage = stderr.split(f"{command}: error:", 1)[0]
    mandatory = without_optional_parts(usage)
    missing = re.search(r"required: (.*)$", stderr, re.MULTILINE)
    names = missing.group(1).split(", ") if missing else ["SOURCE", "--destination"]
    for name in names:
        assert re.search(rf"(^|\s){re.escape(name)}(\s|$)", mandatory), (name, usage)
