"""The README's tables that mirror the code (parameters, exit codes, commands,
benchmarks) agree with the code, so they cannot drift."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from hbp_image_tasks import errors, parameters

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
MAX_LINES = 260
CHOICES = {
    "type": parameters.TYPES,
    "data_type": parameters.DATA_TYPES,
    "encoding": parameters.ENCODINGS,
    "downscaling_method": parameters.DOWNSCALING_METHODS,
    "voxel_unit": tuple(parameters.VOXEL_UNITS),
}


def table_after(header: str) -> list[list[str]]:
    """Returns the cells of the Markdown table whose header row starts with ``header``."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def code_spans(text: str) -> list[str]:
    """Returns the `...` spans of a cell, in order."""
    return re.findall(r"`([^`]*)`", text)


def parameter_rows() -> dict[str, list[str]]:
    rows = table_after("| key | values | default |")
    return {code_spans(row[0])[0]: row for row in rows}


def code_default(field: dataclasses.Field):
    """Returns a parameter's default as its JSON value."""
    return json.loads(json.dumps(field.default, default=list))


def test_parameter_table_has_a_row_for_every_parameter_and_no_other():
    documented = list(parameter_rows())
    in_code = [field.name for field in dataclasses.fields(parameters.ConversionParameters)]
    missing = sorted(set(in_code) - set(documented))
    assert not missing, f"add a row to README.md's parameter table for {missing}"
    assert documented == in_code  # same order as --print-parameters' source


@pytest.mark.parametrize(
    "field", dataclasses.fields(parameters.ConversionParameters), ids=lambda field: field.name
)
def test_parameter_table_states_the_default_of_the_code(field):
    row = parameter_rows().get(field.name)
    assert row is not None, f"README.md's parameter table lacks {field.name}"
    assert json.loads(code_spans(row[2])[0]) == code_default(field)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_parameter_table_lists_exactly_the_accepted_values(key):
    assert code_spans(parameter_rows()[key][1]) == list(CHOICES[key])


def exit_code_rows() -> dict[int, list[str]]:
    return {int(row[0]): row for row in table_after("| code | meaning | returned by |")}


def test_exit_code_table_has_every_code_with_its_meaning_from_errors_py():
    rows = exit_code_rows()
    assert sorted(rows) == sorted(errors.EXIT_MEANINGS)
    for code, row in rows.items():
        assert row[1] == errors.EXIT_MEANINGS[code]


@pytest.mark.parametrize("code", sorted(errors.EXIT_MEANINGS))
def test_exit_code_table_names_the_commands_that_return_each_code(code):
    returning = {
        command for command in errors.COMMAND_ERRORS if code in errors.command_exit_codes(command)
    }
    cell = exit_code_rows()[code][2]
    if cell == "all":
        assert returning == set(errors.COMMAND_ERRORS)
    else:
        assert set(code_spans(cell)) == returning


def test_command_table_lists_every_console_script():
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    scripts = re.findall(r'"(\w+) = hbp_image_tasks\.', setup)
    documented = [code_spans(row[0])[0] for row in table_after("| command | does |")]
    assert documented == scripts
    assert set(scripts) == set(errors.COMMAND_ERRORS)


def test_performance_table_names_a_benchmark_script_for_every_row():
    rows = table_after("| step, input | plain tool | this package | ratio | script |")
    assert rows
    for row in rows:
        (script,) = code_spans(row[-1])
        assert (ROOT / "benchmarks" / script).is_file(), script


def test_readme_keeps_the_two_commands_and_links_to_existing_docs():
    assert "\nscripts/demo\n" in README and "\nscripts/run-tests\n" in README
    for target in re.findall(r"\]\((docs/[^)]+)\)", README):
        assert (ROOT / target).is_file(), target


def test_readme_stays_short_for_operators():
    lines = len(README.splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines; details belong in docs/"
