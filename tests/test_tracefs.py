"""tracefs.py against the real kernel: definitions, refusals, session groups, formats.

The probe target is a small C program (helpers.SDT_PROGRAM); its site
and semaphore file offsets come from readelf (the oracle in helpers.py), never from
sdtrace.  The program, its `program` and `group` fixtures live in helpers.py and
conftest.py, shared with test_perf.py and test_events.py.
"""
import os
import platform
import re
import subprocess
import sys

import pytest
from helpers import REPOSITORY, add_demo_hit, definitions_of

from sdtrace.errors import SdtraceError
from sdtrace.kernel import tracefs

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(platform.machine() != "x86_64",
                                 reason="the fetch arguments below use x86-64 registers")]

# --- mount, capabilities ---------------------------------------------------------

def test_root_is_the_mounted_tracefs():
    assert tracefs.root() in tracefs.MOUNT_POINTS
    assert os.path.exists(os.path.join(tracefs.root(), "uprobe_events"))


def unmounted_tracefs_run(code, user=None):
    """Runs python `code` in a private mount namespace where tracefs is unmounted."""
    python = [sys.executable, "-c", code]
    if user is not None:   # a python outside /root, which `user` cannot enter
        python = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                  "/usr/bin/python3", "-c", code]
    script = "umount /sys/kernel/tracing && exec \"$@\""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script, "sh", *python], capture_output=True, text=True,
                          cwd="/", env=dict(os.environ, PYTHONPATH=REPOSITORY))


def test_root_mounts_tracefs_when_missing():
    result = unmounted_tracefs_run(
        "from sdtrace.kernel import features, tracefs\n"
        "print(tracefs.root(), features.check('tracefs_ref_ctr').available)")
    assert result.stdout.split() == ["/sys/kernel/tracing", "True"], result.stderr


def test_root_without_permission_says_so():
    result = unmounted_tracefs_run(
        "from sdtrace.kernel import tracefs\n"
        "try:\n    tracefs.root()\nexcept Exception as error:\n"
        "    print(type(error).__name__, error)", user=65534)
    line = result.stdout.strip()
    assert line.startswith("SdtraceError tracefs:"), (line, result.stderr)
    assert "/sys/kernel/tracing" in line and "needs root" in line


# --- session groups --------------------------------------------------------------

