"""The traced command of ``-c CMD``: started held, released, reaped.

The command is forked and held before ``exec`` (it waits on a pipe) while the
session arms its sites and starts following the child's process tree; then
it is released.  That is all the kernel's ref_ctr needs: it raises the
semaphores as the new image and its libraries are mapped.

User-space semaphores (semaphores/) need more: the counters must be raised
before the command runs any code that could test them, including library
constructors and libraries loaded later with dlopen.  So the command is run
under ptrace, and stopped:

* at every ``exec`` -- the new image and its loader are mapped, nothing has
  run yet;
* at every call of the loader's ``_dl_debug_state()`` -- the function the
  loader calls for debuggers (the ``r_brk`` of ``struct r_debug``) after
  it has mapped a set of objects and before it relocates them and runs
  their constructors, at start-up and at each dlopen.

At each stop ``on_load(pid)`` is called (the session rescans that process)
and the process continues.  The breakpoint is an int3 written over the
first byte of ``_dl_debug_state``, which is a bare ``ret``: at the trap the
tracer performs the ``ret`` itself (pops the return address into the
instruction pointer), so nothing has to be restored or single-stepped.
Each int3 is told to the semaphore guardian before it is written
(``on_patch``, a kernel.procmem.CodePatch): if sdtrace dies, the kernel
detaches the tracees and the guardian writes the ``ret`` back, so the
command's next dlopen does not trap with no tracer to serve it.
Threads, forks and execs of the command are followed (PTRACE_O_TRACECLONE,
TRACEFORK, TRACEVFORK, TRACEEXEC), so every process of the tree is held the
same way.  Only x86-64 is supported for these stops; elsewhere the command
is not ptraced, and its counters are raised as the semaphore manager notices
its new processes and mappings (best effort, said in a warning).

All ptrace requests must come from the thread that forked the command, so
one thread forks, waits for the release, and then serves the stops until the
command exits.  It reaps with waitpid(-1): any other child of this process
that exits meanwhile is reaped too (subprocess tolerates that).
"""
import ctypes
import os
import signal
import struct
import threading
from dataclasses import replace

from ..errors import SdtraceError
from ..kernel.libc import checked, libc, machine
from ..kernel.procfs import ProcessDenied, ProcessGone, read_starttime
from ..kernel.procmem import CodePatch

PTRACE_TRACEME, PTRACE_CONT, PTRACE_GETREGS, PTRACE_SETREGS = 0, 7, 12, 13
PTRACE_DETACH, PTRACE_SETOPTIONS, PTRACE_GETEVENTMSG = 17, 0x4200, 0x4201
PTRACE_O_TRACEFORK, PTRACE_O_TRACEVFORK, PTRACE_O_TRACECLONE = 0x2, 0x4, 0x8
PTRACE_O_TRACEEXEC = 0x10
PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK, PTRACE_EVENT_CLONE, PTRACE_EVENT_EXEC = 1, 2, 3, 4
WALL = 0x40000000
TRACE_OPTIONS = PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC

# struct user_regs_struct (x86-64): 27 unsigned longs; the two we use.
USER_REGS = struct.Struct("27Q")
RIP, RSP = 16, 19
INT3, RET = b"\xcc", b"\xc3"
LOADER_HOOK = "_dl_debug_state"


