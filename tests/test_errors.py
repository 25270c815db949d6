"""The exception classes: the thing at fault as attributes, the same one-line text."""
import pytest

import sdtrace
from sdtrace.discovery import specs, targets
from sdtrace.kernel import procfs, tracefs

from helpers import SYSTEM_PYTHON


def test_every_class_is_an_sdtrace_error_exported_by_the_package():
    for name in ("NoSuchProcess", "AccessDenied", "ElfError", "BadSpec", "ProbeNotFound",
                 "KernelRefused"):
        assert issubclass(getattr(sdtrace, name), sdtrace.SdtraceError), name
        assert name in sdtrace.__all__


def test_bad_spec_carries_its_text():
    with pytest.raises(sdtrace.BadSpec) as caught:
        specs.parse_spec("python:line(s33)")
    assert caught.value.text == "python:line(s33)"
    assert str(caught.value).startswith("bad probe spec 'python:line(s33)': unknown argument "
                                        "type 's33'")
    with pytest.raises(sdtrace.BadSpec, match=r"\Aempty probe spec\Z"):
        specs.parse_spec("  ")


def test_elf_error_carries_the_path(tmp_path):
    path = tmp_path / "text"
    path.write_text("not an ELF file, but long enough to be read as one's header " * 2)
    with pytest.raises(sdtrace.ElfError) as caught:
        sdtrace.read_probes(str(path))
    assert (caught.value.path, caught.value.reason) == (str(path), "not an ELF file")
    assert str(caught.value) == f"{path}: not an ELF file"
    from sdtrace.discovery.elf import ElfError
    assert ElfError is sdtrace.ElfError


def test_probe_not_found_carries_the_spec():
    spec = specs.parse_spec("nosuchprovider:nosuchname")
    with pytest.raises(sdtrace.ProbeNotFound) as caught:
        specs.select_probes([spec], targets.command_objects(SYSTEM_PYTHON))
    assert caught.value.spec == "nosuchprovider:nosuchname"
    assert str(caught.value).startswith("no probe matches 'nosuchprovider:nosuchname' in ")


def test_probe_not_found_in_objects_without_notes_says_so():
    spec = specs.parse_spec("nosuchprovider:nosuchname")
    with pytest.raises(sdtrace.ProbeNotFound) as caught:
        specs.select_probes([spec], targets.command_objects("/bin/true"))
    assert caught.value.spec == "nosuchprovider:nosuchname"
    assert "has SDT notes" in str(caught.value) and "/bin/true" in str(caught.value)


def unused_pid():
    """A PID above every live one (pid_max allowing): no process has it."""
    with open("/proc/sys/kernel/pid_max") as pid_max:
        return int(pid_max.read()) - 1


def test_no_such_process_carries_the_pid():
    pid = unused_pid()
    with pytest.raises(sdtrace.NoSuchProcess) as caught:
        targets.process_objects(pid)
    assert caught.value.pid == pid
    assert str(caught.value) == f"process {pid} does not exist"


def test_process_denied_is_access_denied_with_path_pid_and_errno():
    error = procfs.ProcessDenied("process 7: permission denied", "/proc/7/mem", 7, 13)
    assert isinstance(error, sdtrace.AccessDenied)
    assert (error.path, error.pid, error.errno, str(error)) == (
        "/proc/7/mem", 7, 13, "process 7: permission denied")


def test_kernel_refused_text_and_fields():
    error = sdtrace.KernelRefused("g/e", "/bin/x", 0x1234, "Invalid argument", 22)
    assert str(error) == "uprobe g/e at /bin/x:0x1234: Invalid argument"
    assert (error.uprobe, error.path, error.offset, error.reason, error.errno) == (
        "g/e", "/bin/x", 0x1234, "Invalid argument", 22)


@pytest.mark.kernel
def test_a_refused_definition_is_kernel_refused(program, group):
    with pytest.raises(sdtrace.KernelRefused) as caught:
        tracefs.add_uprobe(group, "bad", program.path, program.site,
                           fetchargs=("arg1=%nosuchregister:s32",))
    refusal = caught.value
    assert (refusal.uprobe, refusal.path, refusal.offset) == (f"{group}/bad", program.path,
                                                              program.site)
    assert refusal.errno is not None and refusal.reason in str(refusal)
