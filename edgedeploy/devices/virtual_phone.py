"""Virtual reference phone: a device-side ADB daemon (what ``adbd`` is on a phone) on loopback.

Real ADB clients (Debian's ``adb`` via ``adb connect 127.0.0.1:PORT``, ``adb-shell``'s ``AdbDeviceTcp``,
``adbutils`` through an adb server) connect to it as if it were a phone, so CI can run the profiling flow
without hardware. It speaks the ADB transport (CNXN, optional AUTH, OPEN/OKAY/WRTE/CLSE) and serves
``shell:``, ``shell,v2,...:``, ``exec:`` and ``sync:``.

What it confines and what it does not:

* **Sync (push/pull/stat/list) and the phone's own files are confined to the sandbox folder.** Device ``/x/y``
  is ``sandbox/x/y``. Every path is walked one component at a time from a descriptor of the sandbox root
  (``O_NOFOLLOW | O_DIRECTORY`` on each directory, ``O_NOFOLLOW`` on the file), so a component swapped for a
  symlink between a check and a use is refused, never followed. Symlinks met on the way are resolved by the
  daemon: a relative target, or an absolute one under the sandbox's host path (what ``ln -s /data/local/tmp/a b``
  makes in the shell), continues inside the sandbox; any other target, ``..`` above ``/``, or more than 40
  links is refused. A push never writes through an existing name: the old file (or symlink) is unlinked and a
  new one created with ``O_EXCL``; a target with other hard links (one could be a host file) is refused, as is
  any non-regular file (FIFO, socket, device) for push and pull; pull opens with ``O_NONBLOCK`` and checks the
  open file, so nothing can block the daemon. The same walk writes the phone's setup files (``getprop``,
  ``build.prop``, ...) and the logcat file, so a reused sandbox with planted links cannot redirect them.
  Confinement holds at resolution time: a directory renamed out of the sandbox by a host process while a push
  is writing into it takes the file with it.
* **The shell is not confined: it is a test double, not a security boundary.** ``shell:``, ``shell,v2,...:`` and
  ``exec:`` run ``/bin/sh -c`` on the host as the user running the daemon, cwd ``sandbox/data/local/tmp``, and
  can read, write and run anything that user can (``cat ~/.ssh/...``, ``ln /host/file x``, ``rm -rf ~``). Anyone
  who can reach the port (127.0.0.1 only; ADB auth with ``auth_keys`` limits it to key holders) has that user's
  rights. Before running, every occurrence of the device prefixes ``/data/local/tmp`` and ``/sdcard`` that starts
  a path is rewritten to the sandbox folder; paths built at run time (``cd /data; cd local``) are not. A sandbox
  path with characters that mean something to the shell (a space, quotes, ``$``) is reached through a private
  alias (a symlink in a fresh temporary folder, removed when the daemon stops), so the rewrite is a plain splice.

Device model and its limits:

* ``getprop`` and ``logcat`` are small scripts in ``sandbox/system/bin`` (prepended to ``PATH``).
  With a memory budget, ``/proc/meminfo`` in a shell command (``cat /proc/meminfo``, ``grep ... /proc/meminfo``)
  is rewritten, like the device prefixes, to the phone's own ``sandbox/proc/meminfo``: ``MemTotal`` is the
  phone's RAM (prop ``ro.edgedeploy.memtotal_kb``, default the budget), ``MemAvailable`` (and ``MemFree``) the
  budget less the RSS of the commands running now (refreshed when a command starts and at every budget poll),
  ``SwapTotal``/``SwapFree`` 0 (no zram). A program that opens ``/proc/meminfo`` itself still reads the host's.
  Without a budget the host's file is shown.
* Thermal zones, CPU clocks and a battery fuel gauge (:mod:`edgedeploy.devices.virtual_sensors`) follow the CPU
  time of the processes the phone's commands started; ``/sys/class/thermal``, ``/sys/class/power_supply`` and
  ``/sys/devices/system/cpu`` in shell commands are rewritten into the sandbox like the device prefixes, and
  ``dumpsys`` (``battery [unplug|reset]``, ``thermalservice``) is a script in ``/system/bin`` (``sensors`` option).
* Memory budget (a stand-in for Android's lmkd): the RSS of each shell process tree is polled every 20 ms;
  over budget its largest process gets SIGKILL (exit code 137; the parent shell survives, as with lmkd,
  which picks one victim) and an lmkd-style line with the victim's RSS goes to the logcat
  file (``logcat -d`` prints it, ``logcat -c`` clears it).
* No pty: ``shell,pty`` runs like ``raw``; an empty command starts a plain ``/bin/sh`` reading stdin.
* Process lifetime: each command gets its own process group. When the client closes the stream early, stdin
  gets EOF and the whole tree is SIGKILLed after ``CLOSE_GRACE_S`` (at once if the connection drops). Jobs a
  finished command left detached keep running, as on a phone (unwatched by the memory budget), until the
  daemon stops, which kills every process group it started.
* Output is not rewritten back: commands that print paths show host sandbox paths (or the alias).
* Transport bounds, so one client cannot stall or bloat the daemon for the others: OKAY is withheld while a
  stream holds 4 MiB of unread input or its connection 64 MiB, and a peer that sends a WRTE while its OKAY is
  withheld (ignoring ADB flow control) is disconnected; at most ``MAX_STREAMS`` (64) streams per connection
  (more OPENs are refused with CLSE); a packet whose first byte arrived must be complete within
  ``packet_timeout_s`` (default 30 s), else the connection is dropped (idling between packets is fine, as with
  adbd). Sync file I/O runs in worker threads, and, as on adbd, a sync stream ends after a FAIL.
* Props: ``ro.product.cpu.abi`` (and ``ro.product.cpu.abilist``) default to ``abi``, else the host's ABI in
  Android names (x86_64 -> ``x86_64``, aarch64 -> ``arm64-v8a``); ``ro.edgedeploy.python`` is the daemon's
  ``sys.executable`` (a host python that can run ``-m edgedeploy.runtime.runner``); ``ro.edgedeploy.virtual``
  is ``1``. ``props`` override all of them. With ``abi`` ``arm64-v8a`` on an x86_64 host the phone also
  sets ``ro.edgedeploy.exec_wrapper`` to ``qemu-aarch64 -L /usr/aarch64-linux-gnu``: there is no
  binfmt_misc in a container, so a client runs a pushed aarch64 program by putting that wrapper in front
  (the profiler does); shell commands themselves still run natively on the host.

Faults and limits (for testing what a client does when a phone misbehaves):

* ``disk_bytes``: storage quota for sync pushes. Usage is the size of regular files under the sandbox except
  ``/system`` (the phone's /data, /sdcard included), measured when a SEND starts, plus every SEND byte
  received since. A SEND that would pass the quota is read to DONE, answered with FAIL
  ``No space left on device`` (Debian adb: ``adb: error: failed to copy '...' to '...': remote No space left
  on device``; adb-shell raises ``PushFailedError``), and its file is removed. Shell commands are not limited
  (``cat > f`` can fill the host disk), but what they wrote counts against later pushes.
* ``drop_after_bytes``: the first time the SEND data received over the daemon's lifetime (all connections)
  passes N, the connection carrying it is cut at once (no CLSE, no FAIL): adb-shell raises
  ``BrokenPipeError``/``ConnectionResetError``; Debian adb prints ``adb: error: failed to copy '...' to '...':
  couldn't read from device`` and lists the device ``offline`` until ``adb disconnect`` + ``adb connect``.
  It happens once per daemon, so a reconnect and retry succeeds. The target file is left behind,
  truncated to the bytes that arrived before the cut (exactly N for the first push to a fresh daemon), with
  the push's mode but not its mtime; other streams of that connection (running shells) are torn down as on
  any lost connection.

Run standalone: ``python -m edgedeploy.devices.virtual_phone --port P --sandbox DIR [--budget-mb N]
[--prop k=v ...] [--auth-keys FILE] [--allow-any-key] [--disk-mb N] [--drop-after-bytes N] [--abi ABI]
[--packet-timeout S]`` (``--port 0`` picks a free port; the ``virtual phone listening on 127.0.0.1:PORT`` line
gives it). Bad options (port out of range, negative budgets, an unreadable or malformed ``--auth-keys`` file, a
sandbox that is not a folder) raise :class:`~edgedeploy.errors.InputError`; ``main`` prints it as one line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import errno
import functools
import os
import platform
import re
import shlex
import shutil
import signal
import socket as socket_module
import stat
import struct
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psutil
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from edgedeploy.devices.virtual_sensors import PERIOD_S, SENSOR_PREFIXES, SensorOptions, Sensors, dumpsys_script
from edgedeploy.errors import EdgeDeployError, InputError

__all__ = ["VirtualPhone", "serve", "run_virtual_phone", "parse_adb_public_key", "load_auth_keys", "main"]


def _wire(name: bytes) -> int:
    return struct.unpack("<I", name)[0]


A_CNXN, A_AUTH, A_OPEN, A_OKAY, A_CLSE, A_WRTE = map(_wire, (b"CNXN", b"AUTH", b"OPEN", b"OKAY", b"CLSE", b"WRTE"))
AUTH_TOKEN, AUTH_SIGNATURE, AUTH_RSAPUBLICKEY = 1, 2, 3
A_VERSION = 0x01000000  # adb-shell only speaks this one; Debian adb accepts it and keeps checksums on
MAX_PAYLOAD = 1 << 20
_HEADER = struct.Struct("<6I")
_SYNC = struct.Struct("<4sI")
_STAT_V1 = struct.Struct("<4sIII")
_STAT_V2 = struct.Struct("<4sIQQIIIIQqqq")
_DENT_V1 = struct.Struct("<4sIIII")
_DENT_V2 = struct.Struct("<4sIQQIIIIQqqqI")
SYNC_DATA_MAX = 64 * 1024
CLOSE_GRACE_S = 3.0
_INBUF_LIMIT = 4 * MAX_PAYLOAD  # withhold OKAY past this so a fast sender cannot fill memory
# A compliant peer sends nothing while an OKAY is withheld, so the buffer never passes the limit by more than
# one packet; more than that means the peer ignores flow control, and its connection is dropped.
_INBUF_CAP = _INBUF_LIMIT + MAX_PAYLOAD
# All streams of a connection together: withhold OKAYs past this. High enough that only 16 streams that all
# stopped reading reach it (then the others wait too), low enough to bound a connection's input buffers to
# _CONN_INBUF_LIMIT + MAX_STREAMS packets.
_CONN_INBUF_LIMIT = 64 * MAX_PAYLOAD
MAX_STREAMS = 64  # open streams per connection (each may also hold a shell process)
PACKET_TIMEOUT_S = 30.0  # a started packet must be complete within this (a stalled half-packet pins a buffer)
_IO_CHUNK = 1 << 20  # file bytes per worker-thread call: amortises the thread hop, bounds what one call holds
_MAX_SYMLINKS = 40  # Linux's limit too: a loop of in-sandbox links ends with ELOOP
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
SHELL_STDIN, SHELL_STDOUT, SHELL_STDERR, SHELL_EXIT, SHELL_CLOSE_STDIN, SHELL_WINDOW = range(6)
FEATURES = "shell_v2,cmd,stat_v2,ls_v2,fixed_push_mkdir"
DEVICE_PREFIXES = ("/data/local/tmp", "/sdcard")
DEFAULT_PROPS = {
    "ro.product.name": "edgedeploy_ref",
    "ro.product.model": "EdgeDeploy Virtual Phone",
    "ro.product.device": "edgedeploy_virtual",
    "ro.product.manufacturer": "edgedeploy",
    "ro.build.version.release": "14",
    "ro.build.version.sdk": "34",
    "ro.edgedeploy.virtual": "1",
}
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"
#: The harness app of android_template/app, emulated with app_runner_dir.
HARNESS_PACKAGE = "ai.edgedeploy.harness"
_AM_SCRIPT = r"""#!/bin/sh
# am of the edgedeploy virtual phone: `am start -n @PKG@/.RunnerActivity` with the harness's extras runs
# the emulated app (the native runner) in the foreground, one run after another, as RunnerActivity does.
[ "$1" = start ] || { echo "am: only 'start' is emulated" >&2; exit 1; }
shift
comp=; bundle=; prompt=; runs=1; maxnew=; threads=; touch=
while [ $# -gt 0 ]; do
  case "$1" in
    -n) comp=$2; shift 2 ;;
    --es) case "$2" in bundle) bundle=$3 ;; prompt_file) prompt=$3 ;; esac; shift 3 ;;
    --ei) case "$2" in runs) runs=$3 ;; max_new_tokens) maxnew=$3 ;; threads) threads=$3 ;; esac; shift 3 ;;
    --ez) if [ "$2" = touch_kv ] && [ "$3" = true ]; then touch=1; fi; shift 3 ;;
    *) shift ;;
  esac