class Command:
    """One command run for a session; `exit_status` is None until it has exited."""

    def __init__(self, argv, on_load=None, on_patch=None):
        self.argv = list(argv)
        self.pid = None
        self.exit_status = None
        self.warnings = []
        if on_load is not None and machine() != "x86_64":
            self.warnings.append(f"holding a command at its library loads needs x86-64, not "
                                 f"{machine()}: its semaphores are raised as they are noticed")
            on_load = None
        self.on_load = on_load           # stop at exec and library loads, call on_load(pid)
        self.on_patch = on_patch or (lambda _patch, _planted: None)   # each int3 planted/gone
        self._gate = threading.Event()   # set by release()
        self._started = threading.Event()
        self._exec_done = threading.Event()
        self._leaving = threading.Event()    # set by leave(): the tracer detaches
        self._exec_error = None
        self._thread = threading.Thread(target=self._run, name="sdtrace-command", daemon=True)

    def start(self):
        """Fork the command, held before exec; return its PID."""
        self._thread.start()
        self._started.wait()
        if self.pid is None:
            raise SdtraceError(f"cannot start {self.argv[0]}: {self._exec_error}")
        return self.pid

    def release(self):
        """Let the command exec; SdtraceError if it could not."""
        self._gate.set()
        self._exec_done.wait()
        if self._exec_error:
            self._thread.join()
            raise SdtraceError(f"cannot run command: {self._exec_error}")

    def terminate(self, grace=2.0):
        """End the command if it still runs and wait for it: SIGTERM, then SIGKILL
        after `grace` seconds.  Returns how it was ended ("SIGTERM", "SIGKILL after
        2 s"), or None if it had exited by itself (or never started)."""
        if self.pid is None:
            return None
        ended = None
        if not self._gate.is_set():       # never released: it is still our held fork
            self._exec_error = "not started"
            os.kill(self.pid, signal.SIGKILL)
            self._gate.set()
        elif self.exit_status is None:
            ended = "SIGTERM"
            _signal(self.pid, signal.SIGTERM)
            self._thread.join(grace)
            if self.exit_status is None:
                ended = f"SIGKILL after {grace:g} s"
                _signal(self.pid, signal.SIGKILL)
        self._thread.join()
        return ended

    def leave(self):
        """Let the command run on after the session: under ptrace, its stops are
        detached and the loader hooks removed.  Returns False if it had exited."""
        if self.pid is None or not self._gate.is_set() or self.exit_status is not None:
            self.terminate()                 # never released, or already gone: nothing to leave
            return False
        if self.on_load is not None:
            self._leaving.set()
            _signal(self.pid, signal.SIGSTOP)  # wakes the tracer, which then lets go
            self._thread.join()
        return self.exit_status is None

    # -- the command's thread ----------------------------------------------

    def _run(self):
        gate_read, gate_write = os.pipe()
        error_read, error_write = os.pipe()
        try:
            pid = os.fork()
        except OSError as error:
            self._exec_error = error.strerror
            self._started.set()
            return
        if pid == 0:
            self._child(gate_read, gate_write, error_read, error_write)
        os.close(gate_read)
        os.close(error_write)
        self.pid = pid
        self._started.set()
        self._gate.wait()
        if self._exec_error is None:
            os.write(gate_write, b"x")
        os.close(gate_write)
        message = os.read(error_read, 4096)      # EOF (b"") once exec succeeded
        os.close(error_read)
        if message:
            self._exec_error = message.decode(errors="replace")
        self._exec_done.set()
        if self.on_load is not None and not message and self._exec_error is None:
            _Tracer(self).serve()
        else:
            self._reap_until_exit()

    def _child(self, gate_read, gate_write, error_read, error_write):
        """In the forked child: wait for the gate, then exec; never returns."""
        try:
            os.close(gate_write)
            os.close(error_read)
            if self.on_load is not None:
                _ptrace(PTRACE_TRACEME, 0, 0, 0)
            if os.read(gate_read, 1):
                os.execvp(self.argv[0], self.argv)
        except OSError as error:
            os.write(error_write, f"{self.argv[0]}: {error.strerror}".encode())
        finally:
            os._exit(127)

    def _reap_until_exit(self):
        _pid, status = os.waitpid(self.pid, 0)
        self.exit_status = _exit_code(status)