def own_start_time():
    with open("/proc/self/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[19])


def test_new_group_names_the_owner_and_never_repeats():
    first, second = tracefs.new_group(), tracefs.new_group()
    assert first != second
    for name in (first, second):
        match = re.fullmatch(r"sdtrace_(\d+)_(\d+)_(\d+)", name)
        assert match and len(name) < 64
        assert (int(match[1]), int(match[2])) == (os.getpid(), own_start_time())
    child = subprocess.run([sys.executable, "-c",
                            "from sdtrace.kernel import tracefs; print(tracefs.new_group())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert child.split("_")[1] != str(os.getpid())


def test_remove_stale_removes_dead_and_reused_owners_only(program):
    dead = subprocess.run([sys.executable, "-c",
                           "from sdtrace.kernel import tracefs; print(tracefs.new_group())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    reused = f"sdtrace_{os.getpid()}_{own_start_time() + 1}_0"   # our PID, another process
    live = tracefs.new_group()
    foreign = "sdtrace_tests_foreign"                             # not a session name
    groups = (dead, reused, live, foreign)
    try:
        for name in groups:
            add_demo_hit(program, name)
        removed = tracefs.remove_stale()
        assert dead in removed and reused in removed
        assert live not in removed and foreign not in removed
        assert not definitions_of(dead) and not definitions_of(reused)
        assert definitions_of(live) and definitions_of(foreign)
    finally:
        for name in groups:
            tracefs.remove_group(name)


# --- definitions -----------------------------------------------------------------

def test_add_uprobe_defines_site_semaphore_and_arguments(program, group):
    add_demo_hit(program, group)
    [line] = definitions_of(group)
    assert line.startswith(f"p:{group}/hit {program.path}:0x")
    place = line.split()[1]
    assert int(place.split(":0x")[1].split("(")[0], 16) == program.site
    assert place.endswith(f"(0x{program.semaphore:x})")
    assert line.split()[2:] == list(program.fetchargs)
    with open(os.path.join(tracefs.root(), "events", group, "hit", "id")) as id_file:
        assert tracefs.event_id(group, "hit") == int(id_file.read())


def test_add_uprobe_return_probe_without_semaphore(program, group):
    tracefs.add_uprobe(group, "ret", program.path, program.site, retprobe=True)
    [line] = definitions_of(group)
    assert line.startswith(f"r:{group}/ret ") and "(" not in line


def test_event_format_of_arguments(program, group):
    add_demo_hit(program, group)
    event_format = tracefs.event_format(group, "hit")
    assert [field.name for field in event_format.args] == ["arg1", "arg2"]
    arg1, arg2 = event_format.args
    assert (arg1.size, arg1.signed, arg1.is_string) == (4, True, False)
    assert arg2.is_string and arg2.type == "__data_loc char[]"
    assert event_format.ip_field.name == "__probe_ip"
    assert event_format.string_indexes == (1,)
    assert event_format.struct.size == arg2.offset + 4


def test_add_uprobes_defines_hundreds_and_remove_group_removes_them(program, group):
    count = 300
    tracefs.add_uprobes(
        tracefs.UprobeDefinition(group, f"hit{index}", program.path, program.site,
                                 program.semaphore, program.fetchargs)
        for index in range(count))
    assert len(definitions_of(group)) == count
    tracefs.remove_group(group)
    assert definitions_of(group) == []
    tracefs.remove_group(group)          # nothing left: still fine


def test_add_uprobes_failure_undoes_the_batch(program, group):
    good = [tracefs.UprobeDefinition(group, f"hit{index}", program.path, program.site,
                                     program.semaphore) for index in range(3)]
    bad = tracefs.UprobeDefinition(group, "bad", program.path, program.site,
                                   program.semaphore, ("arg1=%nosuchreg:s32",))
    with pytest.raises(SdtraceError) as error:
        tracefs.add_uprobes(good + [bad])
    assert f"{group}/bad" in str(error.value) and "Invalid register name" in str(error.value)
    assert definitions_of(group) == []


# --- refusals --------------------------------------------------------------------

def test_missing_file_reports_error_log_reason(group):
    with pytest.raises(SdtraceError) as error:
        tracefs.add_uprobe(group, "hit", "/nonexistent/demo", 0x1000)
    message = str(error.value)
    assert f"{group}/hit" in message and "/nonexistent/demo:0x1000" in message
    assert "Failed to find the given file" in message
    assert "\n" not in message


def test_offset_outside_the_file_is_refused(program, group):
    size = os.path.getsize(program.path)
    with pytest.raises(SdtraceError, match=r"offset 0x[0-9a-f]+ is outside the file"):
        tracefs.add_uprobe(group, "hit", program.path, size + 0x1000)
    with pytest.raises(SdtraceError, match=r"semaphore offset 0x[0-9a-f]+ is outside"):
        tracefs.add_uprobe(group, "hit", program.path, program.site, ref_ctr_offset=size)
    assert definitions_of(group) == []


@pytest.mark.parametrize("event, path, fetchargs, cause", [
    ("bad-name", None, (), "not a C identifier"),
    ("x" * 64, None, (), "not a C identifier"),
    ("hit", "/tmp/a b", (), "whitespace"),
    ("hit", None, ("arg1=%ax:s32\np:evil/x /bin/sh:0x0",), "whitespace"),
])
def test_malformed_definitions_are_refused_before_the_kernel(program, group, event, path,
                                                             fetchargs, cause):
    with pytest.raises(SdtraceError, match=cause):
        tracefs.add_uprobe(group, event, path or program.path, program.site,
                           fetchargs=fetchargs)
    assert definitions_of(group) == [] and definitions_of("evil") == []


def test_bad_fetcharg_reports_error_log_reason(program, group):
    with pytest.raises(SdtraceError, match="Invalid register name"):
        add_demo_hit(program, group, fetchargs=("arg1=%nosuchreg:s32",))


def test_duplicate_event_reports_error_log_reason(program, group):
    add_demo_hit(program, group)
    with pytest.raises(SdtraceError, match=f"{group}/hit.*different from existing probe"):
        add_demo_hit(program, group, fetchargs=())


@pytest.mark.parametrize("theirs, ours", [(True, False), (False, True)])
def test_ref_ctr_offset_mismatch_is_recognised(program, theirs, ours):
    other, mine = tracefs.new_group(), tracefs.new_group()
    try:
        add_demo_hit(program, other, ref_ctr_offset=program.semaphore if theirs else None)
        with pytest.raises(SdtraceError) as error:
            add_demo_hit(program, mine, ref_ctr_offset=program.semaphore if ours else None)
        message = str(error.value)
        assert "ref_ctr_offset mismatch: another tracer's" in message
        assert f"{mine}/hit" in message and f"{other}/hit" in message
        assert ("semaphore" if theirs else "no semaphore") in message
        assert definitions_of(mine) == []
    finally:
        tracefs.remove_group(other)
        tracefs.remove_group(mine)
