"""Shared test machinery: the C fixture programs, a driver for them, /proc helpers.

Test modules import what they need from here (`from helpers import Target`);
tests/conftest.py holds only pytest's fixtures and hooks, and no test module
imports another.

The fixture programs in tests/fixtures/ are compiled by the test session
itself, at -O0 and at -O2, into BUILD_DIR/<opt>/: tests/fixtures/build/, or
$SDTRACE_TEST_BUILD, or a directory of this user's in the temporary directory
when the checkout is not writable (an unprivileged user testing root's
checkout).  A digest of the
sources and of the recipe below is stored next to the binaries; a session
rebuilds only when it differs.  Building happens under an flock, so parallel
sessions (or pytest-xdist workers) build once and never see half-written
files: binaries are compiled into a scratch directory and renamed into place.

Every program speaks the protocol of tests/fixtures/command_loop.h ("ready
<pid>", then one command per line, each reply closed by a "done" line); Target
drives it.  read_mem, write_mem, maps and address_of look at a running
process through /proc, and readelf_notes, readelf_segments and file_offset
read ELF facts through readelf: oracles independent of sdtrace.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest

from sdtrace.kernel import tracefs
from sdtrace.semaphores.manager import SemaphoreManager

FIXTURES_DIR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "fixtures")


def _build_dir():
    """Where fixtures are built: $SDTRACE_TEST_BUILD, the checkout, else a private temp dir."""
    if os.environ.get("SDTRACE_TEST_BUILD"):
        return os.environ["SDTRACE_TEST_BUILD"]
    in_checkout = os.path.join(FIXTURES_DIR, "build")
    if os.access(in_checkout if os.path.isdir(in_checkout) else FIXTURES_DIR, os.W_OK):
        return in_checkout
    return os.path.join(tempfile.gettempdir(), f"sdtrace-test-build-{os.geteuid()}")


BUILD_DIR = _build_dir()
OPT_LEVELS = ("O0", "O2")
CFLAGS = ("-g", "-std=gnu11", "-Wall", "-Wextra", "-Werror")
SHARED_LIBRARY = ("-shared", "-fPIC", "-Wl,-z,relro", "-Wl,-z,now")
# output file -> (sources in FIXTURES_DIR, extra gcc flags); headers are found by #include
PROGRAMS = {
    "values": (("values.c", "values_nosem.c", "command_loop.c"), ()),
    "libsdtsem.so": (("sem_lib.c",), SHARED_LIBRARY),
    "libsdtctor.so": (("ctor_lib.c",), SHARED_LIBRARY),
    "semuser": (("sem_user.c", "command_loop.c"), ("-ldl",)),
    "persite": (("persite_a.c", "persite_b.c", "persite_main.c", "command_loop.c"), ()),
    "flood": (("flood.c", "command_loop.c"), ()),
    "nosdt": (("nosdt.c", "command_loop.c"), ()),
    "workload": (("workload.c", "command_loop.c"), ("-pthread",)),
    "addressing": (("addressing.c", "command_loop.c"), ()),
    # one process shape per run (fork, exec, vfork, posix_spawn...): no command loop
    "spawner": (("spawner.c",), ("-pthread",)),
    "libsdtldpatha.so": (("ldpath_lib.c",), (*SHARED_LIBRARY, "-DLDPATH_OBJECT=a")),
    "libsdtldpathb.so": (("ldpath_lib.c",), (*SHARED_LIBRARY, "-DLDPATH_OBJECT=b")),
    # linked from the build directory with -L/-l only: no RPATH, no RUNPATH
    "ldpath": (("ldpath_main.c", "command_loop.c"), ("-L.", "-lsdtldpatha", "-lsdtldpathb")),
}
REPOSITORY = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
SET_UP_HINT = "run the README's test set-up (bash .ci/run)"
TRACEFS = "/sys/kernel/tracing"
UPROBE_EVENTS = os.path.join(TRACEFS, "uprobe_events")


# --- building the fixture programs ------------------------------------------

def fixtures_digest():
    """What the binaries are built from: every source and header, and the recipe."""
    digest = hashlib.sha256(repr((CFLAGS, PROGRAMS)).encode())
    for name in sorted(os.listdir(FIXTURES_DIR)):
        if name.endswith((".c", ".h")):
            with open(os.path.join(FIXTURES_DIR, name), "rb") as source:
                digest.update(name.encode() + b"\0" + source.read())
    return digest.hexdigest()


def compile_programs(opt, directory):
    """Compiles every program at `opt` into `directory`: the shared libraries first,
    then the programs (which may link them with -L.), each wave's gcc runs in parallel."""
    if shutil.which("gcc") is None:
        pytest.fail(f"cannot build the C test fixtures: gcc is not installed; {SET_UP_HINT}",
                    pytrace=False)
    compilers, results = {}, {}
    for wave in (True, False):
        started = {
            output: subprocess.Popen(
                ["gcc", f"-{opt}", *CFLAGS, "-o", os.path.join(directory, output),
                 *(os.path.join(FIXTURES_DIR, source) for source in sources), *flags],
                cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for output, (sources, flags) in PROGRAMS.items() if ("-shared" in flags) == wave}
        results.update({output: compiler.communicate()[0] for output, compiler in started.items()})
        compilers.update(started)
    for output, messages in results.items():
        if compilers[output].returncode == 0:
            continue
        if "sys/sdt.h" in messages:
            pytest.fail(f"cannot build the C test fixtures: sys/sdt.h is missing "
                        f"(package systemtap-sdt-dev); {SET_UP_HINT}", pytrace=False)
        pytest.fail(f"gcc failed to build fixture {output} at -{opt}:\n{messages}", pytrace=False)


def build_fixtures():
    """Brings BUILD_DIR/<opt>/ up to date for every opt level; safe to race."""
    os.makedirs(BUILD_DIR, mode=0o700, exist_ok=True)
    digest = fixtures_digest()
    with open(os.path.join(BUILD_DIR, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for opt in OPT_LEVELS:
            directory = os.path.join(BUILD_DIR, opt)
            stamp = os.path.join(directory, ".digest")
            try:
                with open(stamp) as stamp_file:
                    current = stamp_file.read() == digest
            except FileNotFoundError:
                current = False
            if current and all(os.path.exists(os.path.join(directory, output))
                               for output in PROGRAMS):
                continue
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=BUILD_DIR) as scratch:
                compile_programs(opt, scratch)
                for output in PROGRAMS:
                    os.replace(os.path.join(scratch, output), os.path.join(directory, output))
            with open(stamp, "w") as stamp_file:
                stamp_file.write(digest)


class FixturePrograms:
    """The built fixture programs: .path(name, opt) is an absolute, symlink-free path."""

    def path(self, name, opt="O2"):
        if name not in PROGRAMS or opt not in OPT_LEVELS:
            raise ValueError(f"no fixture program {name!r} at {opt!r}")
        return os.path.join(BUILD_DIR, opt, name)


# --- the Java fixture programs ------------------------------------------------
#
# tests/fixtures/java/*.java, compiled by javac into BUILD_DIR/java/ the way the C
# programs are built: a digest of the sources next to the classes, an flock, a
# scratch directory renamed into place.

JAVA_SOURCES_DIR = os.path.join(FIXTURES_DIR, "java")
JAVA_BUILD_DIR = os.path.join(BUILD_DIR, "java")


def jdk_home():
    """The home of the JDK whose javac is on $PATH (javac is JDK_HOME/bin/javac), or None."""
    javac = shutil.which("javac")
    return None if javac is None else os.path.dirname(os.path.dirname(os.path.realpath(javac)))


def build_java_fixtures():
    """BUILD_DIR/java/ up to date with tests/fixtures/java/ (safe to race); its path."""
    sources = sorted(name for name in os.listdir(JAVA_SOURCES_DIR) if name.endswith(".java"))
    digest = hashlib.sha256()
    for name in sources:
        with open(os.path.join(JAVA_SOURCES_DIR, name), "rb") as source:
            digest.update(name.encode() + b"\0" + source.read())
    os.makedirs(BUILD_DIR, mode=0o700, exist_ok=True)
    stamp = os.path.join(JAVA_BUILD_DIR, ".digest")
    with open(os.path.join(BUILD_DIR, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(stamp) as stamp_file:
                if stamp_file.read() == digest.hexdigest():
                    return JAVA_BUILD_DIR
        except FileNotFoundError:
            pass
        if jdk_home() is None:
            pytest.fail(f"cannot build the Java test fixtures: javac is not installed "
                        f"(package openjdk-17-jdk-headless); {SET_UP_HINT}", pytrace=False)
        scratch = tempfile.mkdtemp(dir=BUILD_DIR)
        compiler = subprocess.run(["javac", "-d", scratch,
                                   *(os.path.join(JAVA_SOURCES_DIR, name) for name in sources)],
                                  capture_output=True, text=True)
        if compiler.returncode != 0:
            shutil.rmtree(scratch)
            pytest.fail(f"javac failed to build the Java fixtures:\n{compiler.stderr}",
                        pytrace=False)
        with open(os.path.join(scratch, ".digest"), "w") as stamp_file:
            stamp_file.write(digest.hexdigest())
        shutil.rmtree(JAVA_BUILD_DIR, ignore_errors=True)
        os.replace(scratch, JAVA_BUILD_DIR)
    return JAVA_BUILD_DIR


# --- running the command line ----------------------------------------------

SUMMARY = re.compile(r"^sdtrace: (\d+) events, (\d+) lost$")


def sdtrace_command(*args):
    """argv that runs the sdtrace CLI with the interpreter running the tests."""
    return [sys.executable, "-m", "sdtrace", *args]


def sdtrace(*args, stdin=None, timeout=180, **options):
    """Runs the sdtrace CLI to its end; a CompletedProcess with text output."""
    return subprocess.run(sdtrace_command(*args), input=stdin, capture_output=True, text=True,
                          timeout=timeout, **options)


def summary_counts(stderr):
    """(events, lost) from the summary's last line, which scripts rely on."""
    match = SUMMARY.match(stderr.strip().splitlines()[-1])
    assert match, stderr
    return int(match[1]), int(match[2])


def one_line_error(result, *words):
    """Asserts the documented failure: status 1, one "sdtrace: ..." line naming `words`.

    stdout is not checked: a `-c` command may have started (and written) before the error."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtrace: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def executor_events(executor, timeout=0):
    """The records an executor (bpf or tracefs) has for us now, as sdtrace.Event objects."""
    from sdtrace.engine.events import Event

    return [Event.from_record(record) for record in executor.read(timeout)]


def drain(executor, expected, read=()):
    """`read` (records already read) and every record up to `expected` in all, waiting
    for each; then whatever else came."""
    records = list(read)
    assert wait_for(lambda: records.extend(executor_events(executor)) or
                    len(records) >= expected)
    return records + executor_events(executor)


def pids(records):
    return sorted(record.pid for record in records)


def at_once(targets, command, timeout=300):
    """Sends `command` to every Target at the same time; {pid: its reply's lines}."""
    import threading

    replies = {}

    def send(target):
        replies[target.pid] = target.send(command, timeout=timeout)
    threads = [threading.Thread(target=send, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return replies


def wait_for(condition, timeout=5.0):
    """Polls `condition` until it holds or `timeout` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return condition()
        time.sleep(0.01)
    return True


def holds_for(condition, seconds):
    """Whether `condition` stays true for `seconds`, polled; False at its first lapse.

    For what must NOT happen (a second raise, a lost lowering): there is no
    event to wait for, so the window is watched, and a lapse ends it early.
    """
    deadline = time.monotonic() + seconds
    while condition():
        if time.monotonic() > deadline:
            return True
        time.sleep(0.01)
    return False


TRACING = "sdtrace: tracing"


def trace_workload_timeline(fixtures, timeline_path, events_path):
    """`sdtrace trace` of every probe of the workload fixture making one sleep pair, a
    nest of pairs, pairs on 2 threads and 5 requests, its events as JSON lines in
    `events_path` and its timeline (--perfetto) in `timeline_path`: the CompletedProcess,
    which printed each pair as "pair TID NS"."""
    result = sdtrace("trace", "--json", "-o", str(events_path), "--perfetto",
                     str(timeline_path), "-c", fixtures.path("workload"), "workload:*",
                     stdin="sleep 1300\nnest 1000\nthreads 2\nrequest 5\n")
    assert result.returncode == 0, result.stderr
    return result


def latency_workload_timeline(fixtures, timeline_path):
    """`sdtrace latency --json --match arg0` of the workload fixture's start/end pairs (a
    nest of pairs, pairs on 2 threads), its timeline (--perfetto) in `timeline_path`: the
    CompletedProcess, which printed each pair as "pair TID NS"."""
    result = sdtrace("latency", "--json", "--match", "arg0", "--perfetto", str(timeline_path),
                     "-c", fixtures.path("workload"), "workload:start", "workload:end",
                     stdin="nest 1000\nthreads 2\n")
    assert result.returncode == 0, result.stderr
    return result


def until_armed(process, timeout=60):
    """What an sdtrace `process` (text stderr, piped) wrote to stderr up to the line
    saying it is tracing; killed, an AssertionError, if it never says so."""
    stderr = ""
    deadline = time.monotonic() + timeout
    while TRACING not in stderr:
        line = process.stderr.readline()
        if not line or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"sdtrace did not arm: {stderr}{process.stderr.read()}")
        stderr += line
    return stderr


class Background:
    """An sdtrace command (a tool) running in the background from the moment it is armed
    until stop() sends SIGINT: its CompletedProcess, all of stderr in it."""

    def __init__(self, *args):
        self.process = subprocess.Popen(sdtrace_command(*args), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.stderr = until_armed(self.process)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        out, err = self.process.communicate(timeout=60)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, out,
                                           self.stderr + err)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


class Tracer:
    """`sdtrace trace` running in the background, writing JSON events to a file."""

    def __init__(self, tmp_path, *args):
        self.output = tmp_path / f"events-{time.monotonic_ns()}.json"
        self.process = subprocess.Popen(
            sdtrace_command("trace", "--json", "-o", str(self.output), *args),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr = until_armed(self.process)

    def stop(self, sig=signal.SIGINT):
        """Stop the tracer; returns the events it wrote."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        _out, err = self.process.communicate(timeout=60)
        self.stderr += err
        return self.events()

    def events(self):
        return [json.loads(line) for line in self.output.read_text().splitlines()]

    def kill(self):
        """Make sure the tracer is gone (a failed test's finally); never leaves definitions."""
        if not end_process(self.process, signal.SIGINT, 20):
            subprocess.run(sdtrace_command("cleanup"), capture_output=True, timeout=60)


def end_process(process, signum, timeout):
    """Sends `signum` to `process` if it still runs, waits up to `timeout` seconds for it to
    end, then kills it; whether it ended without the kill."""
    if process.poll() is not None:
        return True
    process.send_signal(signum)
    try:
        process.communicate(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return False


# --- driving a fixture program ----------------------------------------------

class Reply(list):
    """The lines a command printed before its closing "done" line.

    `done` is the rest of that closing line: "" normally, the elapsed
    nanoseconds for flood's "fire N".
    """
    done = ""


class Target:
    """A running fixture program, driven over the protocol of command_loop.h.

        with Target(fixtures.path("semuser"), fixtures.path("libsdtsem.so")) as target:
            target.send("load")
            assert target.send("fire 3") == ["enabled 0"]

    send() fails the test on a reply line starting with "error", on a timeout
    and when the program exits.  stop() (and leaving the with block) closes
    stdin, gives the program a moment to exit, and kills it otherwise.
    """

    def __init__(self, path, *args, timeout=30.0):
        self.argv = [path, *args]
        self.timeout = timeout
        self.process = None
        self.pid = None
        self._unread = b""

    def start(self):
        self.process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, bufsize=1)
        try:
            words = self._read_line(self.timeout).split()
            assert words[:1] == ["ready"] and len(words) == 2, f"{self.argv[0]} said {words}"
            self.pid = int(words[1])
        except BaseException:
            self.stop()
            raise
        return self

    def send(self, command, timeout=None):
        """Sends one command; returns its Reply once the closing "done" line arrives."""
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise AssertionError(f"{self.argv[0]} exited (status {self.process.wait()}) "
                                 f"before {command!r}") from None
        reply = Reply()
        while True:
            line = self._read_line(self.timeout if timeout is None else timeout)
            if line.split(" ", 1)[0] == "done":
                reply.done = line[len("done"):].strip()
                break
            reply.append(line)
        errors = [line for line in reply if line.startswith("error")]
        assert not errors, f"{os.path.basename(self.argv[0])} {command!r}: {errors[0]}"
        return reply

    def _read_line(self, timeout):
        """One line of output, read straight from the pipe so that select() sees all of it."""
        deadline = time.monotonic() + timeout
        descriptor = self.process.stdout.fileno()
        while b"\n" not in self._unread:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([descriptor], [], [], remaining)[0]:
                raise AssertionError(f"{self.argv[0]} did not answer within {timeout}s")
            chunk = os.read(descriptor, 65536)
            if not chunk:
                raise AssertionError(
                    f"{self.argv[0]} exited (status {self.process.wait()}) instead of answering")
            self._unread += chunk
        line, _, self._unread = self._unread.partition(b"\n")
        return line.decode()

    def stop(self):
        """Ends the program; returns its exit status (negative: killed by that signal)."""
        if self.process is None:
            return None
        try:
            self.process.stdin.close()
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.process.stdout.close()
        return self.process.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


# --- looking at a process through /proc -------------------------------------

@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""
    start: int
    end: int
    perms: str      # e.g. "r-xp"
    offset: int     # file offset mapped at `start`
    inode: int
    path: str       # "" for anonymous memory

    def holds_file_offset(self, file_offset):
        return self.offset <= file_offset < self.offset + (self.end - self.start)


def maps(pid):
    mappings = []
    with open(f"/proc/{pid}/maps") as maps_file:
        for line in maps_file:
            fields = line.split(maxsplit=5)
            start, end = fields[0].split("-")
            mappings.append(Mapping(int(start, 16), int(end, 16), fields[1], int(fields[2], 16),
                                    int(fields[4]), fields[5].strip() if len(fields) > 5 else ""))
    return mappings


def address_of(pid, path, file_offset, perms=None):
    """The run-time address of `file_offset` of the file `path` in process `pid`.

    A file offset can be mapped twice (RELRO remaps part of a page read-only
    right after the read-only segment), so an ambiguous answer is refused:
    pass `perms` (e.g. "rw-p") to pick the mapping.  LookupError if none fits.
    """
    real_path = os.path.realpath(path)
    candidates = [mapping for mapping in maps(pid)
                  if mapping.path == real_path and mapping.holds_file_offset(file_offset)
                  and perms in (None, mapping.perms)]
    if len(candidates) != 1:
        raise LookupError(f"{len(candidates)} mappings of {real_path} in process {pid} hold file "
                          f"offset {file_offset:#x}{f' with {perms}' if perms else ''}: {candidates}")
    [mapping] = candidates
    return mapping.start + file_offset - mapping.offset


def read_mem(pid, address, size):
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        memory.seek(address)
        return memory.read(size)


def write_mem(pid, address, data):
    """Pokes `data` into process `pid`, e.g. to set a semaphore the way a tracer would."""
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as memory:
        memory.seek(address)
        memory.write(data)


COUNTER = struct.Struct("<H")   # an SDT semaphore: unsigned short, little-endian here


def counter(pid, path, offset):
    """The semaphore at file `offset` of `path` in process `pid`, read from its memory."""
    return COUNTER.unpack(read_mem(pid, address_of(pid, path, offset, perms="rw-p"), 2))[0]


def set_counter(pid, path, offset, value):
    """Writes the semaphore at file `offset` of `path` in process `pid`, as a tracer would."""
    write_mem(pid, address_of(pid, path, offset, perms="rw-p"), COUNTER.pack(value))


def private_copy(fixtures, name, tmp_path, opt="O2"):
    path = tmp_path / name
    shutil.copy(fixtures.path(name, opt), path)
    return str(path)


def semaphore_offsets(path, probe_name=None):
    """{link-time semaphore address: file offset} of the probes (named `probe_name`)."""
    return {note.semaphore: file_offset(path, note.semaphore) for note in readelf_notes(path)
            if note.semaphore and probe_name in (None, note.name)}


def started_by_us(pid):
    """Scope for the managers of these tests: processes this test session started."""
    try:
        while pid > 1:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                pid = int(stat.read().rsplit(b")", 1)[1].split()[1])
            if pid == os.getpid():
                return True
    except (OSError, ValueError):
        pass
    return False


class Library:
    """A private copy of libsdtsem.so and semuser programs that load it."""

    def __init__(self, fixtures, tmp_path, opt="O2"):
        self.path = private_copy(fixtures, "libsdtsem.so", tmp_path, opt)
        self.semuser = fixtures.path("semuser", opt)
        [self.offset] = semaphore_offsets(self.path).values()
        self.warnings = []

    def manager(self, scope=started_by_us, **options):
        return SemaphoreManager([(self.path, self.offset, sys.byteorder)], scope, warn=self.warnings.append,
                                **options)

    def user(self, load=True):
        target = Target(self.semuser, self.path).start()
        if load:
            target.send("load")
        return target

    def value(self, pid):
        return counter(pid, self.path, self.offset)

    @contextlib.contextmanager
    def users(self, count):
        """`count` semuser processes with the library loaded, stopped on the way out."""
        with contextlib.ExitStack() as stack:
            started = []
            for _ in range(count):
                started.append(self.user())
                stack.callback(started[-1].stop)
            yield started


def child_of(reply):
    """The pid semuser's "fork" printed ("child PID"): the child now reads the commands."""
    [line] = reply
    return int(line.split()[1])


# --- an oracle for ELF facts: readelf, independent of sdtrace ---------------

# The machine's real SDT-enabled binaries; a test skips one that is not installed.
SYSTEM_PYTHON = "/usr/bin/python3.11"      # Debian's build, with SDT markers
PYTHON_CALLS = os.path.join(FIXTURES_DIR, "calls.py")   # g calls f: see its docstring
LIBPYTHON = "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"
POSTGRES_BIN = "/usr/lib/postgresql/15/bin"
LIBJVM = "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so"
REAL_SDT_BINARIES = (SYSTEM_PYTHON, LIBPYTHON, f"{POSTGRES_BIN}/postgres", LIBJVM,
                     "/usr/lib/x86_64-linux-gnu/libstdc++.so.6")


# --- a real PostgreSQL 15 server --------------------------------------------

def _as_postgres(*command, **options):
    return subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True,
                          capture_output=True, text=True, timeout=120, **options)


@contextlib.contextmanager
def postgres_server(prefix="sdtrace-postgres-"):
    """(socket directory, postmaster pid) of a throw-away PostgreSQL 15 server on a Unix
    socket, run as `postgres` (initdb --auth=trust, pg_ctl); stopped and removed after.
    Its directory is not under pytest's tmp_path, which only root may enter."""
    import pwd

    owner = pwd.getpwnam("postgres")
    scratch = tempfile.mkdtemp(prefix=prefix)
    os.chown(scratch, owner.pw_uid, owner.pw_gid)
    data, socket_dir, log = (os.path.join(scratch, name) for name in ("data", "socket", "log"))
    try:
        _as_postgres("mkdir", socket_dir)
        _as_postgres(f"{POSTGRES_BIN}/initdb", "-D", data, "--auth=trust")
        _as_postgres(f"{POSTGRES_BIN}/pg_ctl", "-D", data, "-w", "-l", log,
                     "-o", f"-k {socket_dir} -c listen_addresses=''", "start")
        with open(os.path.join(data, "postmaster.pid")) as pid_file:
            yield socket_dir, int(pid_file.readline())
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", f"{POSTGRES_BIN}/pg_ctl", "-D", data,
                        "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


def psql(socket_dir, sql, check=True):
    """psql -Atc `sql` against the server's `postgres` database, as `postgres`: one
    connection (one backend), one simple query; the CompletedProcess."""
    return subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-h", socket_dir, "-d",
                           "postgres", "-Atc", sql], check=check, capture_output=True,
                          text=True, timeout=120)


class PsqlSession:
    """A psql reading queries from a pipe: one backend, whose pid is `backend`, for the
    queries send() writes; close() ends it (and the backend) and returns its stdout."""

    def __init__(self, socket_dir):
        self.process = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", "psql", "-h", socket_dir, "-d", "postgres",
             "-At", "-v", "ON_ERROR_STOP=0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        self.send("SELECT pg_backend_pid();")
        self.backend = int(self.process.stdout.readline())

    def send(self, *queries):
        self.process.stdin.write("".join(f"{query}\n" for query in queries))
        self.process.stdin.flush()

    def close(self, timeout=120):
        out, _err = self.process.communicate(timeout=timeout)
        return out

NOTE = re.compile(r"Provider: (\S+)\s+Name: (\S+)\s+Location: (0x[0-9a-f]+), Base: 0x[0-9a-f]+, "
                  r"Semaphore: (0x[0-9a-f]+)\s+Arguments:([^\n]*)")
PROGRAM_HEADER = re.compile(r"^\s*([A-Z_]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+0x[0-9a-f]+\s+"
                            r"(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+([RWE ]+?)\s+0x[0-9a-f]+$", re.M)


@dataclass(frozen=True)
class Note:
    """One stapsdt note as readelf -n prints it."""
    provider: str
    name: str
    location: int   # link-time address of the probe site
    semaphore: int  # link-time address of the semaphore, 0 if none
    args: tuple     # argument specs, e.g. ("-4@%edi", "1@$-127")


@dataclass(frozen=True)
class Segment:
    """One program header as readelf -lW prints it."""
    type: str       # "LOAD", "GNU_RELRO", ...
    offset: int
    vaddr: int
    filesz: int
    memsz: int
    flags: str      # e.g. "RW", "R E"


def readelf(*args):
    return subprocess.run(["readelf", "--wide", *args], check=True, capture_output=True,
                          text=True).stdout


def readelf_notes(path):
    return [Note(provider, name, int(location, 16), int(semaphore, 16), tuple(args.split()))
            for provider, name, location, semaphore, args in NOTE.findall(readelf("-n", path))]


def readelf_segments(path):
    return [Segment(kind, int(offset, 16), int(vaddr, 16), int(filesz, 16), int(memsz, 16),
                    flags.strip())
            for kind, offset, vaddr, filesz, memsz, flags
            in PROGRAM_HEADER.findall(readelf("-l", path))]


def file_offset(path, address):
    """The file offset of link-time `address` (which lies in the file part of a PT_LOAD)."""
    for segment in readelf_segments(path):
        if segment.type == "LOAD" and segment.vaddr <= address < segment.vaddr + segment.filesz:
            return address - segment.vaddr + segment.offset
    raise LookupError(f"{path}: address {address:#x} is in no PT_LOAD's file image")


# --- the kernel stays clean -------------------------------------------------

# sdtrace names its groups sdtrace_<owner pid>_<owner start time>_<n> (see sdtrace/tracefs.py)
SESSION_GROUP = re.compile(r"sdtrace_(\d+)_(\d+)_\d+$")
STAT_FIELDS_AFTER_COMM = 3   # /proc/PID/stat: fields 1 and 2 are "pid (comm)"
PPID_FIELD, STARTTIME_FIELD = 4, 22


def sdtrace_uprobe_events():
    """{line: group} for the lines of uprobe_events whose group starts with "sdtrace_"."""
    try:
        with open(UPROBE_EVENTS) as events:
            lines = events.read().splitlines()
    except OSError:
        return {}
    # a line is "p:GROUP/EVENT PATH:OFFSET[(REF_CTR_OFFSET)] ARGS..."
    groups = {line: line.split(" ", 1)[0].partition(":")[2].partition("/")[0] for line in lines}
    return {line: group for line, group in groups.items() if group.startswith("sdtrace_")}


def held_by_another_session(group):
    """True if the group's owner is alive and is neither this process nor its child.

    Such a group belongs to a tracer of a concurrent test session (another
    pytest run, a pytest-xdist peer); one whose owner is gone, or is this
    process or a tracer it started, is this session's to clean up.
    """
    match = SESSION_GROUP.match(group)
    if not match or int(match[1]) == os.getpid():
        return False
    try:
        with open(f"/proc/{match[1]}/stat") as stat_file:
            fields = stat_file.read().rpartition(")")[2].split()
    except OSError:
        return False
    return (fields[STARTTIME_FIELD - STAT_FIELDS_AFTER_COMM] == match[2]
            and int(fields[PPID_FIELD - STAT_FIELDS_AFTER_COMM]) != os.getpid())


def mount_tracefs():
    if os.geteuid() == 0 and not os.path.exists(UPROBE_EVENTS):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=True)


# --- a hand-written SDT program and its uprobe, for the tracefs and perf layers ---

# demo:hit(int i, const char *message), guarded by its semaphore, speaking the
# protocol of tests/fixtures/command_loop.h: "fire N" -> "enabled 0|1" (the
# semaphore as the loop started), N hits with i = 0..N-1, "done".  argv[1] is
# the message; "NULL" passes a NULL pointer.
SDT_PROGRAM = r"""
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

volatile unsigned short demo_hit_semaphore __attribute__((section(".probes")));

int main(int argc, char **argv)
{
    const char *message = argc > 1 && strcmp(argv[1], "NULL") ? argv[1] : NULL;
    char line[64];

    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long count = strncmp(line, "fire ", 5) ? 0 : atol(line + 5);

        printf("enabled %d\n", demo_hit_semaphore != 0);
        for (long i = 0; i < count; i++)
            if (demo_hit_semaphore)
                DTRACE_PROBE2(demo, hit, (int)i, message);
        puts("done");
        fflush(stdout);
    }
    return 0;
}
"""


@dataclass(frozen=True)
class SdtProgram:
    path: str
    site: int            # file offset of demo:hit (the uprobe offset)
    site_address: int    # its link-time address
    semaphore: int       # file offset of demo_hit_semaphore (the ref_ctr_offset)
    fetchargs: tuple     # arg1 = i as s32, arg2 = message as string


def x86_fetcharg(spec):
    """An SDT argument spec as a fetcharg: "-4@%eax" -> "%ax", "8@16(%rsp)" -> "+16(%sp)"."""
    location = spec.split("@", 1)[1]

    def register(name):
        if re.fullmatch(r"r\d+[dwb]?", name):
            return name.rstrip("dwb")
        name = {"al": "ax", "bl": "bx", "cl": "cx", "dl": "dx", "sil": "si", "dil": "di",
                "bpl": "bp", "spl": "sp"}.get(name, name)
        return name[1:] if len(name) == 3 else name

    memory = re.fullmatch(r"(-?\d*)\(%(\w+)\)", location)
    if memory:
        return f"{int(memory[1] or 0):+d}(%{register(memory[2])})"
    assert re.fullmatch(r"%\w+", location), f"unexpected operand {spec}"
    return "%" + register(location[1:])


def build_sdt_program(directory):
    source = os.path.join(directory, "demo.c")
    path = os.path.join(directory, "demo")
    with open(source, "w") as file:
        file.write(SDT_PROGRAM)
    subprocess.run(["gcc", "-O2", "-o", path, source], check=True)
    [note] = readelf_notes(path)
    int_spec, string_spec = note.args
    return SdtProgram(path, file_offset(path, note.location), note.location,
                      file_offset(path, note.semaphore),
                      (f"arg1={x86_fetcharg(int_spec)}:s32",
                       f"arg2=+0({x86_fetcharg(string_spec)}):string"))


def definitions_of(group):
    """The uprobe_events lines of `group`."""
    with open(os.path.join(tracefs.root(), "uprobe_events")) as file:
        return [line for line in file.read().splitlines()
                if line.split(None, 1)[0][2:].split("/")[0] == group]


def add_demo_hit(program, group, event="hit", **overrides):
    arguments = dict(ref_ctr_offset=program.semaphore, fetchargs=program.fetchargs)
    arguments.update(overrides)
    tracefs.add_uprobe(group, event, program.path, program.site, **arguments)