done
[ "$comp" = "@PKG@/.RunnerActivity" ] || { echo "Error: Activity class {$comp} does not exist." >&2; exit 1; }
rm -f @FILES@/done @FILES@/results.jsonl
set -- "$bundle" --prompt-file "$prompt"
[ -n "$maxnew" ] && set -- "$@" --max-new-tokens "$maxnew"
[ -n "$threads" ] && set -- "$@" --threads "$threads"
[ -n "$touch" ] && set -- "$@" --touch-kv
echo "Starting: Intent { cmp=$comp }"
i=0
while [ "$i" -lt "$runs" ]; do
  @RUNNER@ "$@" >> @FILES@/results.jsonl
  rc=$?
  # The runner reports its own errors (exit 2, 3) in its JSON line; anything else killed the app.
  [ "$rc" -eq 0 ] || [ "$rc" -eq 2 ] || [ "$rc" -eq 3 ] || exit 0
  i=$((i + 1))
done
echo "ok $runs" > @FILES@/done
echo "Status: ok"
"""
# platform.machine() names to Android ABI names (what ro.product.cpu.abi holds on a phone).
HOST_ABIS = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "arm64-v8a",
    "arm64": "arm64-v8a",
    "armv7l": "armeabi-v7a",
    "armv8l": "armeabi-v7a",
    "i686": "x86",
    "i386": "x86",
}
ENOSPC_MESSAGE = "No space left on device"
# Host paths made only of these can be spliced into a shell command, quoted or not, without changing its meaning.
def _sha256sum_script() -> str:
    """``sha256sum`` as fast as a phone's: Android's toybox hashes with BoringSSL, which uses the CPU's SHA-2
    instructions, and Debian's coreutils does not (~300 MB/s against ~1.5 GB/s here). ``openssl`` does, so it
    stands in when the host has it; otherwise the host's own ``sha256sum`` runs. Output as coreutils'."""
    real = shutil.which("sha256sum") or "/usr/bin/sha256sum"
    openssl = shutil.which("openssl")
    if openssl is None:
        return f'#!/bin/sh\nexec {shlex.quote(real)} "$@"\n'
    ossl = shlex.quote(openssl)
    return f"""#!/bin/sh
