"""The report of ``sdtrace info``: what this kernel can do, and what a session would pick.

Like ``bpftrace --info``: the kernel release and machine, every feature of
kernel/features.py (yes/no, what said so, the release that brought it), the
executor ``--executor=auto`` picks and what each executor needs, the
semaphore mode ``--semaphores=auto`` picks and why, and whether arguments
can be fetched on this machine.  ``report()``
is a plain dict (``--json`` prints it as one object); ``text()`` lays it out
for people.
"""
import os

# The one difference in what the two semaphore modes guarantee (README, "Semaphores in
# user space"), said where the choice between them is shown.
USER_MODE_WINDOW = ("user mode raises the semaphore of a process that starts during a "
                    "system-wide or -p session a little after it starts (when it opens the "
                    "file); kernel mode raises it as the file is mapped, with no such window")


def report() -> dict:
    from ..engine import fetchargs, session
    from ..engine.bpf import codegen
    from ..kernel import features

    found = {feature.name: feature for feature in features.check_all()}
    machine = os.uname().machine
    mode, why = session.auto_semaphores()
    uprobes = found["tracefs_uprobes"]
    user = found["proc_connector"]
    bpf_ready = (all(found[name].available for name in session.BPF_FEATURES)
                 and any(found[name].available for name in session.BPF_LINKS))
    auto, auto_why = session.choose_executor("auto", {machine})
    return {
        "release": os.uname().release,
        "machine": machine,
        "executor": {
            "auto": auto,
            "why": auto_why,
            "bpf": {
                "available": bpf_ready and machine in codegen.REGISTERS,
                "needs": [*session.BPF_FEATURES, " or ".join(session.BPF_LINKS)],
                "machines": sorted(codegen.REGISTERS),
                "how": "one generated BPF program and one uprobe_multi link per file, "
                       "records on one BPF ring buffer",
            },
            "tracefs": {
                "available": uprobes.available,
                "how": (f"uprobes defined in {uprobes.detail}, armed with perf_event_open, "
                        "read from one ring per CPU") if uprobes.available else uprobes.detail,
            },
        },
        "semaphores": {
            "auto": mode,
            "why": why,
            "kernel": found["tracefs_ref_ctr"].available,
            "user": user.available,
            "user_needs": f"root and the proc connector ({user.detail})",
            "window": USER_MODE_WINDOW,
        },
        "arguments": {
            "fetched": machine in fetchargs.KERNEL_REGISTERS,
            "machines": sorted(fetchargs.KERNEL_REGISTERS),
        },
        "features": {name: feature.as_dict() for name, feature in found.items()},
    }


def text(info: dict) -> str:
    executor, semaphores, arguments = info["executor"], info["semaphores"], info["arguments"]
    lines = [
        f"kernel      {info['release']} ({info['machine']})",
        f"executor    auto picks {executor['auto']}: {executor['why']}",
        "            bpf: " + ("yes: " if executor["bpf"]["available"] else "no: ")
        + f"{executor['bpf']['how']} (needs {', '.join(executor['bpf']['needs'])}; "
        f"{', '.join(executor['bpf']['machines'])})",
        "            tracefs: " + ("yes: " if executor["tracefs"]["available"] else "no: ")
        + executor["tracefs"]["how"],
        f"semaphores  auto picks {semaphores['auto']}: {semaphores['why']}",
        f"            user mode needs {semaphores['user_needs']}: "
        + ("yes" if semaphores["user"] else "no"),
        f"            {semaphores['window']}",
        "arguments   " + (f"fetched on {info['machine']}" if arguments["fetched"] else
                         f"not fetched on {info['machine']} (only on "
                         f"{', '.join(arguments['machines'])}): arguments decode to null"),
        "features",
    ]
    width = max(map(len, info["features"]))
    for name, feature in info["features"].items():
        lines.append(f"  {name:<{width}}  {'yes' if feature['available'] else 'no ':<3}  "
                     f"since {feature['kernel']:<6}  {feature['detail']}")
    return "\n".join(lines) + "\n"
