"""The peak memory of a device run, counting what VmHWM misses: swapped-out pages and GPU buffers.

peak = max(VmHWM, max over samples of VmRSS + VmSwap) + GPU memory, where

* ``VmHWM`` is the kernel's high-water mark of resident pages (``/proc/PID/status``; the runner also
  reports its own). Pages that zram swapped out leave RSS and are not in it, so a sample of
  ``VmRSS + VmSwap`` can be larger: the larger figure is the CPU-side peak, and its source is named.
* GPU memory = max(DMA-BUF bytes, memtrack bytes):

  - DMA-BUF: buffers the process holds an fd to (``/proc/PID/fdinfo/FD`` with ``exp_name:``; ``size:``
    in bytes) or has mapped (``/proc/PID/maps`` lines whose path starts ``/dmabuf``), each buffer counted
    once by inode. This is what LiteRT-LM reads; it is exact for the buffers of this process but blind to
    GPU-private memory that is not exported as DMA-BUF.
  - memtrack: ``dumpsys meminfo PID``. ``EGL mtrack`` (memtrack GRAPHICS: DMA buffers mapped to the GPU)
    plus ``GL mtrack`` (memtrack GL: GPU-private), or the App Summary's ``Graphics:`` row, whichever is
    larger; ``Graphics:`` already is EGL + GL mtrack (+ gfx dev), so the two are never added. Some
    devices report 0 here (a memtrack HAL that does not know the GPU).

* PSS from ``/proc/PID/smaps_rollup`` (shared pages divided among their users) is recorded alongside,
  not counted: the budget is about what this process makes resident.

The parsers take the files' text as the kernel and ``dumpsys`` print it; the device-side sampler in
:mod:`edgedeploy.profile.session` prints the lines they need, prefixed by kind.
"""

from __future__ import annotations

import re
from typing import Any

KB = 1024


def parse_status(text: str) -> dict[str, int]:
    """``Vm*`` (and other ``kB``) fields of ``/proc/PID/status`` in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * KB
    return out


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """The sums of ``/proc/PID/smaps_rollup`` (Rss, Pss, Swap, SwapPss, ...) in bytes."""
    return parse_status(text)


def parse_fdinfo(text: str) -> dict[str, str]:
    """``key:<tab>value`` lines of one ``/proc/PID/fdinfo/FD`` file."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key and " " not in key:
            out[key] = value.strip()
    return out


def dmabuf_fds(fdinfos: dict[str, str]) -> dict[int, dict[str, Any]]:
    """DMA-BUFs among a process's fds: ``{inode: {"size", "exp_name", "fds"}}`` from fd -> fdinfo text.

    A DMA-BUF fd's fdinfo has ``size:``, ``count:`` and ``exp_name:`` after the generic ``pos/flags/
    mnt_id/ino`` lines; other fds have no ``exp_name:``. Several fds of one buffer share its inode.
    """
    bufs: dict[int, dict[str, Any]] = {}
    for fd, text in fdinfos.items():
        info = parse_fdinfo(text)
        if "exp_name" not in info or not info.get("size", "").isdigit():
            continue
        ino = int(info["ino"]) if info.get("ino", "").isdigit() else -len(bufs) - 1  # pre-5.13 kernels: no ino
        buf = bufs.setdefault(ino, {"size": int(info["size"]), "exp_name": info["exp_name"], "fds": []})
        buf["fds"].append(fd)
    return bufs


_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+)\s+\S+\s+[0-9a-f]+\s+\S+\s+(\d+)\s*(.*)$")


def dmabuf_maps(maps: str) -> dict[int, int]:
    """DMA-BUF mappings in ``/proc/PID/maps`` (path ``/dmabuf`` or ``/dmabuf:NAME``): inode -> mapped bytes."""
    out: dict[int, int] = {}
    for line in maps.splitlines():
        m = _MAPS_LINE.match(line.strip())
        if not m or not m.group(4).startswith("/dmabuf"):
            continue
        ino = int(m.group(3))
        out[ino] = out.get(ino, 0) + int(m.group(2), 16) - int(m.group(1), 16)
    return out