# sha256sum of the edgedeploy virtual phone (see _sha256sum_script): openssl's hardware SHA-256.
if [ $# -eq 0 ]; then out=$({ossl} dgst -sha256 -r) || exit 1; printf '%s  -\\n' "${{out%% *}}"; exit 0; fi
status=0
for f in "$@"; do
  if [ -f "$f" ] && out=$({ossl} dgst -sha256 -r "$f" 2>/dev/null); then
    printf '%s  %s\\n' "${{out%% *}}" "$f"
  else
    {shlex.quote(real)} "$f" || status=1
  fi
done
exit $status
"""


_SHELL_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+-]+")
_LOCAL_HOSTS = ("127.0.0.1", "localhost")
LOG_TAG = "lowmemorykiller"
LOGCAT_DEVICE_PATH = "/data/misc/logd/logcat.txt"
_T = TypeVar("_T")


class ProtocolError(Exception):
    """The peer broke the ADB wire protocol; the connection is dropped."""


def _checksum(data: bytes | bytearray) -> int:
    # adb-shell verifies this byte sum on every packet; numpy keeps it off the throughput path.
    if not data:
        return 0
    return int(np.frombuffer(data, dtype=np.uint8).sum(dtype=np.uint64)) & 0xFFFFFFFF


def parse_adb_public_key(key: str | bytes) -> rsa.RSAPublicKey:
    """Decode an adb public key (``adbkey.pub`` line: base64 of Android's RSA struct, then ``user@host``).

    Raises ``ValueError`` (with the reason) for anything else: a client offers keys over the wire, so a
    malformed one must be a clean refusal, never a stray ``struct.error``.
    """
    text = key.decode("ascii", "replace") if isinstance(key, bytes | bytearray) else key
    fields = text.strip().strip("\0").split()
    if not fields:
        raise ValueError("empty key")
    try:
        raw = base64.b64decode(fields[0], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    # Android's RSAPublicKey: u32 words, u32 n0inv, u32 n[words], u32 rr[words], u32 exponent (little-endian).
    words = struct.unpack_from("<I", raw, 0)[0] if len(raw) >= 4 else 0
    if not 16 <= words <= 512 or len(raw) != 12 + 8 * words:
        raise ValueError(f"not an adb RSA public key ({len(raw)} bytes)")
    modulus = int.from_bytes(raw[8 : 8 + 4 * words], "little")
    (exponent,) = struct.unpack_from("<I", raw, 8 + 8 * words)
    try:
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError as e:
        raise ValueError(f"invalid RSA key ({e})") from None


def load_auth_keys(path: str | os.PathLike[str]) -> list[rsa.RSAPublicKey]:
    """Read an ``adb_keys``-style file: one adb public key per line, blank lines and ``#`` comments skipped.

    Raises :class:`InputError` naming the file (and line) when it cannot be read, holds a malformed line, or
    holds no key at all (AUTH with no key would lock every client out).
    """
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read the adb keys file ({e.strerror})") from None
    keys = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith(b"#"):
            continue
        try:
            keys.append(parse_adb_public_key(text))
        except ValueError as e:
            raise InputError(f"{path}: line {number} is not an adb public key: {e}") from None
    if not keys:
        raise InputError(f"{path}: no adb public key in it (expected lines like those of ~/.android/adbkey.pub)")
    return keys


def _signal_exit_code(returncode: int) -> int:
    # A shell reports death by signal N as 128+N; asyncio reports -N.
    return 128 - returncode if returncode < 0 else returncode & 0xFF


# -- confined file access -----------------------------------------------------------------------------------
def _device_parts(path: str) -> list[str]:
    """Components of a device path (``..`` kept for the walk to resolve; empty and ``.`` dropped)."""
    if "\0" in path:
        raise OSError(errno.EINVAL, "path contains a NUL byte")
    return [part for part in path.split("/") if part not in ("", ".")]


def _refused(reason: str, path: str) -> PermissionError:
    return PermissionError(errno.EACCES, reason, path)


def _readlink_at(dir_fd: int, name: str) -> str | None:
    """The target of symlink ``name`` in ``dir_fd``, or None when it is not (or no longer) a symlink."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _require_regular(st: os.stat_result, path: str, writing: bool) -> None:
    """Refuse what sync must never open: directories, FIFOs, sockets, devices; for writes, hard-linked files."""
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
    if not stat.S_ISREG(st.st_mode):
        raise _refused("not a regular file (FIFOs, sockets and devices are refused)", path)
    if writing and st.st_nlink > 1:
        # Another name of this inode may be outside the sandbox (ln /host/file /data/local/tmp/x).
        raise _refused(f"refusing to write a file with {st.st_nlink} hard links", path)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class SandboxFS:
    """Race-free file access under a sandbox folder, for the daemon's own use (sync and the phone's files).

    Each path is walked from a descriptor of the root, one component at a time: directories are opened with
    ``O_NOFOLLOW | O_DIRECTORY`` relative to the previous one, so whatever is opened was a real directory inside
    the sandbox at that instant, and a later swap of a component for a symlink cannot redirect the walk. Symlinks
    met on the way are resolved here instead of by the kernel (see the module docstring for which are followed).
    All methods block (they are meant for worker threads) and raise ``OSError`` (``PermissionError`` when a path
    would leave the sandbox).
    """

    def __init__(self, root: Path, aliases: tuple[str, ...] = ()) -> None:
        self.root = root
        # Host prefixes that name the root in absolute symlink targets: links made by the shell carry them.
        self._prefixes = tuple(dict.fromkeys((str(root), *aliases)))

    def locate(self, device_path: str, *, follow: bool = True, make_dirs: bool = False) -> tuple[int, str]:
        """Open the directory holding the path's last component; returns ``(dir_fd, name)``, the caller closes it.

        ``name`` is ``"."`` when the path names a directory (``/``, ``a/..``, or with ``follow`` any directory).
        With ``follow`` a final symlink is resolved first; without it the final name is returned as it is.
        ``make_dirs`` creates missing directories before the last component (adb's ``fixed_push_mkdir``).
        """
        pending = _device_parts(device_path)
        stack = [os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
        links = 0
        try:
            while pending:
                part = pending.pop(0)
                if part == "..":
                    if len(stack) == 1:
                        raise _refused("path escapes the sandbox", device_path)
                    os.close(stack.pop())
                    continue
                last = not pending
                if last and not follow:
                    return stack.pop(), part
                try:
                    stack.append(os.open(part, _O_DIR, dir_fd=stack[-1]))
                    continue
                except OSError as e:
                    error = e
                target = _readlink_at(stack[-1], part)
                if target is not None:
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, "Too many levels of symbolic links", device_path)
                    pending[:0] = self._link_parts(target, device_path, stack)
                    continue
                if last:  # a file, or nothing yet: the caller opens or creates it relative to its folder
                    return stack.pop(), part
                if error.errno == errno.ENOENT and make_dirs:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=stack[-1])
                    stack.append(os.open(part, _O_DIR, dir_fd=stack[-1]))  # O_NOFOLLOW: a swap-in fails here
                    continue
                raise error
            return stack.pop(), "."
        finally:
            _close_all(stack)

    def _link_parts(self, target: str, device_path: str, stack: list[int]) -> list[str]:
        """Components to walk instead of a symlink; an absolute in-sandbox target restarts from the root."""
        if not target.startswith("/"):
            return _device_parts(target)
        for prefix in self._prefixes:
            if target == prefix or target.startswith(prefix + "/"):
                _close_all(stack[1:])
                del stack[1:]
                return _device_parts(target[len(prefix) :])
        raise _refused(f"symlink to {target} leaves the sandbox", device_path)

    def stat(self, device_path: str, follow: bool = True) -> os.stat_result:
        dir_fd, name = self.locate(device_path, follow=follow)
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(dir_fd)

    def open_dir(self, device_path: str, make: bool = False) -> int:
        """A descriptor of the directory at ``device_path`` (created, with its parents, when ``make``)."""
        dir_fd, name = self.locate(device_path, follow=True, make_dirs=make)
        if name == ".":
            return dir_fd
        try:
            if make:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, dir_fd=dir_fd)
            return os.open(name, _O_DIR, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def open_read(self, device_path: str) -> int:
        """A read descriptor of the regular file at ``device_path``; anything else is refused unopened."""
        dir_fd, name = self.locate(device_path, follow=True)
        try:
            # lstat first: opening a FIFO or a device can block or have side effects, so never open one.
            _require_regular(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), device_path, writing=False)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            _require_regular(os.fstat(fd), device_path, writing=False)  # the name may have been swapped since
        except OSError:
            os.close(fd)
            raise
        return fd

    def create(self, device_path: str, mode: int, replace_any: bool = False) -> PushTarget:
        """A new, empty regular file at ``device_path`` (parents created), replacing what was there.

        Like adbd, an existing file or symlink is unlinked and a new inode created with ``O_EXCL``, so nothing put
        at the name in between (link, FIFO) is ever written through: the create then fails with EEXIST. A
        non-regular or hard-linked file in the way is refused, unless ``replace_any`` (the phone's own files,
        which it regenerates: unlinking a name never touches the data behind another link).
        """
        dir_fd, name = self.locate(device_path, follow=False, make_dirs=True)
        try:
            if name == ".":
                raise IsADirectoryError(errno.EISDIR, "Is a directory", device_path)
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise IsADirectoryError(errno.EISDIR, "Is a directory", device_path)
                if not stat.S_ISLNK(st.st_mode) and not replace_any:
                    _require_regular(st, device_path, writing=True)  # FIFO, socket, device, hard-linked: refused
                os.unlink(name, dir_fd=dir_fd)  # a symlink is replaced, as on adbd, never written through
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, mode, dir_fd=dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        return PushTarget(fd, dir_fd, name)

    def write_file(self, device_path: str, data: bytes, mode: int = 0o644) -> None:
        """Create or replace a file with ``data`` (the phone's setup files)."""
        target = self.create(device_path, mode, replace_any=True)
        try:
            _write_all(target.fd, data)
            os.fchmod(target.fd, mode)  # exact mode, whatever the umask (scripts must be executable)
        finally:
            target.close()

    def append(self, device_path: str, data: bytes) -> None:
        """Append to a regular, singly linked file (created if missing): the logcat file."""
        dir_fd, name = self.locate(device_path, follow=True, make_dirs=True)
        try:
            if name == ".":
                raise IsADirectoryError(errno.EISDIR, "Is a directory", device_path)
            flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                _require_regular(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), device_path, writing=True)
                fd = os.open(name, flags, dir_fd=dir_fd)
            except FileNotFoundError:
                fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            _require_regular(os.fstat(fd), device_path, writing=True)
            _write_all(fd, data)
        finally:
            os.close(fd)


@dataclass
class PushTarget:
    """A file being pushed: its descriptor, and its folder's descriptor and name (to finish or remove it)."""

    fd: int
    dir_fd: int
    name: str

    def finish(self, mtime: int) -> None:
        os.utime(self.fd, (mtime, mtime))

    def discard(self) -> None:
        """Remove the file, if its name still points at the inode this push wrote."""
        with contextlib.suppress(OSError):
            mine = os.fstat(self.fd)
            there = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.name, dir_fd=self.dir_fd)

    def close(self) -> None:
        _close_all([self.fd, self.dir_fd])


# -- blocking work off the event loop -------------------------------------------------------------------------
async def _in_thread(func: Callable[[], _T], release: Callable[[_T], object] | None = None) -> _T:
    """Run ``func`` in a worker thread; if the caller is cancelled meanwhile, ``release`` frees its result.

    The worker cannot be interrupted, so a cancelled caller would otherwise leak the descriptor it opens.
    """
    future = asyncio.ensure_future(asyncio.to_thread(func))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        def settle(done: asyncio.Future[_T]) -> None:
            if not done.cancelled() and done.exception() is None and release is not None:
                release(done.result())

        future.add_done_callback(settle)
        raise


class _WorkerResource:
    """A host resource (descriptor, directory iterator) used by one stream through worker-thread calls.

    ``close`` never frees it under a running call: a stream cancelled mid-call leaves the call running, and a
    descriptor number closed then could be reused by an unrelated open and receive that call's bytes.
    """

    def __init__(self, release: Callable[[], object]) -> None:
        self._release = release
        self._running: asyncio.Future[Any] | None = None
        self._closed = False

    async def run(self, func: Callable[[], _T]) -> _T:
        if self._closed:
            raise OSError(errno.EBADF, "resource closed")
        self._running = asyncio.ensure_future(asyncio.to_thread(func))
        return await asyncio.shield(self._running)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        running = self._running
        if running is not None and not running.done():
            running.add_done_callback(self._release_after)
        else:
            self._release()

    def _release_after(self, done: asyncio.Future[Any]) -> None:
        if not done.cancelled():
            done.exception()  # retrieved: a failure of an abandoned call is nobody's news
        self._release()


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e)


