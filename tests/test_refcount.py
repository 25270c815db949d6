"""The user-space semaphore manager (sdtrace.semaphores.manager) on real processes.

Every counter is read back from the process itself: through /proc/PID/mem at
the address /proc/PID/maps gives (helpers.address_of) and through the
fixture's own "sem" command.  Semaphore offsets come from readelf.  Each test
works on a private copy of the fixture files, so that uprobes of other test
sessions on the shared build (the kernel's ref_ctr counts those) never show
up in these counters.
"""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
from helpers import (Library, Target, address_of, holds_for, maps, private_copy, set_counter,
                     started_by_us, wait_for)

from sdtrace.discovery import notes
from sdtrace.errors import SdtraceError
from sdtrace.kernel.procfs import read_starttime
from sdtrace.semaphores import guardian
from sdtrace.semaphores.counters import RUN_DIR
from sdtrace.semaphores.manager import SemaphoreManager

pytestmark = pytest.mark.kernel

# --- helpers ------------------------------------------------------------------

def process_state(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(") ", 1)[1][0]


def sem(target):
    [line] = target.send("sem")
    return line


@pytest.fixture
def library(fixtures, tmp_path):
    library = Library(fixtures, tmp_path)
    yield library
    assert library.warnings == []


@pytest.fixture
def users(library):
    """Starts semuser processes on demand; stops them all at the end."""
    started = []

    def start(load=True):
        started.append(library.user(load))
        return started[-1]
    yield start
    for target in started:
        target.stop()


# --- 1. running at attach -----------------------------------------------------

def test_running_processes_are_raised_once_despite_the_relro_split(fixtures, opt, tmp_path):
    library = Library(fixtures, tmp_path, opt)
    with contextlib.ExitStack() as stack:
        first, second = library.user(), library.user()
        stack.callback(first.stop)
        stack.callback(second.stop)
        mappings = [m for m in maps(first.pid) if m.path == library.path]
        [data] = [m for m in mappings if m.holds_file_offset(library.offset) and m.perms == "rw-p"]
        relro = [m for m in mappings if m.perms == "r--p" and m.end == data.start]
        assert relro, f"no RELRO VMA right below the rw-p one: {mappings}"
        assert relro[0].offset <= library.offset < data.offset + (data.end - data.start)

        manager = library.manager().start()
        try:
            assert [sem(first), sem(second)] == ["sem 1", "sem 1"]
            manager.rescan()
            manager.rescan()
            assert [library.value(first.pid), library.value(second.pid)] == [1, 1]
            holdings = manager.holdings()
            assert sorted(h.pid for h in holdings) == sorted([first.pid, second.pid])
            assert set(holdings.values()) == {1}
            for holding in holdings:
                assert holding.starttime == read_starttime(holding.pid)
                assert holding.address == address_of(holding.pid, library.path, library.offset,
                                                      perms="rw-p")
        finally:
            manager.stop()
        assert [sem(first), sem(second)] == ["sem 0", "sem 0"]
    assert library.warnings == []


def test_scope_limits_which_processes_are_raised(library, users):
    inside, outside = users(), users()
    with library.manager(scope={inside.pid}):
        assert [sem(inside), sem(outside)] == ["sem 1", "sem 0"]
    assert sem(inside) == "sem 0"


# --- 2. started after attach, loaded later ------------------------------------

def test_processes_started_after_attach_and_libraries_loaded_later(library, users):
    with library.manager() as manager:
        early = users(load=False)
        assert sem(early) == "sem none"
        early.send("load")
        assert wait_for(lambda: library.value(early.pid) == 1)
        late = users()
        assert wait_for(lambda: library.value(late.pid) == 1)
        assert wait_for(lambda: len(manager.holdings()) == 2)
        assert holds_for(lambda: library.value(early.pid) == library.value(late.pid) == 1, 0.3)
        manager.rescan()
        assert [sem(early), sem(late)] == ["sem 1", "sem 1"]
    assert [sem(early), sem(late)] == ["sem 0", "sem 0"]


# --- 3. fork ------------------------------------------------------------------

def test_fork_child_keeps_the_inherited_increment_and_is_lowered(library, users):
    parent = users()
    with library.manager() as manager:
        assert sem(parent) == "sem 1"
        [line] = parent.send("fork")
        child = int(line.split()[1])
        assert wait_for(lambda: any(h.pid == child for h in manager.holdings()))
        assert holds_for(lambda: library.value(parent.pid) == library.value(child) == 1, 0.3)
        manager.rescan()
        assert sem(parent) == "sem 1"       # the child runs the command loop now
        assert library.value(parent.pid) == 1
        assert {h.pid: n for h, n in manager.holdings().items()} == {parent.pid: 1, child: 1}
    assert sem(parent) == "sem 0"           # the child's counter
    assert library.value(parent.pid) == 0
    parent.send("exit")                     # the child leaves; the parent reads again
    assert sem(parent) == "sem 0"


def test_fork_before_attach_is_two_processes(library, users):
    parent = users()
    [line] = parent.send("fork")
    child = int(line.split()[1])
    with library.manager() as manager:
        assert [library.value(parent.pid), library.value(child)] == [1, 1]
        assert sorted(h.pid for h in manager.holdings()) == sorted([parent.pid, child])
    assert [library.value(parent.pid), library.value(child)] == [0, 0]
    parent.send("exit")


SHARED_MEMORY_SOURCE = r"""
/* sharer LIBRARY: loads LIBRARY; "clone" starts a process that shares this
 * one's memory (CLONE_VM without CLONE_THREAD, as vfork and posix_spawn do). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>
#include "command_loop.h"

static volatile unsigned short *semaphore;
static char stack[1 << 16];

static int sleeper(void *unused)
{
    (void)unused;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    for (;;)
        pause();
    return 0;
}

static enum reply handle(const char *verb, long count)
{
    (void)count;
    if (strcmp(verb, "clone") == 0)
        printf("child %d\n", (int)clone(sleeper, stack + sizeof stack, CLONE_VM | SIGCHLD, NULL));
    else if (strcmp(verb, "sem") == 0)
        printf("sem %u\n", *semaphore);
    else
        return REPLY_UNKNOWN;
    return REPLY_DONE;
}

int main(int argc, char **argv)
{
    void *library = argc == 2 ? dlopen(argv[1], RTLD_NOW) : NULL;
    if (!library)
        return 2;
    semaphore = dlsym(library, "semlib_tick_semaphore");
    return command_loop(handle);
}
"""


@pytest.fixture(scope="module")
def sharer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharer")
    (directory / "sharer.c").write_text(SHARED_MEMORY_SOURCE)
    fixtures_dir = os.path.join(os.path.dirname(__file__), "fixtures")
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", f"-I{fixtures_dir}", "-o",
                    str(directory / "sharer"), str(directory / "sharer.c"),
                    os.path.join(fixtures_dir, "command_loop.c"), "-ldl"], check=True)
    return str(directory / "sharer")