class _Tracer:
    """The ptrace loop of a held command: stops at exec and at library loads."""

    def __init__(self, command):
        self.command = command
        self.tracees = {command.pid}
        self.hooks = {}           # tid -> the CodePatch of its process's int3 in _dl_debug_state
        self.tgids = {command.pid: command.pid}
        self.unannounced = set()  # stopped before their parent's fork/clone event arrived
        self.fresh = set()        # announced, first stop (SIGSTOP) not yet seen

    def serve(self):
        command = self.command
        pid, status = os.waitpid(command.pid, WALL)
        if not os.WIFSTOPPED(status):                  # died at exec
            command.exit_status = _exit_code(status)
            return
        _ptrace(PTRACE_SETOPTIONS, pid, 0, TRACE_OPTIONS)
        self._at_exec(pid)
        _ptrace(PTRACE_CONT, pid, 0, 0)
        while self.tracees:
            try:
                pid, status = os.waitpid(-1, WALL)
            except ChildProcessError:
                break
            if pid not in self.tracees:
                if os.WIFSTOPPED(status):              # a new tracee, reported before its parent
                    self.unannounced.add(pid)
                continue                              # else another child of ours (module doc)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.tracees.discard(pid)
                self._forget_hook(pid)
                if pid == command.pid:
                    command.exit_status = _exit_code(status)
                    self._detach_all()
                continue
            self._on_stop(pid, status)

    def _on_stop(self, pid, status):
        signum, event = os.WSTOPSIG(status), status >> 16
        if self.command._leaving.is_set():   # the session ends and leaves the command running
            if signum == signal.SIGSTOP and event == 0:
                self._detach_all(stopped=pid)
                return
            if signum == signal.SIGTRAP and (event or self._at_hook(pid)):
                signum = 0                       # an event, or our hook (its ret done)
            self._continue(pid, signum)
            self._detach_all()
            return
        deliver = 0
        if signum == signal.SIGTRAP and event in (PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK,
                                                   PTRACE_EVENT_CLONE):
            child = _event_message(pid)
            self.tracees.add(child)
            self.fresh.add(child)
            thread = event == PTRACE_EVENT_CLONE and _tgid(child) == self.tgids.get(pid, pid)
            self.tgids[child] = self.tgids.get(pid, pid) if thread else child
            if pid in self.hooks:                      # same or copied memory: same int3
                self._share_hook(pid, child, thread)
            if child in self.unannounced:              # its first stop came first
                self.unannounced.discard(child)
                self.fresh.discard(child)
                self._continue(child, 0)
        elif signum == signal.SIGTRAP and event == PTRACE_EVENT_EXEC:
            self.tgids[pid] = pid
            self._at_exec(pid)
        elif signum == signal.SIGTRAP and event == 0 and self._at_hook(pid):
            pass
        elif signum == signal.SIGSTOP and event == 0 and pid in self.fresh:
            self.fresh.discard(pid)                    # a new tracee's first stop
        else:
            deliver = signum
        self._continue(pid, deliver)

    def _continue(self, pid, signum):
        try:
            _ptrace(PTRACE_CONT, pid, 0, signum)
        except OSError:
            self.tracees.discard(pid)                  # gone meanwhile

    def _at_exec(self, pid):
        """A fresh image: raise its counters, then plant the loader hook."""
        self.command.on_load(pid)
        self._forget_hook(pid)
        hook = _loader_hook(pid)
        if hook is None:
            self.command.warnings.append(
                f"process {pid}: no {LOADER_HOOK} in its loader; libraries it loads later "
                "are raised when the semaphore manager notices them")
            return
        address, loader, file_offset = hook
        patch = CodePatch(pid, read_starttime(pid), *loader, file_offset, address, RET[0],
                          INT3[0])
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as memory:
            memory.seek(address)
            if memory.read(1) != RET:
                self.command.warnings.append(f"process {pid}: {LOADER_HOOK} is not a bare ret")
                return
            self.command.on_patch(patch, True)     # told before it exists, as counters are
            memory.seek(address)
            memory.write(INT3)
        self.hooks[pid] = patch

    def _share_hook(self, parent, child, thread):
        """A new thread shares its process's int3; a fork child copied it with its
        parent's memory, and it is told as the child's own."""
        patch = self.hooks[parent]
        if not thread:
            try:
                patch = replace(patch, pid=child, starttime=read_starttime(child))
            except (ProcessGone, ProcessDenied):
                return                                 # gone already: nothing to undo
            self.command.on_patch(patch, True)
        self.hooks[child] = patch

    def _forget_hook(self, pid):
        """`pid` exited or exec'd: its int3 went with its memory."""
        patch = self.hooks.pop(pid, None)
        if patch is not None and patch not in self.hooks.values():
            self.command.on_patch(patch, False)

    def _at_hook(self, pid):
        """Our int3 in _dl_debug_state: rescan, then do its ret; False if not ours."""
        patch = self.hooks.get(pid)
        if patch is None:
            return False
        address = patch.address
        registers = ctypes.create_string_buffer(USER_REGS.size)
        _ptrace(PTRACE_GETREGS, pid, 0, ctypes.addressof(registers))
        values = list(USER_REGS.unpack(registers.raw))
        if values[RIP] != address + 1:
            return False
        self.command.on_load(self.tgids.get(pid, pid))
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
            memory.seek(values[RSP])
            values[RIP] = struct.unpack("<Q", memory.read(8))[0]
        values[RSP] += 8
        USER_REGS.pack_into(registers, 0, *values)
        _ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(registers))
        return True

    def _detach_all(self, stopped=None):
        """Let every tracee go, hooks removed: the command exited (its surviving
        descendants go on) or the session leaves it running.  `stopped` is a tracee
        already in a stop (not at our hook), whose stopping signal is not passed on."""
        for pid in list(self.tracees):
            try:
                if pid != stopped and not self._stop_for_detach(pid):
                    continue
                patch = self.hooks.get(pid)
                if patch is not None:
                    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as memory:
                        memory.seek(patch.address)
                        memory.write(RET)
                    self._forget_hook(pid)
                _ptrace(PTRACE_DETACH, pid, 0, signal.SIGCONT)
            except OSError:
                pass
        self.tracees.clear()

    def _stop_for_detach(self, pid):
        """Stops a running tracee with SIGSTOP; a trap at our hook met on the way is
        served (its ret done), any other stop passed on.  False if it exited."""
        _signal(pid, signal.SIGSTOP)
        while True:
            _pid, status = os.waitpid(pid, WALL)
            if not os.WIFSTOPPED(status):
                return False
            signum, event = os.WSTOPSIG(status), status >> 16
            if signum == signal.SIGSTOP and event == 0:
                return True
            if signum == signal.SIGTRAP and (event or self._at_hook(pid)):
                signum = 0
            _ptrace(PTRACE_CONT, pid, 0, signum)