def dmabuf_bytes(fdinfos: dict[str, str], maps: str) -> int:
    """Bytes of the distinct DMA-BUFs a process holds by fd or maps: fd sizes, plus mapped-only buffers."""
    fds = dmabuf_fds(fdinfos)
    mapped = dmabuf_maps(maps)
    return sum(b["size"] for b in fds.values()) + sum(n for ino, n in mapped.items() if ino not in fds)


_DUMPSYS_ROW = re.compile(r"^\s*(EGL mtrack|GL mtrack|Graphics:)\s+(\d+)", re.M)


def memtrack_bytes(dumpsys: str) -> int:
    """GPU memory in ``dumpsys meminfo PID``: max(EGL mtrack + GL mtrack, App Summary Graphics), bytes.

    The first figure of each row is its PSS in KB.
    """
    rows: dict[str, int] = {}
    for name, kb in _DUMPSYS_ROW.findall(dumpsys):
        rows.setdefault(name, int(kb))
    return max(rows.get("EGL mtrack", 0) + rows.get("GL mtrack", 0), rows.get("Graphics:", 0)) * KB


def split_grep_h(text: str) -> dict[str, str]:
    """``grep -H`` output (``PATH:LINE``) back into per-file text: path -> its matching lines."""
    files: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            files.setdefault(path, []).append(rest)
    return {p: "\n".join(lines) + "\n" for p, lines in files.items()}


def account(samples: list[dict[str, Any]], runner_hwm: int = 0) -> dict[str, Any]:
    """The run's memory account from its samples (each: ``rss_bytes``, ``hwm_bytes``, optional
    ``swap_bytes``, ``dmabuf_bytes``, ``memtrack_bytes``, ``pss_bytes``) and the runner's own VmHWM.

    Returns the peak and every figure behind it, with the source of each part named.
    """
    hwm = max([runner_hwm, *(int(s.get("hwm_bytes") or 0) for s in samples)])
    rss_swap = max((int(s.get("rss_bytes") or 0) + int(s.get("swap_bytes") or 0) for s in samples), default=0)
    swap = max((int(s.get("swap_bytes") or 0) for s in samples), default=0)
    cpu, cpu_source = (rss_swap, "VmRSS+VmSwap") if rss_swap > hwm else (hwm, "VmHWM")
    dmabuf = max((int(s.get("dmabuf_bytes") or 0) for s in samples), default=0)
    memtrack = max((int(s.get("memtrack_bytes") or 0) for s in samples), default=0)
    if not dmabuf and not memtrack:
        gpu, gpu_source = 0, "none seen"
    elif dmabuf >= memtrack:
        gpu, gpu_source = dmabuf, "DMA-BUF (fdinfo + maps)"
    else:
        gpu, gpu_source = memtrack, "dumpsys meminfo (EGL+GL mtrack / Graphics)"
    pss = [int(s["pss_bytes"]) for s in samples if s.get("pss_bytes")]
    return {
        "peak_bytes": cpu + gpu, "cpu_bytes": cpu, "cpu_source": cpu_source, "vmhwm_bytes": hwm,
        "rss_swap_bytes": rss_swap, "swap_bytes": swap, "gpu_bytes": gpu, "gpu_source": gpu_source,
        "dmabuf_bytes": dmabuf, "memtrack_bytes": memtrack, "pss_bytes": max(pss) if pss else None,
    }


def describe(acc: dict[str, Any]) -> str:
    """One line naming each part of the peak and its source (for the reports)."""
    mib = 2**20
    text = f"{acc['cpu_bytes'] / mib:,.1f} MiB CPU ({acc['cpu_source']}"
    if acc.get("swap_bytes"):
        text += f"; VmSwap up to {acc['swap_bytes'] / mib:,.1f} MiB"
    text += f") + {acc['gpu_bytes'] / mib:,.1f} MiB GPU ({acc['gpu_source']}"
    if acc.get("dmabuf_bytes") or acc.get("memtrack_bytes"):
        text += f"; DMA-BUF {acc.get('dmabuf_bytes', 0) / mib:,.1f}, memtrack {acc.get('memtrack_bytes', 0) / mib:,.1f}"
    text += ")"
    if acc.get("pss_bytes"):
        text += f"; PSS {acc['pss_bytes'] / mib:,.1f} MiB"
    return text
