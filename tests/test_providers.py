"""Named, typed arguments of known providers (sdtrace.providers) on real binaries.

The table is checked against the notes of the machine's SDT-enabled programs
(read by readelf, not sdtrace): where a documented probe exists, its argument
count matches and its documented strings are pointer-sized.  Then a real
Python process shows the effects: strings decoded by default, a "named"
object in JSON events, names in `sdtrace list`, and explicit types winning.
"""
import json
import os

import pytest
from helpers import REAL_SDT_BINARIES
from helpers import SYSTEM_PYTHON as PYTHON
from helpers import readelf_notes, sdtrace

from sdtrace.discovery import notes, providers
from sdtrace.engine import fetchargs

SCRIPT = """
def greet(name):
    return name
greet("x")
"""


def operand_size(argument):
    """Bytes of a note argument such as "-8@%rax" (readelf's text)."""
    return abs(int(argument.partition("@")[0]))


@pytest.mark.parametrize("path", REAL_SDT_BINARIES)
def test_table_matches_the_installed_programs(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed")
    documented = 0
    found = readelf_notes(path)
    for note in found:
        declared = providers.DECLARATIONS.get(note.provider, {}).get(note.name)
        if declared is None:
            continue
        documented += 1
        arguments = providers.lookup(note.provider, note.name)
        assert len(arguments.names) == len(note.args), (note, arguments)
        for argument, argument_type in zip(note.args, arguments.types):
            if argument_type == providers.STRING:
                assert operand_size(argument) == 8, (note, argument)
    if {note.provider for note in found} & set(providers.DECLARATIONS):
        assert documented, f"no probe of {path} is in the table"


def test_another_argument_count_is_left_alone():
    assert providers.argument_names("python", "function__entry", 3) == \
        ("filename", "funcname", "lineno")
    assert providers.argument_names("python", "function__entry", 4) is None
    assert providers.argument_names("python", "no_such_probe", 1) is None
    assert providers.argument_names("no_such_provider", "function__entry", 3) is None


@pytest.mark.skipif(not os.path.exists(PYTHON), reason="Debian's python3.11 is not installed")
def test_default_string_types_yield_to_explicit_ones():
    [entry] = [probe for probe in notes.read_probes(PYTHON) if probe.name == "function__entry"]
    assert fetchargs.argument_types(entry) == ("str", "str", None)
    assert fetchargs.argument_types(entry, ("u64",)) == ("u64", "str", None)
    assert fetchargs.argument_types(entry, (None, None, "s64")) == ("str", "str", "s64")
    too_many = ("str",) * 4           # left for fetchargs to refuse, naming the counts
    assert fetchargs.argument_types(entry, too_many) == too_many


@pytest.mark.kernel
@pytest.mark.usefixtures("executor")
@pytest.mark.skipif(not os.path.exists(PYTHON), reason="Debian's python3.11 is not installed")
def test_python_events_carry_decoded_named_arguments(tmp_path):
    script = tmp_path / "greet.py"
    script.write_text(SCRIPT)
    output = tmp_path / "events.json"
    result = sdtrace("trace", "--json", "-o", str(output), "--buffer-pages", "4096",
                     "--string-size", "256", "-c", f"{PYTHON} {script}", "python:function__entry",
                     "python:function__return(u64)", "python:line")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in output.read_text().splitlines()]
    for event in events:
        names = providers.argument_names(*event["probe"].split(":"), len(event["args"]))
        assert event["named"] == dict(zip(names, event["args"]))
    entries = [event["named"] for event in events if event["probe"] == "python:function__entry"
               and event["args"][0] == str(script)]
    assert [(entry["funcname"], entry["lineno"]) for entry in entries] == \
        [("<module>", 0), ("greet", 2)]
    returns = [event["args"] for event in events if event["probe"] == "python:function__return"
               and event["args"][1] == "greet"]
    assert len(returns) == 1 and isinstance(returns[0][0], int)   # (u64): the pointer itself


@pytest.mark.skipif(not os.path.exists(PYTHON), reason="Debian's python3.11 is not installed")
def test_list_shows_the_names():
    table = sdtrace("list", f"{PYTHON}:python:function__entry")
    assert table.returncode == 0, table.stderr
    [row] = table.stdout.splitlines()[1:]
    operands = row.split(None, 5)[5]
    assert [word.partition("=")[0] for word in operands.split("  ")] == \
        ["filename", "funcname", "lineno"]
    records = [json.loads(line) for line in sdtrace("list", "--json", PYTHON).stdout.splitlines()]
    names = {record["name"]: record["arg_names"] for record in records}
    assert names["function__entry"] == ["filename", "funcname", "lineno"]
    assert names["gc__start"] == ["generation"]