def _loader_hook(pid):
    """(run-time address, the loader's (major, minor, inode), file offset) of the
    loader's _dl_debug_state in process `pid`, or None."""
    from ..discovery.elf import ElfError, ElfFile
    from ..kernel.procfs import file_identity, mapped_addresses, read_maps

    try:
        executable = os.readlink(f"/proc/{pid}/exe")
        with ElfFile(executable) as elf:
            interpreter = elf.interpreter()
        if interpreter is None:
            return None
        loader = file_identity(interpreter)
        with ElfFile(interpreter) as elf:
            value = elf.symbol_values([LOADER_HOOK]).get(LOADER_HOOK)
            segment = elf.load_segment(value) if value else None
        if segment is None:
            return None
        file_offset = value - segment.vaddr + segment.offset
        addresses = mapped_addresses(read_maps(pid), loader, file_offset, "x")
    except (OSError, ElfError, ProcessGone, ProcessDenied):
        return None
    return (addresses[0], loader, file_offset) if addresses else None


def _tgid(tid):
    try:
        with open(f"/proc/{tid}/status") as status:
            for line in status:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid


def _event_message(pid):
    message = ctypes.c_ulong()
    _ptrace(PTRACE_GETEVENTMSG, pid, 0, ctypes.addressof(message))
    return message.value


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _exit_code(status):
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code      # killed by a signal: the shell's convention


def _ptrace(request, pid, address, data):
    checked(libc().ptrace(request, pid, ctypes.c_void_p(address), ctypes.c_void_p(data)),
            f"ptrace({request}, {pid})")
