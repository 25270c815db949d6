"""The BPF uprobe_multi links that processes hold, read from /proc/PID/fdinfo.

A link's fdinfo lists its path, and for each site its cookie, offset and
ref_ctr_offset (present on the kernels whose uprobe_multi links sdtrace
uses; where it is absent, a link simply lists no sites).  sdtrace reads it
for one purpose: to name who holds a site with another semaphore offset
when the kernel refuses ours ("ref_ctr_offset mismatch", which the kernel
reports as a bare EINVAL).
"""
import os
import re
from typing import Iterator, NamedTuple, Optional

from .procfs import is_file

LINK = "anon_inode:bpf_link"
_SITE_LINE = re.compile(r"(\d+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)$")


class LinkedSite(NamedTuple):
    """One site of a uprobe_multi link held by process `pid`."""
    pid: int
    comm: str
    path: str
    offset: int
    ref_ctr_offset: int


def linked_sites() -> Iterator[LinkedSite]:
    """Every site of every uprobe_multi link that a process we may inspect holds."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            descriptors = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(f"/proc/{name}/fd/{descriptor}") != LINK:
                    continue
                with open(f"/proc/{name}/fdinfo/{descriptor}") as fdinfo:
                    text = fdinfo.read()
                with open(f"/proc/{name}/comm") as comm_file:
                    comm = comm_file.read().strip()
            except OSError:
                continue
            yield from _sites(int(name), comm, text)


def _sites(pid: int, comm: str, fdinfo: str) -> Iterator[LinkedSite]:
    fields = dict(line.split(":\t", 1) for line in fdinfo.splitlines() if ":\t" in line)
    if fields.get("link_type") != "uprobe_multi" or "path" not in fields:
        return
    for line in fdinfo.splitlines():
        match = _SITE_LINE.match(line.strip())
        if match:
            yield LinkedSite(pid, comm, fields["path"], int(match.group(2), 16),
                             int(match.group(3), 16))


def conflict(identity, offset: int, ref_ctr_offset: Optional[int]) -> Optional[str]:
    """Who holds the site at `offset` of the file of `identity` (procfs.file_identity)
    through a BPF link with another semaphore offset than `ref_ctr_offset` (None or 0:
    none), if anybody."""
    for site in linked_sites():
        if (site.offset == offset and site.ref_ctr_offset != (ref_ctr_offset or 0)
                and is_file(site.path, identity)):
            return (f"ref_ctr_offset mismatch: process {site.pid} ({site.comm}) holds the same "
                    f"site with {semaphore_text(site.ref_ctr_offset)} (a BPF link)")
    return None


def semaphore_text(ref_ctr_offset: Optional[int]) -> str:
    """A holder's semaphore, as a conflict names it."""
    return f"semaphore {ref_ctr_offset:#x}" if ref_ctr_offset else "no semaphore"
