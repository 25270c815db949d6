"""`sdtrace list` as a user runs it: a real process on real files."""
import json
import os
import subprocess

from helpers import LIBPYTHON
from helpers import SYSTEM_PYTHON as PYTHON
from helpers import Target, one_line_error, sdtrace

from sdtrace.discovery import notes


def json_lines(text):
    return [json.loads(line) for line in text.splitlines()]


def test_list_table_of_system_python():
    result = sdtrace("list", PYTHON)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["FILE", "PROBE", "OFFSET", "SEMAPHORE", "ARGS", "OPERANDS"]
    expected = notes.read_probes(PYTHON)
    assert len(rows) == len(expected)
    for row, probe in zip(rows, expected):
        fields = row.split()
        assert fields[:5] == [PYTHON, probe.qualified_name, f"0x{probe.offset:x}",
                              f"0x{probe.semaphore:x}", str(len(probe.operands))]
    # aligned: every row's PROBE column starts where the header's does
    column = header.index("PROBE")
    assert all(row[column - 2:column] == "  " and row[column] != " " for row in rows)


def test_list_json_keys_and_values():
    result = sdtrace("list", "--json", LIBPYTHON)
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout)
    expected = notes.read_probes(LIBPYTHON)
    assert [(r["provider"], r["name"], r["offset"], r["semaphore"], r["args"]) for r in records] == \
        [(p.provider, p.name, p.offset, p.semaphore, p.args) for p in expected]
    for record in records:
        assert record["file"] == LIBPYTHON
        assert len(record["operands"]) == record["args"].count("@")
        for operand in record["operands"]:
            assert {"size", "signed", "float", "kind"} <= operand.keys()


def test_library_name_and_glob():
    result = sdtrace("list", "--json", "libpython3.11:python:gc*")
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout)
    assert sorted(r["name"] for r in records) == ["gc__done", "gc__start"]
    assert {os.path.realpath(r["file"]) for r in records} == {os.path.realpath(LIBPYTHON)}


def test_list_of_a_running_process(fixtures):
    with Target(fixtures.path("persite")) as target:
        result = sdtrace("list", "--json", "-p", str(target.pid), "persite:*")
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout)
    assert sorted(r["name"] for r in records) == ["hit", "hit", "shared", "shared"]
    assert {r["file"] for r in records} == {fixtures.path("persite")}


def test_errors_are_one_line(tmp_path, fixtures):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an ELF file, just some words to make it long enough " * 2)
    one_line_error(sdtrace("list", str(tmp_path / "missing")), "missing", "no such file")
    one_line_error(sdtrace("list", str(text_file)), "not an ELF file")
    one_line_error(sdtrace("list", "-p", "999999999"), "999999999", "does not exist")
    one_line_error(sdtrace("list", fixtures.path("nosdt")), "no SDT notes")
    one_line_error(sdtrace("list", f"{PYTHON}:python:no_such_probe"), "no probe matches")
    one_line_error(sdtrace("list", f"{PYTHON}:python:x(bogus)"), "unknown argument type")
    one_line_error(sdtrace("list", "libno_such_library_anywhere"), "library not found")


def test_unparsed_operand_is_listed_with_warning(tmp_path):
    """A note whose operand cannot be parsed is listed as unparsed, with a warning."""
    source = tmp_path / "odd.c"
    # The %fs segment override is not a form sys/sdt.h operands take: the note is hand-written.
    source.write_text(
        '__asm__(".pushsection .note.stapsdt,\\"?\\",\\"note\\"\\n'
        '.balign 4\\n.4byte 992f-991f, 994f-993f, 3\\n991: .asciz \\"stapsdt\\"\\n992: .balign 4\\n'
        '993: .8byte main, 0, 0\\n.asciz \\"odd\\"\\n.asciz \\"probe\\"\\n.asciz \\"8@%fs:0x28 -4@%edi\\"\\n'
        '994: .balign 4\\n.popsection\\n");\nint main(void) { return 0; }\n')
    binary = tmp_path / "odd"
    subprocess.run(["gcc", "-o", str(binary), str(source)], check=True)
    result = sdtrace("list", "--json", str(binary))
    assert result.returncode == 0, result.stderr
    [record] = json_lines(result.stdout)
    assert [op["kind"] for op in record["operands"]] == ["unparsed", "register"]
    assert "odd:probe" in result.stderr and "8@%fs:0x28" in result.stderr and str(binary) in result.stderr


def test_every_spec_form_in_help_lists_what_it_says():
    """The examples under --help's SPEC forms are real: each lists the probes it names."""
    from sdtrace.cli import SPEC_FORMS

    for subcommand in ("list", "trace", "count", "hist", "latency", "semaphores"):
        assert SPEC_FORMS in sdtrace(subcommand, "--help").stdout.replace("\r", ""), subcommand
    examples = SPEC_FORMS.split("examples:")[1].split()
    assert len(examples) == 4
    listed = {}
    for example in examples:
        result = sdtrace("list", "--json", example.strip("'"))
        assert result.returncode == 0, (example, result.stderr)
        listed[example] = json_lines(result.stdout)
    assert {(r["provider"], r["name"]) for r in listed[examples[0]]} == \
        {("python", "function__entry")}
    assert {r["name"] for r in listed[examples[1]]} >= {"gc__start", "gc__done"}
    assert {r["provider"] for r in listed[examples[2]]} == {"libstdcxx"}
    assert [(r["file"], r["name"]) for r in listed[examples[3]]] == [(PYTHON, "line")]