class _Stream:
    """One ADB stream: buffered input with withheld OKAYs, output with one WRTE in flight until OKAY."""

    def __init__(self, conn: _Connection, local_id: int, remote_id: int) -> None:
        self.conn, self.local_id, self.remote_id = conn, local_id, remote_id
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.eof = False
        self._in_event = asyncio.Event()
        self._can_send = asyncio.Event()
        self._can_send.set()
        self._ack_owed = False
        self._write_lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None

    # -- input -------------------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Buffer a WRTE's payload; OKAY it at once unless buffers are full (then OKAY once they drain).

        A WRTE while this stream's OKAY is withheld breaks ADB flow control (one WRTE in flight per stream),
        and is what a flooding peer does: ``ProtocolError`` drops the connection. So a stream never buffers more
        than ``_INBUF_CAP`` bytes, and a connection never more than ``_CONN_INBUF_LIMIT`` plus one packet per
        stream, whatever the peer sends.
        """
        if self._ack_owed or len(self.inbuf) + len(data) > _INBUF_CAP:
            raise ProtocolError(f"stream {self.local_id}: WRTE before OKAY (peer ignores flow control)")
        self.inbuf += data
        self.conn.buffered += len(data)
        self._in_event.set()
        self._ack_owed = True
        self.maybe_ack()

    def maybe_ack(self) -> None:
        """Send the owed OKAY once this stream's and the connection's buffers are under their limits."""
        if self._ack_owed and not self.eof and len(self.inbuf) < _INBUF_LIMIT \
                and self.conn.buffered < _CONN_INBUF_LIMIT:
            self._ack_owed = False
            self.conn.owed.discard(self)
            self.conn.send(A_OKAY, self.local_id, self.remote_id)
        elif self._ack_owed and not self.eof:
            self.conn.owed.add(self)

    def _take(self, n: int) -> bytes:
        data = bytes(self.inbuf[:n])
        del self.inbuf[:n]
        self.conn.input_consumed(len(data))
        return data

    def drop_input(self) -> None:
        """Forget unread input (the service ended), so it no longer counts against the connection."""
        self.conn.input_consumed(len(self.inbuf))
        self.inbuf.clear()
        self.conn.owed.discard(self)

    async def _wait_input(self, n: int) -> None:
        while len(self.inbuf) < n:
            if self.eof:
                raise EOFError
            self._in_event.clear()
            await self._in_event.wait()

    async def readexactly(self, n: int) -> bytes:
        """Next ``n`` bytes from the peer; ``EOFError`` if the stream closes first."""
        await self._wait_input(n)
        return self._take(n)

    async def read_some(self, limit: int) -> bytes:
        """What the peer has sent so far, 1 to ``limit`` bytes; ``EOFError`` once closed."""
        await self._wait_input(1)
        return self._take(min(limit, len(self.inbuf)))

    # -- output ------------------------------------------------------------------------------------------
    def queue(self, data: bytes | bytearray) -> None:
        self.outbuf += data

    async def flush(self, final: bool = True) -> None:
        """Send queued output in maxdata WRTEs; with ``final=False`` keep a partial tail for packing."""
        async with self._write_lock:
            maxdata = self.conn.maxdata
            while len(self.outbuf) >= maxdata or (final and self.outbuf):
                await self._can_send.wait()
                if self.eof:
                    raise ConnectionResetError("stream closed by peer")
                chunk = bytes(self.outbuf[:maxdata])
                del self.outbuf[:maxdata]
                self._can_send.clear()
                self.conn.send(A_WRTE, self.local_id, self.remote_id, chunk)
                await self.conn.drain()

    async def write(self, data: bytes | bytearray) -> None:
        self.queue(data)
        await self.flush()

    def acked(self) -> None:
        self._can_send.set()

    def peer_closed(self) -> None:
        self.eof = True
        self._in_event.set()
        self._can_send.set()


class _Connection:
    """One client transport: handshake, auth, stream multiplexing."""

    def __init__(self, phone: VirtualPhone, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.phone, self.reader, self.writer = phone, reader, writer
        self.maxdata = 4096
        self.online = False
        self.streams: dict[int, _Stream] = {}
        self._next_id = 1
        self._token = b""
        self._sent_auth = False
        self.dropped = False
        self.buffered = 0  # unread WRTE bytes over all streams
        self.owed: set[_Stream] = set()  # streams whose OKAY waits for buffers to drain
        sock = writer.get_extra_info("socket")
        self._quickack = getattr(sock, "setsockopt", None) if hasattr(socket_module, "TCP_QUICKACK") else None

    def send(self, cmd: int, arg0: int, arg1: int, data: bytes | bytearray = b"") -> None:
        if self.dropped:
            return  # a dropped link carries nothing, not even the CLSE of streams torn down with it
        self.writer.write(_HEADER.pack(cmd, arg0, arg1, len(data), _checksum(data), cmd ^ 0xFFFFFFFF))
        if data:
            self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def input_consumed(self, n: int) -> None:
        """A service read ``n`` buffered bytes: OKAYs withheld for want of room may go out now."""
        self.buffered -= n
        for stream in list(self.owed):
            stream.maybe_ack()

    async def run(self) -> None:
        try:
            while True:
                cmd, arg0, arg1, data = await self._read_packet()
                self._dispatch(cmd, arg0, arg1, data)
                await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError, TimeoutError):
            pass
        finally:
            await self.close()

    async def _read_packet(self) -> tuple[int, int, int, bytes]:
        """The next packet. Idling between packets is fine (adb keeps connections open for ever), but once a
        packet has started it must be complete within ``packet_timeout_s`` or the connection goes (TimeoutError):
        a peer that stalls mid-packet would otherwise pin its half-read buffer and its streams indefinitely."""
        first = await self.reader.readexactly(1)
        async with asyncio.timeout(self.phone.packet_timeout_s):
            header = first + await self.reader.readexactly(_HEADER.size - 1)
            self._ack_now()
            cmd, arg0, arg1, length, _check, magic = _HEADER.unpack(header)
            if magic != cmd ^ 0xFFFFFFFF or length > MAX_PAYLOAD:
                raise ProtocolError(f"bad packet header {header!r}")
            data = await self.reader.readexactly(length) if length else b""
        return cmd, arg0, arg1, data

    def _ack_now(self) -> None:
        """Send the pending TCP ACK now. Clients that write a header and its payload in two sends without
        TCP_NODELAY (adb-shell) hold the payload until the header is ACKed, and Linux delays that ACK by up to
        40 ms: without this, every small push, pull or stat took ~130 ms."""
        if self._quickack is not None:
            with contextlib.suppress(OSError):
                self._quickack(socket_module.IPPROTO_TCP, socket_module.TCP_QUICKACK, 1)

    def drop(self) -> None:
        """Cut the TCP connection at once, without CLSE: what a pulled cable looks like to the client."""
        self.dropped = True
        # A close with unread input sends RST, one without sends FIN, which adb-shell only notices as a read
        # timeout: linger 0 makes the cut a reset whatever the client had in flight.
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        tasks = [s.task for s in self.streams.values() if s.task]
        for s in list(self.streams.values()):
            s.peer_closed()
        self.streams.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    # -- packets -----------------------------------------------------------------------------------------
    def _dispatch(self, cmd: int, arg0: int, arg1: int, data: bytes) -> None:
        if cmd == A_CNXN:
            self._on_connect(arg0, arg1)
        elif cmd == A_AUTH:
            self._on_auth(arg0, data)
        elif not self.online:
            raise ProtocolError("packet before the connection was authorised")
        elif cmd == A_OPEN:
            self._on_open(arg0, data)
        elif cmd == A_OKAY:
            if (s := self.streams.get(arg1)) is not None:
                s.remote_id = arg0
                s.acked()
        elif cmd == A_WRTE:
            if (s := self.streams.get(arg1)) is not None:
                s.feed(data)
            else:  # late data for a stream we closed: the client still needs its OKAY-less CLSE answer
                self.send(A_CLSE, 0, arg0)
        elif cmd == A_CLSE:
            if (s := self.streams.pop(arg1, None)) is not None:
                s.peer_closed()
                self.send(A_CLSE, s.local_id, s.remote_id)
                if s.task:  # let a command finish reading its stdin (exec-in) before its tree is killed
                    asyncio.get_running_loop().call_later(CLOSE_GRACE_S, s.task.cancel)

    def _on_connect(self, version: int, maxdata: int) -> None:
        self.maxdata = max(4096, min(maxdata, MAX_PAYLOAD))
        if self.phone.auth_keys is None:
            self._go_online()
        else:
            self._send_token()

    def _send_token(self) -> None:
        self._token = os.urandom(20)
        self.send(A_AUTH, AUTH_TOKEN, 0, self._token)

    def _on_auth(self, kind: int, data: bytes) -> None:
        keys = self.phone.auth_keys
        if keys is None or self.online or not self._token:
            return
        if kind == AUTH_SIGNATURE:
            if any(_verify(key, data, self._token) for key in keys):
                self._go_online()
            else:
                self._send_token()  # the client tries its next key, then offers a public key
        elif kind == AUTH_RSAPUBLICKEY:
            try:
                offered = parse_adb_public_key(data)
            except (ValueError, struct.error):
                return
            known = any(k.public_numbers() == offered.public_numbers() for k in keys)
            if known or self.phone.allow_any_key:
                if not known:
                    keys.append(offered)  # like ticking "always allow" on the phone
                self._go_online()
            # otherwise stay silent: the client reports the device as unauthorized, as with a real phone

    def _go_online(self) -> None:
        self.online = True
        self.send(A_CNXN, A_VERSION, self.maxdata, self.phone.banner().encode())

    def _on_open(self, remote_id: int, data: bytes) -> None:
        service = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        handler = self.phone.service_for(service)
        if handler is None or len(self.streams) >= MAX_STREAMS:
            self.send(A_CLSE, 0, remote_id)  # refused, as adbd refuses a service it cannot start
            return
        stream = _Stream(self, self._next_id, remote_id)
        self._next_id += 1
        self.streams[stream.local_id] = stream
        self.send(A_OKAY, stream.local_id, remote_id)
        stream.task = asyncio.create_task(self._run_service(stream, handler))

    async def _run_service(self, stream: _Stream, handler: Any) -> None:
        try:
            await handler(stream)
            await stream.flush()
        except (ConnectionError, EOFError):
            pass
        except OSError as e:  # e.g. the shell could not be started: report it like adbd, on the stream
            with contextlib.suppress(ConnectionError):
                await stream.write(f"error: {e}\n".encode())
        finally:
            stream.drop_input()
            if self.streams.pop(stream.local_id, None) is not None:
                self.send(A_CLSE, stream.local_id, stream.remote_id)


def _verify(key: rsa.RSAPublicKey, signature: bytes, token: bytes) -> bool:
    # adb signs the 20-byte token as if it were a SHA-1 digest (PKCS#1 v1.5 with the SHA-1 DigestInfo).
    try:
        key.verify(signature, token, padding.PKCS1v15(), Prehashed(hashes.SHA1()))
        return True
    except (InvalidSignature, ValueError):
        return False


def _check_options(port: int, memory_budget_bytes: int | None, disk_bytes: int | None,
                   drop_after_bytes: int | None, packet_timeout_s: float, app_runner_dir: Path | None) -> None:
    """Raise :class:`InputError` for options no phone could have, before anything is created or bound."""
    if not 0 <= port <= 65535:
        raise InputError(f"port {port} is out of range (0-65535; 0 picks a free one)")
    if memory_budget_bytes is not None and memory_budget_bytes <= 0:
        raise InputError(f"memory budget must be positive, got {memory_budget_bytes} bytes")
    for name, value in (("disk quota", disk_bytes), ("drop-after-bytes", drop_after_bytes)):
        if value is not None and value < 0:
            raise InputError(f"{name} must not be negative, got {value}")
    if not packet_timeout_s > 0:
        raise InputError(f"packet timeout must be positive, got {packet_timeout_s} s")
    if app_runner_dir is not None and not (Path(app_runner_dir) / "edgedeploy-runner").is_file():
        raise InputError(f"app harness {app_runner_dir}: no edgedeploy-runner in it "
                         "(build one with `edgedeploy package --abi host --out DIR`)")


def _shell_path_to(root: Path) -> tuple[str, str | None]:
    """A host path to ``root`` that can be spliced into shell commands as it is, and the alias folder if one was made.

    Device paths are rewritten inside commands whose quoting is unknown (bare, '...', "..."), so the spliced path
    must mean the same in all of them. ``root`` itself does if it is made of ``[A-Za-z0-9_./+-]``; otherwise a
    symlink to it in a fresh private temporary folder (whose path is safe) stands in for it.
    """
    if _SHELL_SAFE_PATH.fullmatch(str(root)):
        return str(root), None
    for base in dict.fromkeys((tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm")):
        if not (_SHELL_SAFE_PATH.fullmatch(base) and os.path.isdir(base)):
            continue
        try:
            folder = tempfile.mkdtemp(prefix="edgedeploy-phone-", dir=base)  # 0700: other users cannot use it
        except OSError:
            continue
        alias = os.path.join(folder, "root")
        try:
            os.symlink(root, alias)
            if _SHELL_SAFE_PATH.fullmatch(alias):
                return alias, folder
        except OSError:
            pass
        shutil.rmtree(folder, ignore_errors=True)
    raise InputError(f"sandbox {root}: its path has characters the shell would interpret, and no temporary "
                     "folder with a plain path exists for an alias; choose a sandbox path of [A-Za-z0-9_./+-]")


class VirtualPhone:
    """A device-side ADB daemon serving a sandbox folder as the phone's filesystem.

    ``auth_keys=None`` disables AUTH; a list (possibly empty) requires a signature from one of its keys,
    or, with ``allow_any_key``, accepts any public key the client offers. ``disk_bytes`` (push quota),
    ``drop_after_bytes`` (one connection cut mid-push), ``abi`` and ``packet_timeout_s`` are described in the
    module docstring. Out-of-range options and an unusable sandbox raise :class:`InputError`.
    """

    def __init__(
        self,
        sandbox: Path,
        port: int,
        props: dict[str, str] | None = None,
        memory_budget_bytes: int | None = None,
        auth_keys: list[rsa.RSAPublicKey | str | bytes] | None = None,
        host: str = "127.0.0.1",
        allow_any_key: bool = False,
        disk_bytes: int | None = None,
        drop_after_bytes: int | None = None,
        abi: str | None = None,
        app_runner_dir: Path | None = None,
        packet_timeout_s: float = PACKET_TIMEOUT_S,
        sensors: SensorOptions | str | None = None,
    ) -> None:
        if host not in _LOCAL_HOSTS:
            raise ValueError(f"the virtual phone only listens on loopback (127.0.0.1/localhost), not {host!r}")
        _check_options(port, memory_budget_bytes, disk_bytes, drop_after_bytes, packet_timeout_s, app_runner_dir)
        self.root = Path(sandbox).resolve()
        self.shell_root, alias_dir = _shell_path_to(self.root)
        # The alias folder goes when the daemon stops, or at the latest when this object is collected or at exit.
        self._remove_alias = weakref.finalize(self, shutil.rmtree, alias_dir, True) if alias_dir else None
        self.fs = SandboxFS(self.root, aliases=(self.shell_root,))
        self.packet_timeout_s = packet_timeout_s
        self.host, self.port = "127.0.0.1", port
        self.memory_budget_bytes = memory_budget_bytes
        self.allow_any_key = allow_any_key
        self.auth_keys: list[rsa.RSAPublicKey] | None = None
        if auth_keys is not None:
            self.auth_keys = [k if isinstance(k, rsa.RSAPublicKey) else parse_adb_public_key(k) for k in auth_keys]
        self.disk_bytes = disk_bytes
        self.drop_after_bytes = drop_after_bytes
        self.app_runner_dir = app_runner_dir
        self.props = dict(DEFAULT_PROPS)
        if memory_budget_bytes:
            self.props["ro.edgedeploy.memtotal_kb"] = str(memory_budget_bytes // 1024)
            self.props["ro.edgedeploy.budget_kb"] = str(memory_budget_bytes // 1024)
        host_abi = HOST_ABIS.get(platform.machine().lower(), platform.machine().lower())
        self.props["ro.product.cpu.abi"] = abi or host_abi
        self.props["ro.edgedeploy.python"] = sys.executable
        self.props.update({str(k): str(v) for k, v in (props or {}).items()})
        self.props.setdefault("ro.product.cpu.abilist", self.props["ro.product.cpu.abi"])
        self.abi = self.props["ro.product.cpu.abi"]
        if self.abi == "arm64-v8a" and host_abi != "arm64-v8a":
            # No binfmt_misc in a container, so aarch64 programs cannot run by name: the phone says how
            # to start them (qemu-user over Debian's aarch64 glibc), and the profiler puts that in front.
            self.props.setdefault("ro.edgedeploy.exec_wrapper", f"qemu-aarch64 -L {AARCH64_SYSROOT}")
        self._send_bytes = 0  # SEND DATA bytes received over the daemon's lifetime (drives drop_after_bytes)
        self._dropped = False
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._groups: set[int] = set()  # process groups of every command, killed when the daemon stops
        self._prefix_re = re.compile(
            r"(?<![\w.\-/])(" + "|".join(re.escape(p) for p in DEVICE_PREFIXES + SENSOR_PREFIXES)
            + r")(?=/|$|[^\w.\-])"
        )
        # Thermal zones, CPU clocks and a fuel gauge that follow this phone's CPU time (virtual_sensors).
        self.sensors = Sensors(self.fs, sensors if isinstance(sensors, SensorOptions) else SensorOptions.parse(sensors))
        self._sensor_task: asyncio.Task[None] | None = None
        # /proc/meminfo as the phone shows it (see the module docstring); only with a budget to show.
        self._meminfo_re = re.compile(r"(?<![\w.\-/])/proc/meminfo(?![\w.\-/])")
        self._tree_rss: dict[int, int] = {}  # RSS of each running command's process tree, from the budget poll
        self._meminfo_kb: tuple[int, int] | None = None  # what sandbox/proc/meminfo says now
        self._prepare_sandbox()

    # -- sandbox -----------------------------------------------------------------------------------------
    @property
    def logcat_path(self) -> Path:
        return self.root / LOGCAT_DEVICE_PATH.lstrip("/")

    def _prepare_sandbox(self) -> None:
        """Create the phone's folders and files through :class:`SandboxFS`, so a reused sandbox with planted
        links cannot turn setup into a write on the host; ``InputError`` if the sandbox cannot hold them."""
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"sandbox {self.root}: not a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._write_phone_files()
        except OSError as e:
            where = f" ({e.filename})" if isinstance(e.filename, str) and e.filename != str(self.root) else ""
            raise InputError(f"sandbox {self.root}: cannot set up the phone's files{where}: {_reason(e)}") from None

    def _write_phone_files(self) -> None:
        for d in ("/data/local/tmp", "/sdcard", "/system/bin", "/data/misc/logd"):
            os.close(self.fs.open_dir(d, make=True))
        if self.memory_budget_bytes:
            self._write_meminfo()
        try:
            self.fs.append(LOGCAT_DEVICE_PATH, b"")  # keep the log of a reused sandbox
        except PermissionError:
            self.fs.write_file(LOGCAT_DEVICE_PATH, b"")  # a link, FIFO or hard-linked file: start a fresh log
        prop_file = self.root / "system/build.prop"
        props = "".join(f"{k}={v.replace(chr(10), ' ')}\n" for k, v in self.props.items())
        self.fs.write_file("/system/build.prop", props.encode())
        pf, log = shlex.quote(str(prop_file)), shlex.quote(str(self.logcat_path))
        scripts = {
            "getprop": f"""#!/bin/sh