@pytest.mark.parametrize("cloned", ["before attach", "after attach"])
def test_processes_sharing_one_memory_are_raised_once(library, sharer, cloned):
    with Target(sharer, library.path) as parent:
        if cloned == "before attach":
            [line] = parent.send("clone")
        manager = library.manager().start()
        try:
            if cloned == "after attach":
                [line] = parent.send("clone")
            child = int(line.split()[1])
            assert library.value(child) == library.value(parent.pid)   # one memory
            assert holds_for(lambda: library.value(parent.pid) == 1, 0.3)
            manager.rescan()
            assert sem(parent) == "sem 1"
            assert len(manager.holdings()) == 1
        finally:
            manager.stop()
        assert sem(parent) == "sem 0"


# --- 4. exec and exit ---------------------------------------------------------

def test_exit_drops_the_process(library, users):
    leaving, staying = users(), users()
    with library.manager() as manager:
        leaving.send("exit")
        assert leaving.stop() == 0
        assert wait_for(lambda: [h.pid for h in manager.holdings()] == [staying.pid])
    assert sem(staying) == "sem 0"


def test_exec_drops_the_process(library):
    script = textwrap.dedent(f"""
        import ctypes, os, sys
        ctypes.CDLL({library.path!r})
        print("ready", flush=True)
        sys.stdin.readline()
        os.execv("/bin/sleep", ["sleep", "30"])
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n"
        with library.manager() as manager:
            assert library.value(process.pid) == 1
            process.stdin.write("exec\n")
            process.stdin.flush()
            assert wait_for(lambda: os.readlink(f"/proc/{process.pid}/exe") == "/bin/sleep"
                            or os.readlink(f"/proc/{process.pid}/exe") == "/usr/bin/sleep")
            assert wait_for(lambda: manager.holdings() == {})
    finally:
        process.kill()
        process.wait()


# --- 5. dlclose and dlopen again ------------------------------------------------

def test_dlclose_then_dlopen_is_raised_again(library, users):
    user = users()
    with library.manager() as manager:
        old_address = address_of(user.pid, library.path, library.offset, perms="rw-p")
        assert sem(user) == "sem 1"
        for _round in range(3):
            user.send("unload")
            assert sem(user) == "sem none"
            user.send("load")
            assert wait_for(lambda: sem(user) == "sem 1"), "the fresh mapping was not raised"
        assert holds_for(lambda: library.value(user.pid) == 1, 0.3)
        manager.rescan()
        assert sem(user) == "sem 1"
        [holding] = manager.holdings()
        assert holding.address == address_of(user.pid, library.path, library.offset,
                                             perms="rw-p")
        print(f"mapped again at the old address: {holding.address == old_address}")
    assert sem(user) == "sem 0"


# --- 6. shared and per-site semaphores ----------------------------------------

def test_shared_and_per_site_semaphores(fixtures, tmp_path):
    path = private_copy(fixtures, "persite", tmp_path)
    probes = notes.read_probes(path)
    assert len(probes) == 4 and len({p.semaphore for p in probes}) == 3
    warnings = []
    with Target(path) as early:
        assert early.send("fire 1") == ["site 1 hit 0 shared 0", "site 2 hit 0 shared 0"]
        with SemaphoreManager.for_probes(probes, started_by_us, warn=warnings.append) as manager:
            assert early.send("sem") == ["sem hit1=1 hit2=1 shared=1"]
            assert early.send("fire 2") == ["site 1 hit 2 shared 2", "site 2 hit 2 shared 2"]
            with Target(path) as late:   # exec'd after attach: the executable itself maps them
                assert wait_for(lambda: late.send("sem") == ["sem hit1=1 hit2=1 shared=1"])
                manager.rescan()
                assert late.send("sem") == ["sem hit1=1 hit2=1 shared=1"]
            assert wait_for(lambda: len(manager.holdings()) == 3)   # late's exit is seen
        assert early.send("sem") == ["sem hit1=0 hit2=0 shared=0"]
        assert early.send("fire 1") == ["site 1 hit 0 shared 0", "site 2 hit 0 shared 0"]
    assert warnings == []


# --- 7. two sessions ----------------------------------------------------------

@pytest.mark.parametrize("first_to_stop", [0, 1])
def test_two_managers_add_up_and_return_to_baseline(library, users, first_to_stop):
    user = users()
    set_counter(user.pid, library.path, library.offset, 5)   # another tracer's increments
    managers = [library.manager().start()]
    try:
        assert sem(user) == "sem 6"
        managers.append(library.manager().start())
        assert sem(user) == "sem 7"
        late = users()
        assert wait_for(lambda: library.value(late.pid) == 2)
        managers.pop(first_to_stop).stop()
        assert [sem(user), sem(late)] == ["sem 6", "sem 1"]
    finally:
        for manager in managers:
            manager.stop()
    assert [sem(user), sem(late)] == ["sem 5", "sem 0"]


# --- 8. crash recovery ----------------------------------------------------------

MANAGER_SCRIPT = """
import sys, time
from sdtrace.semaphores.manager import SemaphoreManager
manager = SemaphoreManager([(sys.argv[1], int(sys.argv[2]), sys.byteorder)], {int(sys.argv[3])}).start()
print(manager._guardian.process.pid, manager._guardian.ledger_path, flush=True)
time.sleep(600)
"""


def crashing_session(library, pid):
    """A manager in a process of its own: (process, guardian PID, ledger path)."""
    process = subprocess.Popen(
        [sys.executable, "-c", MANAGER_SCRIPT, library.path, str(library.offset), str(pid)],
        stdout=subprocess.PIPE, text=True)
    guardian_pid, ledger = process.stdout.readline().split()
    return process, int(guardian_pid), ledger


def test_sigkilled_session_is_reverted_by_its_guardian(library, users):
    user = users()
    process, guardian_pid, ledger = crashing_session(library, user.pid)
    try:
        assert sem(user) == "sem 1"
        assert os.path.exists(ledger)
        process.kill()
        killed = time.monotonic()
        assert wait_for(lambda: library.value(user.pid) == 0, timeout=10)
        print(f"reverted {time.monotonic() - killed:.3f}s after SIGKILL")
        assert wait_for(lambda: not os.path.exists(ledger))
        assert wait_for(lambda: not os.path.exists(f"/proc/{guardian_pid}"))
    finally:
        process.kill()
        process.wait()


def test_dead_ledgers_are_reverted_and_live_ones_kept(library, users):
    user = users()
    process, guardian_pid, ledger = crashing_session(library, user.pid)
    try:
        with library.manager() as live:
            assert sem(user) == "sem 2"
            os.kill(guardian_pid, signal.SIGKILL)
            process.kill()
            process.wait()
            assert wait_for(lambda: not os.path.exists(f"/proc/{guardian_pid}"))
            assert os.path.exists(ledger)
            assert sem(user) == "sem 2"
            assert guardian.revert_dead_ledgers(library.warnings.append) >= 1
            assert not os.path.exists(ledger)
            assert sem(user) == "sem 1"     # the live session's increment stays
            assert os.path.exists(live._guardian.ledger_path)
        assert sem(user) == "sem 0"
    finally:
        process.kill()
        process.wait()


# --- processes that vanish, counters at their bounds, bad input ----------------

def test_processes_that_vanish_are_dropped_silently(library, users):
    killed, zombie, survivor = users(), users(), users()
    churn_stop = threading.Event()
    churned = []

    def churn():   # processes appearing and dying while the manager starts and stops
        while not churn_stop.is_set():
            target = library.user()
            churned.append(target.pid)
            target.process.kill()
            target.stop()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        manager = library.manager().start()
        try:
            assert sem(survivor) == "sem 1"
            killed.process.kill()
            killed.stop()
            zombie.process.kill()       # not reaped: /proc/PID stays, its memory is gone
            assert wait_for(lambda: process_state(zombie.pid) == "Z")
            seen = len(churned)
            assert wait_for(lambda: len(churned) >= seen + 3)   # more churn under the manager
        finally:
            manager.stop()
    finally:
        churn_stop.set()
        thread.join()
    assert len(churned) > 1
    assert sem(survivor) == "sem 0"


WITHOUT_PTRACE = ("--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace")
UNPRIVILEGED_MANAGER_SCRIPT = """
import sys
from sdtrace.semaphores.manager import SemaphoreManager
def warn(message):   # the library itself never writes to stderr
    print(f"sdtrace: warning: {message}", file=sys.stderr)
manager = SemaphoreManager([(sys.argv[1], int(sys.argv[2]), sys.byteorder)],
                           set(map(int, sys.argv[3:])), warn=warn).start()
print(*sorted(holding.pid for holding in manager.holdings()), flush=True)
sys.stdin.readline()
manager.stop()
"""


def test_a_process_that_cannot_be_written_is_named_once(fixtures, users, library):
    """Without CAP_SYS_PTRACE, root may not write another user's process; the rest goes on.

    (The writable process runs without the capability too: a process with
    more capabilities than the writer is protected as well.)"""
    shared = tempfile.mkdtemp(prefix="sdtrace-refcount-")   # readable by nobody, unlike tmp_path
    try:
        os.chmod(shared, 0o755)
        path = os.path.join(shared, "libsdtsem.so")
        shutil.copy(library.path, path)
        foreign = Target("/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                         library.semuser, path).start()
        own = Target("/usr/bin/setpriv", *WITHOUT_PTRACE, library.semuser, path).start()
        try:
            foreign.send("load")
            own.send("load")
            manager = subprocess.Popen(
                ["/usr/bin/setpriv", *WITHOUT_PTRACE, sys.executable, "-c", UNPRIVILEGED_MANAGER_SCRIPT, path, str(library.offset),
                 str(foreign.pid), str(own.pid)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            first_line = manager.stdout.readline()
            assert first_line.split() == [str(own.pid)], manager.communicate()
            assert [sem(own), sem(foreign)] == ["sem 1", "sem 0"]
            _output, errors = manager.communicate("stop\n", timeout=30)
            assert manager.returncode == 0, errors
            assert errors.splitlines() == [
                f"sdtrace: warning: process {foreign.pid} (semuser): cannot open its memory: "
                "Permission denied"]
            assert [sem(own), sem(foreign)] == ["sem 0", "sem 0"]
        finally:
            foreign.stop()
            own.stop()
    finally:
        shutil.rmtree(shared)


def test_counter_bounds_are_respected(library, users):
    full, lowered = users(), users()
    set_counter(full.pid, library.path, library.offset, 0xffff)
    manager = library.manager().start()
    try:
        assert sem(lowered) == "sem 1"
        assert sem(full) == f"sem {0xffff}"
        set_counter(lowered.pid, library.path, library.offset, 0)   # somebody took ours
    finally:
        manager.stop()
    assert [sem(full), sem(lowered)] == [f"sem {0xffff}", "sem 0"]
    assert any(f"process {full.pid}" in w and "0xffff" in w for w in library.warnings)
    library.warnings.clear()
    set_counter(full.pid, library.path, library.offset, 0)


def test_semaphore_in_a_read_only_segment_is_refused(tmp_path):
    source = tmp_path / "rodata.c"
    source.write_text(textwrap.dedent(r"""
        #define _SDT_HAS_SEMAPHORES 1
        #include <sys/sdt.h>
        /* the semaphore in a read-only section, where no tracer can raise it */
        __asm__(".pushsection .rodata.semaphore, \"a\"\n.globl bad_probe_semaphore\n"
                "bad_probe_semaphore: .short 0\n.popsection");
        extern const volatile unsigned short bad_probe_semaphore;
        int main(void) { if (bad_probe_semaphore) STAP_PROBE(bad, probe); return 0; }
    """))
    program = tmp_path / "rodata"
    subprocess.run(["gcc", "-O2", "-o", str(program), str(source)], check=True)
    probes = notes.read_probes(str(program))
    with pytest.raises(SdtraceError, match=r"rodata: bad:probe: unusable semaphore"):
        SemaphoreManager.for_probes(probes)


def test_no_ledgers_or_guardians_are_left(library, users):
    user = users()
    before = set(os.listdir(RUN_DIR)) if os.path.isdir(RUN_DIR) else set()
    manager = library.manager().start()
    guardian_process = manager._guardian.process
    manager.stop()
    assert guardian_process.poll() == 0
    assert set(os.listdir(RUN_DIR)) - before == set()
    assert sem(user) == "sem 0"
