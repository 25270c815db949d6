"""Benchmark: listing the probes of the machine's real targets, side by side.

Runs, in one go, on libjvm.so + postgres + python3.11 + libpython3.11:
  * `sdtrace list --json FILES` as a whole process (the interpreter itself,
    not the pyenv shim, which adds ~100 ms), with and without site (.pth);
  * `bpftrace -l 'usdt:FILE:*'` once per file, summed (if installed);
  * `readelf -n FILES` as a whole process;
  * a pyelftools script doing the same job (notes + segment mapping);
and in-process: sdtrace's parse time versus pyelftools'.  Medians of REPEAT
runs; ratios are the figures to quote (the machine is noisy).
"""
import os
import shutil
import statistics
import subprocess
import sys
import time

from common import ENVIRONMENT, REPO

FILES = [path for path in (
    "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so",
    "/usr/lib/postgresql/15/bin/postgres",
    "/usr/bin/python3.11",
    "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
) if os.path.exists(path)]
REPEAT = int(os.environ.get("REPEAT", "7"))
# sdtrace without the interpreter's site initialisation: what a packaged
# install costs, minus this machine's .pth files (pyenv's editable-install
# finder and a certificate hook add ~20 ms before any sdtrace code runs).
LEAN_START = f"import sys; sys.path.insert(0, {REPO!r}); from sdtrace.cli import main; sys.exit(main())"

PYELFTOOLS_SCRIPT = r"""
import sys
from elftools.elf.elffile import ELFFile
for path in sys.argv[1:]:
    with open(path, 'rb') as f:
        elf = ELFFile(f)
        loads = [s for s in elf.iter_segments() if s['p_type'] == 'PT_LOAD']
        section = elf.get_section_by_name('.note.stapsdt')
        for note in section.iter_notes():
            desc = note['n_descdata']
            pc = int.from_bytes(desc[:8], 'little')
            for s in loads:
                if s['p_vaddr'] <= pc < s['p_vaddr'] + s['p_filesz']:
                    offset = pc - s['p_vaddr'] + s['p_offset']
                    break
"""


def median_seconds(function):
    function()  # warm-up: page cache, byte-compiled modules
    samples = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run(command):
    return lambda: subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env=ENVIRONMENT)


def main():
    print(f"files: {', '.join(os.path.basename(f) for f in FILES)}; median of {REPEAT}")
    rows = [("sdtrace list --json (process)", median_seconds(
        run([sys.executable, "-S", "-c", LEAN_START, "list", "--json", *FILES]))),
            ("  the same with site (.pth files)", median_seconds(
        run([sys.executable, "-m", "sdtrace", "list", "--json", *FILES])))]
    if shutil.which("bpftrace"):
        commands = [run(["bpftrace", "-l", f"usdt:{path}:*"]) for path in FILES]
        rows.append(("bpftrace -l usdt:FILE:* (summed)",
                     median_seconds(lambda: [command() for command in commands])))
    rows.append(("readelf -n (process)", median_seconds(run(["readelf", "-n", *FILES]))))
    rows.append(("pyelftools script (process)", median_seconds(
        run([sys.executable, "-c", PYELFTOOLS_SCRIPT, *FILES]))))
    rows.append(("python -S -c pass (start-up)", median_seconds(run([sys.executable, "-S", "-c", "pass"]))))

    from sdtrace.discovery import notes, operands

    def parse_cold():
        operands.parse_operand.cache_clear()   # no help from an earlier repetition
        operands.parse_arguments.cache_clear()
        for path in FILES:
            notes.read_probes(path)
    rows.append(("sdtrace parse, in process", median_seconds(parse_cold)))
    pyelftools_code = compile(PYELFTOOLS_SCRIPT.replace("sys.argv[1:]", "FILES"), "pyelftools", "exec")
    rows.append(("pyelftools parse, in process", median_seconds(
        lambda: exec(pyelftools_code, {"FILES": FILES}))))

    times = dict(rows)
    sdtrace_process = times["sdtrace list --json (process)"]
    for label, seconds in rows:
        print(f"{label:36} {seconds * 1000:8.1f} ms   {seconds / sdtrace_process:6.2f}x sdtrace list")
    if "bpftrace -l usdt:FILE:* (summed)" in times:
        print(f"bpftrace -l / sdtrace list: {times['bpftrace -l usdt:FILE:* (summed)'] / sdtrace_process:.1f}x"
              " (goal >= 4x)")
    print(f"sdtrace in-process parse / readelf -n process: "
          f"{times['sdtrace parse, in process'] / times['readelf -n (process)']:.2f}x (goal <= 2x)")
    print(f"pyelftools / sdtrace, in process: "
          f"{times['pyelftools parse, in process'] / times['sdtrace parse, in process']:.1f}x")


if __name__ == "__main__":
    main()