# getprop of the edgedeploy virtual phone: no args lists [key]: [value], else prints the value (or $2).
if [ $# -eq 0 ]; then
  while IFS= read -r l; do printf '[%s]: [%s]\\n' "${{l%%=*}}" "${{l#*=}}"; done < {pf}
  exit 0
fi
while IFS= read -r l; do
  if [ "${{l%%=*}}" = "$1" ]; then printf '%s\\n' "${{l#*=}}"; exit 0; fi
done < {pf}
printf '%s\\n' "${{2:-}}"
""",
            "logcat": f"""#!/bin/sh
# logcat of the edgedeploy virtual phone: prints the log file and exits (-d or not); -c clears it.
for a in "$@"; do [ "$a" = "-c" ] && {{ : > {log}; exit 0; }}; done
cat {log}
""",
        }
        scripts["sha256sum"] = _sha256sum_script()
        scripts["dumpsys"] = dumpsys_script(self.shell_root)
        if self.app_runner_dir is not None:
            scripts.update(self._app_harness_scripts())
        for name, text in scripts.items():
            self.fs.write_file(f"/system/bin/{name}", text.encode(), 0o755)
        self.sensors.prepare()

    def _app_harness_scripts(self) -> dict[str, str]:
        """``pm``, ``am`` and ``run-as`` that emulate the installed edgedeploy harness app.

        The "app" is the host build of the native runner in ``app_runner_dir`` (the JNI bridge of the real
        app calls the same code). ``am start -W`` runs it in the foreground, so the memory budget applies
        and ``files/done`` exists when ``am`` returns; a real phone returns once the Activity started.
        """
        app = self.root / "data" / "data" / HARNESS_PACKAGE
        os.close(self.fs.open_dir(f"/data/data/{HARNESS_PACKAGE}/files", make=True))
        q = shlex.quote
        runner = q(str(Path(self.app_runner_dir or ".").resolve() / "edgedeploy-runner"))
        return {
            "pm": f"""#!/bin/sh
# pm of the edgedeploy virtual phone: only `pm path` of the emulated harness app.
if [ "$1" = path ] && [ "$2" = {HARNESS_PACKAGE} ]; then echo package:/data/app/{HARNESS_PACKAGE}/base.apk; exit 0; fi
exit 1
""",
            "run-as": f"""#!/bin/sh
# run-as of the edgedeploy virtual phone: runs a command in the emulated harness app's data folder.
[ "$1" = {HARNESS_PACKAGE} ] || {{ echo "run-as: package not debuggable: $1" >&2; exit 1; }}
shift
cd {q(str(app))} && exec "$@"
""",
            "am": _AM_SCRIPT.replace("@PKG@", HARNESS_PACKAGE).replace("@FILES@", q(str(app / "files")))
                             .replace("@RUNNER@", runner),
        }

    def disk_used(self) -> int:
        """Bytes in regular files under the sandbox, ``/system`` excepted: the phone's /data (/sdcard lives there)."""
        seen: set[tuple[int, int]] = set()
        total = 0
        # fwalk descends through directory descriptors, never through a symlink swapped in mid-walk.
        for dirpath, dirnames, filenames, dir_fd in os.fwalk(str(self.root)):
            if dirpath == str(self.root):
                dirnames[:] = [d for d in dirnames if d != "system"]
            for name in filenames:
                with contextlib.suppress(OSError):
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_size
        return total

    def host_path(self, device_path: str) -> Path:
        """Map a device path into the sandbox; ``PermissionError`` if it would leave the sandbox.

        For messages and tests only: the answer can be stale by the time it is used (a component swapped for a
        symlink), so file access goes through :attr:`fs` (:class:`SandboxFS`), which cannot be raced.
        """
        parts: list[str] = []
        for part in device_path.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise PermissionError(errno.EACCES, "path escapes the sandbox", device_path)
                parts.pop()
            else:
                parts.append(part)
        path = self.root.joinpath(*parts)
        real = os.path.realpath(path)
        if real != str(self.root) and not real.startswith(str(self.root) + os.sep):
            raise PermissionError(errno.EACCES, "path escapes the sandbox", device_path)
        return path

    def rewrite_command(self, command: str) -> str:
        """Point absolute device paths under the mapped prefixes (with a budget, /proc/meminfo too) into the sandbox."""
        command = self._prefix_re.sub(lambda m: self.shell_root + m.group(1), command)
        if self.memory_budget_bytes:
            command = self._meminfo_re.sub(lambda m: self.shell_root + "/proc/meminfo", command)
        return command

    def meminfo_text(self) -> str:
        """The phone's ``/proc/meminfo``: its RAM, and the budget less what running commands hold as available."""
        budget_kb = (self.memory_budget_bytes or 0) // 1024
        total_kb = int(self.props.get("ro.edgedeploy.memtotal_kb") or budget_kb)
        avail_kb = max(0, budget_kb - sum(self._tree_rss.values()) // 1024)
        rows = [("MemTotal", total_kb), ("MemFree", avail_kb), ("MemAvailable", avail_kb), ("Buffers", 0),
                ("Cached", 0), ("SwapCached", 0), ("SwapTotal", 0), ("SwapFree", 0)]
        # The kernel's layout: the name and colon padded to 16 columns, the figure right-aligned in 8.
        return "".join(f"{name + ':':<16}{kb:>8} kB\n" for name, kb in rows)

    def _write_meminfo(self) -> None:
        """Replace ``sandbox/proc/meminfo`` atomically (a reader sees the old or the new file, never half of one).

        Written through the sandbox walk like the other phone files; the temporary name is unlinked and created
        with ``O_EXCL``, so a planted link or hard link is never written through.
        """
        dir_fd, _ = self.fs.locate("/proc/meminfo", follow=False, make_dirs=True)
        try:
            tmp = ".meminfo.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444,
                         dir_fd=dir_fd)
            try:
                _write_all(fd, self.meminfo_text().encode())
            finally:
                os.close(fd)
            os.replace(tmp, "meminfo", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def _refresh_meminfo(self) -> None:
        """Rewrite the phone's meminfo when what it would say changed by a MiB or more."""
        used_kb = sum(self._tree_rss.values()) // 1024
        last = self._meminfo_kb
        if last is None or abs(last[1] - used_kb) >= 1024 or len(self._tree_rss) != last[0]:
            self._meminfo_kb = (len(self._tree_rss), used_kb)
            with contextlib.suppress(OSError):
                self._write_meminfo()

    def banner(self) -> str:
        keys = ("ro.product.name", "ro.product.model", "ro.product.device")
        fields = "".join(f"{k}={self.props.get(k, '').replace(';', ' ')};" for k in keys)
        return f"device::{fields}features={FEATURES}"

    # -- services ----------------------------------------------------------------------------------------
    def service_for(self, service: str) -> Any:
        """The coroutine function serving ``service``, or None to refuse it."""
        if service == "sync:":
            return self._sync
        if service.startswith("exec:"):
            command = service[5:]
            return lambda s: self._shell(s, command, v2=False)
        if service.startswith("shell"):
            head, sep, command = service.partition(":")
            options = head.split(",")
            if not sep or options[0] != "shell":
                return None
            return lambda s: self._shell(s, command, v2="v2" in options[1:])
        return None

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.shell_root}/system/bin{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["EDGEDEPLOY_DEVICE_ROOT"] = self.shell_root
        env["TMPDIR"] = f"{self.shell_root}/data/local/tmp"
        env["ANDROID_DATA"] = f"{self.shell_root}/data"
        return env

    async def _shell(self, stream: _Stream, command: str, v2: bool) -> None:
        argv = ["/bin/sh", "-c", self.rewrite_command(command)] if command.strip() else ["/bin/sh"]
        if self.memory_budget_bytes:
            self._refresh_meminfo()  # what the commands still running hold, as this one will read it
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if v2 else asyncio.subprocess.STDOUT,
            cwd=f"{self.shell_root}/data/local/tmp",
            env=self._environment(),
            start_new_session=True,  # one process group per command, so a kill takes the whole tree
        )

        async def pump(pipe: asyncio.StreamReader, packet_id: int) -> None:
            while chunk := await pipe.read(SYNC_DATA_MAX):
                if stream.eof:
                    continue  # the client hung up: drop output so the command never blocks on a full pipe
                with contextlib.suppress(ConnectionError):
                    await stream.write(struct.pack("<BI", packet_id, len(chunk)) + chunk if v2 else chunk)

        self._groups.add(proc.pid)
        finished = False
        helpers = [asyncio.create_task(self._feed_stdin(stream, proc, v2))]
        if self.memory_budget_bytes:
            helpers.append(asyncio.create_task(self._watch_memory(proc)))
        try:
            pumps = [pump(proc.stdout, SHELL_STDOUT)]  # type: ignore[arg-type]
            if v2:
                pumps.append(pump(proc.stderr, SHELL_STDERR))  # type: ignore[arg-type]
            await asyncio.gather(*pumps)
            code = _signal_exit_code(await proc.wait())
            finished = True
            if self.memory_budget_bytes:
                # What this command held is free again before its client learns it ended (and reads meminfo).
                for h in helpers[1:]:
                    h.cancel()
                self._tree_rss.pop(proc.pid, None)
                self._refresh_meminfo()
            if v2 and not stream.eof:
                await stream.write(struct.pack("<BIB", SHELL_EXIT, 1, code))
        finally:
            for h in helpers:
                h.cancel()
            if self._tree_rss.pop(proc.pid, None) is not None:
                self._refresh_meminfo()
            # A command that ran to completion may leave detached jobs running, as on a phone; a stream the
            # client dropped (or a dead connection) takes its whole process tree with it.
            if not finished:
                _kill_tree(proc.pid)

    async def _feed_stdin(self, stream: _Stream, proc: asyncio.subprocess.Process, v2: bool) -> None:
        stdin = proc.stdin
        assert stdin is not None
        try:
            while True:
                if v2:
                    packet_id, length = struct.unpack("<BI", await stream.readexactly(5))
                    if length > MAX_PAYLOAD:
                        break  # a bogus length would wait for more than a stream may buffer: end stdin
                    data = await stream.readexactly(length) if length else b""
                    if packet_id == SHELL_CLOSE_STDIN:
                        break
                    if packet_id != SHELL_STDIN:
                        continue  # window size changes mean nothing without a pty
                else:
                    data = await stream.read_some(SYNC_DATA_MAX)  # the pipe's write buffer holds one piece
                stdin.write(data)
                await stdin.drain()
        except (EOFError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                stdin.close()

    async def _watch_memory(self, proc: asyncio.subprocess.Process) -> None:
        budget = self.memory_budget_bytes or 0
        while proc.returncode is None:
            total, name, pid, victim_rss = await asyncio.to_thread(_tree_rss, proc.pid)
            if proc.returncode is None:
                self._tree_rss[proc.pid] = total
                self._refresh_meminfo()
            if total > budget:
                # Like lmkd, kill one victim (the largest process), not its parent shell: a profiler's
                # shell that started the runner survives and reports the runner's exit code 137.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                self._log_kill(name, pid, victim_rss)
            await asyncio.sleep(0.02)

    def _log_kill(self, name: str, pid: int, rss_bytes: int) -> None:
        now = time.time()
        stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        me = os.getpid()
        line = (
            f"{stamp} {me:5d} {me:5d} I {LOG_TAG}: Kill '{name}' ({pid}), uid 2000, oom_score_adj 0 "
            f"to free {rss_bytes // 1024}kB rss, 0kB swap; reason: memory budget of "
            f"{(self.memory_budget_bytes or 0) // 1024}kB exceeded\n"
        )
        # In the event loop on purpose: the line must be in the log before the client sees exit code 137 and
        # runs logcat. Confined, regular files only, O_NONBLOCK: this cannot block or write outside the sandbox.
        with contextlib.suppress(OSError):
            self.fs.append(LOGCAT_DEVICE_PATH, line.encode())

    async def _sync(self, stream: _Stream) -> None:
        while True:
            try:
                request, length = _SYNC.unpack(await stream.readexactly(8))
            except EOFError:
                return
            if request == b"QUIT":
                return
            if length > 4096:
                await _sync_fail(stream, "path too long")
                return
            path = (await stream.readexactly(length)).decode("utf-8", "surrogateescape")
            if request == b"STAT":
                stream.queue(await _in_thread(functools.partial(self._stat_v1, path)))
            elif request in (b"STA2", b"LST2"):
                stream.queue(await _in_thread(functools.partial(self._stat_v2, path, request)))
            elif request in (b"LIST", b"LIS2"):
                await self._list(stream, path, request == b"LIS2")
            elif request in (b"SEND", b"RECV"):
                handler = self._recv_file if request == b"SEND" else self._send_file
                if not await handler(stream, path):
                    return  # adbd ends the sync service after a FAIL; clients open a new one per transfer
            else:
                await _sync_fail(stream, f"unknown sync request {request!r}")
                return
            await stream.flush()

    def _stat_v1(self, path: str) -> bytes:
        try:
            st = self.fs.stat(path, follow=True)
        except (OSError, ValueError):
            return _STAT_V1.pack(b"STAT", 0, 0, 0)  # adbd reports a missing file as all zeros
        return _STAT_V1.pack(b"STAT", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime) & 0xFFFFFFFF)

    def _stat_v2(self, path: str, request: bytes) -> bytes:
        try:
            st = self.fs.stat(path, follow=request == b"STA2")
        except (OSError, ValueError) as e:
            code = getattr(e, "errno", None) or errno.EIO
            return _STAT_V2.pack(request, code, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        return _STAT_V2.pack(request, 0, *_stat_fields(st))

    def _open_listing(self, path: str) -> _Listing:
        dir_fd = self.fs.open_dir(path)
        try:
            return _Listing(dir_fd, os.scandir(dir_fd))
        except OSError:
            os.close(dir_fd)
            raise

    async def _list(self, stream: _Stream, path: str, v2: bool) -> None:
        """LIST/LIS2: entries in batches read by a worker thread, so neither a huge folder nor a slow disk
        holds up the event loop or fills memory. A missing or refused folder lists as empty, as on adbd."""
        try:
            entries = await _in_thread(functools.partial(self._open_listing, path), _Listing.close)
        except (OSError, ValueError):
            entries = None
        if entries is not None:
            listing = _WorkerResource(entries.close)
            try:
                while batch := await listing.run(entries.next_batch):
                    for name, st in batch:
                        if v2:
                            stream.queue(_DENT_V2.pack(b"DNT2", 0, *_stat_fields(st), len(name)) + name)
                        else:
                            mtime = int(st.st_mtime) & 0xFFFFFFFF
                            size = st.st_size & 0xFFFFFFFF
                            stream.queue(_DENT_V1.pack(b"DENT", st.st_mode, size, mtime, len(name)) + name)
                        await stream.flush(final=False)
            finally:
                listing.close()
        stream.queue(b"DONE" + bytes((_DENT_V2 if v2 else _DENT_V1).size - 4))

    async def _recv_file(self, stream: _Stream, spec: str) -> bool:
        """SEND from the client: stream DATA chunks into a new file; answer OKAY (True) or FAIL once DONE
        arrives."""
        path, comma, mode_text = spec.rpartition(",")
        if not comma:
            path = spec
        error: str | None = None
        target: PushTarget | None = None
        try:
            mode = int(mode_text) if comma else 0o644
            if stat.S_ISLNK(mode):
                raise OSError(errno.EPERM, "symlinks are not supported by the virtual phone")
            if path.endswith("/"):
                raise OSError(errno.EISDIR, "Is a directory")
            target = await _in_thread(functools.partial(self.fs.create, path, (mode & 0o777) or 0o644),
                                      PushTarget.close)
        except (OSError, ValueError) as e:
            error = f"{path}: {_reason(e)}"
        file = _WorkerResource(target.close) if target is not None else None
        try:
            error, mtime = await self._receive_data(stream, target, file, error)
            if error is None and target is not None and file is not None:
                try:
                    await file.run(lambda: target.finish(mtime))
                except OSError as e:
                    error = f"{path}: {_reason(e)}"
            if error is None:
                stream.queue(_SYNC.pack(b"OKAY", 0))
                return True
            if target is not None and file is not None:
                await file.run(target.discard)
        finally:
            if file is not None:
                file.close()
        await _sync_fail(stream, error)
        return False

    async def _receive_data(self, stream: _Stream, target: PushTarget | None, file: _WorkerResource | None,
                            error: str | None) -> tuple[str | None, int]:
        """Read DATA chunks up to DONE (even after an error: the client sends everything before it reads a
        reply), writing them to ``target`` in ``_IO_CHUNK`` batches; returns the error, if any, and DONE's mtime.
        Raises ``ConnectionResetError`` for a broken request stream and for the ``drop_after_bytes`` cut."""
        # Quota: usage at the start (the target is already replaced by an empty file) plus every SEND byte
        # received since, from this push or concurrent ones; overwrites and failed pushes err on the full side.
        mark = self._send_bytes
        used = await asyncio.to_thread(self.disk_used) if self.disk_bytes is not None and target else 0
        pending = bytearray()
        while True:
            request, length = _SYNC.unpack(await stream.readexactly(8))
            if request == b"DONE":
                break
            if request != b"DATA" or length > MAX_PAYLOAD:
                raise ConnectionResetError(f"bad sync packet {request!r} during SEND")
            data = await stream.readexactly(length)
            before = self._send_bytes
            self._send_bytes += length
            cut = self.drop_after_bytes
            drop = cut is not None and not self._dropped and self._send_bytes > cut
            if drop:
                # Keep exactly the bytes that arrived before the cut, like storage on a phone that lost its link.
                data = data[: max(0, (cut or 0) - before)]
            if error is None and self.disk_bytes is not None and used + self._send_bytes - mark > self.disk_bytes:
                error = ENOSPC_MESSAGE  # keep reading to DONE, as adbd does, then FAIL and remove the file
            if target is not None and file is not None and error is None:
                pending += data
                if len(pending) >= _IO_CHUNK or drop:
                    error = await _write_batch(file, target, pending)
            if drop:
                self._dropped = True  # once per daemon lifetime, so the client's retry goes through
                stream.conn.drop()
                raise ConnectionResetError("drop_after_bytes: connection cut during SEND")
        if target is not None and file is not None and error is None and pending:
            error = await _write_batch(file, target, pending)
        return error, length

    async def _send_file(self, stream: _Stream, path: str) -> bool:
        """RECV for the client: DATA chunks of at most 64 KiB packed into maxdata WRTEs, then DONE (True);
        FAIL (False) if the file cannot be opened or read."""
        try:
            fd = await _in_thread(functools.partial(self.fs.open_read, path), os.close)
        except (OSError, ValueError) as e:
            await _sync_fail(stream, f"{path}: {_reason(e)}")
            return False
        file = _WorkerResource(lambda: os.close(fd))
        try:
            while chunk := await file.run(lambda: os.read(fd, _IO_CHUNK)):
                for start in range(0, len(chunk), SYNC_DATA_MAX):
                    part = chunk[start : start + SYNC_DATA_MAX]
                    stream.queue(_SYNC.pack(b"DATA", len(part)))
                    stream.queue(part)
                    await stream.flush(final=False)
        except OSError as e:  # e.g. EIO mid-file: FAIL ends the transfer, as adbd does
            await _sync_fail(stream, f"{path}: {_reason(e)}")
            return False
        finally:
            file.close()
        stream.queue(_SYNC.pack(b"DONE", 0))
        return True

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> int:
        """Start listening; returns the bound port (useful with ``port=0``). ``InputError`` if it cannot bind."""
        try:
            self._server = await asyncio.start_server(self._accept, self.host, self.port)
        except OSError as e:
            raise InputError(f"cannot listen on {self.host}:{self.port}: {_reason(e)}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        self._sensor_task = asyncio.create_task(self._run_sensors())
        return self.port

    async def _run_sensors(self) -> None:
        """Tick the sensor models (virtual_sensors) every PERIOD_S while the daemon serves."""
        while True:
            with contextlib.suppress(OSError, psutil.Error):
                await asyncio.to_thread(self.sensors.step)
            await asyncio.sleep(PERIOD_S)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await _Connection(self, reader, writer).run()
        finally:
            self._connections.discard(task)

    async def stop(self) -> None:
        """Stop listening, drop every connection and kill every process started by a shell."""
        if self._server is not None:
            self._server.close()
        if self._sensor_task is not None:
            self._sensor_task.cancel()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for group in self._groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        self._groups.clear()
        if self._remove_alias is not None:
            self._remove_alias()  # the shell alias of an odd sandbox path; no command can use it any more

    async def serve_forever(self, announce: bool = True) -> None:
        """Serve until SIGINT/SIGTERM; prints the readiness line when ``announce``."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if announce:
            print(f"virtual phone listening on {self.host}:{self.port}", flush=True)
        try:
            await stop.wait()
        finally:
            await self.stop()


async def _sync_fail(stream: _Stream, message: str) -> None:
    raw = message.encode("utf-8", "replace")
    stream.queue(_SYNC.pack(b"FAIL", len(raw)) + raw)
    await stream.flush()


async def _write_batch(file: _WorkerResource, target: PushTarget, pending: bytearray) -> str | None:
    """Write and empty ``pending`` in a worker thread; the error message, or None."""
    batch = bytes(pending)
    pending.clear()
    try:
        await file.run(lambda: _write_all(target.fd, batch))
    except OSError as e:
        return _reason(e)
    return None


@dataclass
class _Listing:
    """A directory being listed: its descriptor (``DirEntry.stat`` uses it) and a ``scandir`` iterator over it."""

    dir_fd: int
    entries: Any

    def next_batch(self, limit: int = 256) -> list[tuple[bytes, os.stat_result]]:
        """Up to ``limit`` (name, lstat) pairs; entries removed meanwhile are skipped. Blocking."""
        batch = []
        for entry in self.entries:
            with contextlib.suppress(OSError):
                batch.append((os.fsencode(entry.name), entry.stat(follow_symlinks=False)))
            if len(batch) >= limit:
                break
        return batch

    def close(self) -> None:
        self.entries.close()
        os.close(self.dir_fd)


def _stat_fields(st: os.stat_result) -> tuple[int, ...]:
    return (
        st.st_dev, st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
        int(st.st_atime), int(st.st_mtime), int(st.st_ctime),
    )  # fmt: skip


def _tree_rss(pid: int) -> tuple[int, str, int, int]:
    """Total RSS of ``pid`` and its descendants, plus the name, pid and RSS of the largest one."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, "", pid, 0
    total, biggest = 0, (0, "", pid)
    for p in procs:
        try:
            rss = p.memory_info().rss
            if rss > biggest[0]:
                biggest = (rss, p.name(), p.pid)
        except psutil.Error:
            continue
        total += rss
    return total, biggest[1], biggest[2], biggest[0]


def _kill_tree(pid: int) -> None:
    # Descendants that called setsid() left the process group, so kill them by pid as well.
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for p in descendants:
        with contextlib.suppress(psutil.Error):
            p.kill()


def serve(sandbox: Path, port: int, auth_keys_file: Path | None = None, allow_any_key: bool = False,
          **phone_options: Any) -> None:
    """Run a virtual phone until SIGINT/SIGTERM; prints ``virtual phone listening on 127.0.0.1:PORT`` when ready.

    With ``auth_keys_file`` (``adb_keys`` format) clients must sign the AUTH token with one of its keys.
    ``phone_options`` (props, memory_budget_bytes, disk_bytes, drop_after_bytes, abi, app_runner_dir,
    packet_timeout_s) go to :class:`VirtualPhone`. Bad options raise :class:`InputError` before anything listens.
    """
    keys: list[Any] | None = load_auth_keys(auth_keys_file) if auth_keys_file is not None else None  # InputError
    if keys is None and allow_any_key:
        keys = []
    phone = VirtualPhone(Path(sandbox), port, auth_keys=keys, allow_any_key=allow_any_key, **phone_options)
    asyncio.run(phone.serve_forever())


run_virtual_phone = serve


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m edgedeploy.devices.virtual_phone --port P --sandbox DIR ...``."""
    ap = argparse.ArgumentParser(prog="python -m edgedeploy.devices.virtual_phone", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 (0: pick a free one)")
    ap.add_argument("--sandbox", type=Path, required=True, help="folder holding the device filesystem")
    ap.add_argument("--budget-mb", type=int, default=None, help="memory budget per shell process tree (MiB)")
    ap.add_argument("--prop", action="append", default=[], metavar="KEY=VALUE", help="device property (repeatable)")
    ap.add_argument("--auth-keys", type=Path, default=None, help="adb_keys file; enables AUTH")
    ap.add_argument("--allow-any-key", action="store_true", help="enable AUTH but accept any offered public key")
    ap.add_argument("--disk-mb", type=float, default=None, help="storage quota for sync pushes into /data (MiB)")
    ap.add_argument(
        "--drop-after-bytes", type=int, default=None, metavar="N",
        help="cut the connection once, when the pushed bytes (all connections) pass N",
    )  # fmt: skip
    ap.add_argument("--abi", default=None, help="ro.product.cpu.abi (default: the host's, in Android names)")
    ap.add_argument("--app-harness", type=Path, default=None, metavar="RUNNER_DIR",
                    help="emulate the installed harness app with the host native runner in RUNNER_DIR")
    ap.add_argument("--packet-timeout", type=float, default=PACKET_TIMEOUT_S, metavar="S",
                    help="drop a connection whose started packet is not complete within S seconds")
    ap.add_argument("--sensors", default=None, metavar="KEY=VALUE,...",
                    help="thermal/clock/battery test doubles (see edgedeploy.devices.virtual_sensors)")
    args = ap.parse_args(argv)
    props = {}
    for item in args.prop:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--prop needs KEY=VALUE, got {item!r}")
        props[key] = value
    budget = args.budget_mb * 1024 * 1024 if args.budget_mb else None
    disk = int(args.disk_mb * 1024 * 1024) if args.disk_mb is not None else None
    try:
        serve(args.sandbox, args.port, args.auth_keys, args.allow_any_key, props=props, memory_budget_bytes=budget,
              disk_bytes=disk, drop_after_bytes=args.drop_after_bytes, abi=args.abi, app_runner_dir=args.app_harness,
              packet_timeout_s=args.packet_timeout, sensors=args.sensors)
    except EdgeDeployError as e:
        print(f"error: {e}", file=sys.stderr)  # one line for a bad option, not a traceback
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
