"""Virtual reference phone: a device-side ADB daemon (what ``adbd`` is on a phone) on loopback.

Real ADB clients (Debian's ``adb`` via ``adb connect 127.0.0.1:PORT``, ``adb-shell``'s ``AdbDeviceTcp``,
``adbutils`` through an adb server) connect to it as if it were a phone, so CI can run the profiling flow
without hardware. It speaks the ADB transport (CNXN, optional AUTH, OPEN/OKAY/WRTE/CLSE) and serves
``shell:``, ``shell,v2,...:``, ``exec:`` and ``sync:``.

Device model and its limits:

* The device filesystem is the ``sandbox`` folder: device ``/x/y`` is ``sandbox/x/y``. Sync paths whose
  ``..`` climb above ``/`` or that resolve (through symlinks) outside the sandbox are refused.
* Shell commands run on the host with ``/bin/sh -c``, cwd ``sandbox/data/local/tmp``. Before running, every
  occurrence of the device prefixes ``/data/local/tmp`` and ``/sdcard`` that starts a path is rewritten
  to the sandbox folder (the sandbox path is restricted to ``[A-Za-z0-9_./+-]`` so the rewrite is safe inside
  quotes). Paths built at run time inside the command (``cd /data; cd local``) are not rewritten, and
  commands can still touch the host: this is a test double, not a security boundary.
* ``getprop`` and ``logcat`` are small scripts in ``sandbox/system/bin`` (prepended to ``PATH``).
  ``/proc/meminfo`` stays the host's; the phone's RAM is the prop ``ro.edgedeploy.memtotal_kb``.
* Memory budget (a stand-in for Android's lmkd): the RSS of each shell process tree is polled every 20 ms;
  over budget its largest process gets SIGKILL (exit code 137; the parent shell survives, as with lmkd,
  which picks one victim) and an lmkd-style line with the victim's RSS goes to the logcat
  file (``logcat -d`` prints it, ``logcat -c`` clears it).
* No pty: ``shell,pty`` runs like ``raw``; an empty command starts a plain ``/bin/sh`` reading stdin.
* Process lifetime: each command gets its own process group. When the client closes the stream early, stdin
  gets EOF and the whole tree is SIGKILLed after ``CLOSE_GRACE_S`` (at once if the connection drops). Jobs a
  finished command left detached keep running, as on a phone (unwatched by the memory budget), until the
  daemon stops, which kills every process group it started.
* Output is not rewritten back: commands that print paths show host sandbox paths.
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
[--prop k=v ...] [--auth-keys FILE] [--allow-any-key] [--disk-mb N] [--drop-after-bytes N] [--abi ABI]``
(``--port 0`` picks a free port; the ``virtual phone listening on 127.0.0.1:PORT`` line gives it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import os
import platform
import re
import shlex
import signal
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

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
_SAFE_SANDBOX = re.compile(r"[A-Za-z0-9_./+-]+")
_LOCAL_HOSTS = ("127.0.0.1", "localhost")
LOG_TAG = "lowmemorykiller"


class ProtocolError(Exception):
    """The peer broke the ADB wire protocol; the connection is dropped."""


def _checksum(data: bytes | bytearray) -> int:
    # adb-shell verifies this byte sum on every packet; numpy keeps it off the throughput path.
    if not data:
        return 0
    return int(np.frombuffer(data, dtype=np.uint8).sum(dtype=np.uint64)) & 0xFFFFFFFF


def parse_adb_public_key(key: str | bytes) -> rsa.RSAPublicKey:
    """Decode an adb public key (``adbkey.pub`` line: base64 of Android's RSA struct, then ``user@host``)."""
    text = key.decode("ascii", "replace") if isinstance(key, bytes | bytearray) else key
    raw = base64.b64decode(text.strip().strip("\0").split()[0])
    (words,) = struct.unpack_from("<I", raw, 0)
    if len(raw) != 12 + 8 * words:
        raise ValueError("not an adb RSA public key")
    modulus = int.from_bytes(raw[8 : 8 + 4 * words], "little")
    (exponent,) = struct.unpack_from("<I", raw, 8 + 8 * words)
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def load_auth_keys(path: str | os.PathLike[str]) -> list[rsa.RSAPublicKey]:
    """Read an ``adb_keys``-style file: one adb public key per line, blank lines and ``#`` comments skipped."""
    lines = Path(path).read_text().splitlines()
    return [parse_adb_public_key(line) for line in lines if line.strip() and not line.startswith("#")]


def _signal_exit_code(returncode: int) -> int:
    # A shell reports death by signal N as 128+N; asyncio reports -N.
    return 128 - returncode if returncode < 0 else returncode & 0xFF


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
        self.inbuf += data
        self._in_event.set()
        if len(self.inbuf) < _INBUF_LIMIT:
            self.conn.send(A_OKAY, self.local_id, self.remote_id)
        else:
            self._ack_owed = True

    def _consumed(self) -> None:
        if self._ack_owed and len(self.inbuf) < _INBUF_LIMIT and not self.eof:
            self._ack_owed = False
            self.conn.send(A_OKAY, self.local_id, self.remote_id)

    async def _wait_input(self, n: int) -> None:
        while len(self.inbuf) < n:
            if self.eof:
                raise EOFError
            self._in_event.clear()
            await self._in_event.wait()

    async def readexactly(self, n: int) -> bytes:
        """Next ``n`` bytes from the peer; ``EOFError`` if the stream closes first."""
        await self._wait_input(n)
        data = bytes(self.inbuf[:n])
        del self.inbuf[:n]
        self._consumed()
        return data

    async def read_some(self) -> bytes:
        """Whatever the peer has sent so far (at least one byte); ``EOFError`` once closed."""
        await self._wait_input(1)
        data = bytes(self.inbuf)
        self.inbuf.clear()
        self._consumed()
        return data

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

    def send(self, cmd: int, arg0: int, arg1: int, data: bytes | bytearray = b"") -> None:
        if self.dropped:
            return  # a dropped link carries nothing, not even the CLSE of streams torn down with it
        self.writer.write(_HEADER.pack(cmd, arg0, arg1, len(data), _checksum(data), cmd ^ 0xFFFFFFFF))
        if data:
            self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def run(self) -> None:
        try:
            while True:
                header = await self.reader.readexactly(_HEADER.size)
                cmd, arg0, arg1, length, _check, magic = _HEADER.unpack(header)
                if magic != cmd ^ 0xFFFFFFFF or length > MAX_PAYLOAD:
                    raise ProtocolError(f"bad packet header {header!r}")
                data = await self.reader.readexactly(length) if length else b""
                self._dispatch(cmd, arg0, arg1, data)
                await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError):
            pass
        finally:
            await self.close()

    def drop(self) -> None:
        """Cut the TCP connection at once, without CLSE: what a pulled cable looks like to the client."""
        self.dropped = True
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
        if handler is None:
            self.send(A_CLSE, 0, remote_id)
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
            if self.streams.pop(stream.local_id, None) is not None:
                self.send(A_CLSE, stream.local_id, stream.remote_id)


def _verify(key: rsa.RSAPublicKey, signature: bytes, token: bytes) -> bool:
    # adb signs the 20-byte token as if it were a SHA-1 digest (PKCS#1 v1.5 with the SHA-1 DigestInfo).
    try:
        key.verify(signature, token, padding.PKCS1v15(), Prehashed(hashes.SHA1()))
        return True
    except (InvalidSignature, ValueError):
        return False


class VirtualPhone:
    """A device-side ADB daemon serving a sandbox folder as the phone's filesystem.

    ``auth_keys=None`` disables AUTH; a list (possibly empty) requires a signature from one of its keys,
    or, with ``allow_any_key``, accepts any public key the client offers. ``disk_bytes`` (push quota),
    ``drop_after_bytes`` (one connection cut mid-push) and ``abi`` are described in the module docstring.
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
    ) -> None:
        if host not in _LOCAL_HOSTS:
            raise ValueError(f"the virtual phone only listens on loopback (127.0.0.1/localhost), not {host!r}")
        self.root = Path(sandbox).resolve()
        if not _SAFE_SANDBOX.fullmatch(str(self.root)):
            raise ValueError(f"sandbox path must match [A-Za-z0-9_./+-]+ (it is spliced into commands): {self.root}")
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
            r"(?<![\w.\-/])(" + "|".join(re.escape(p) for p in DEVICE_PREFIXES) + r")(?=/|$|[^\w.\-])"
        )
        self._prepare_sandbox()

    # -- sandbox -----------------------------------------------------------------------------------------
    @property
    def logcat_path(self) -> Path:
        return self.root / "data/misc/logd/logcat.txt"

    def _prepare_sandbox(self) -> None:
        for d in ("data/local/tmp", "sdcard", "system/bin", "data/misc/logd"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.logcat_path.touch()
        prop_file = self.root / "system/build.prop"
        prop_file.write_text("".join(f"{k}={v.replace(chr(10), ' ')}\n" for k, v in self.props.items()))
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
        if self.app_runner_dir is not None:
            scripts.update(self._app_harness_scripts())
        for name, text in scripts.items():
            path = self.root / "system/bin" / name
            path.write_text(text)
            path.chmod(0o755)

    def _app_harness_scripts(self) -> dict[str, str]:
        """``pm``, ``am`` and ``run-as`` that emulate the installed edgedeploy harness app.

        The "app" is the host build of the native runner in ``app_runner_dir`` (the JNI bridge of the real
        app calls the same code). ``am start -W`` runs it in the foreground, so the memory budget applies
        and ``files/done`` exists when ``am`` returns; a real phone returns once the Activity started.
        """
        app = self.root / "data" / "data" / HARNESS_PACKAGE
        (app / "files").mkdir(parents=True, exist_ok=True)
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
        for dirpath, dirnames, filenames in os.walk(self.root):
            if dirpath == str(self.root):
                dirnames[:] = [d for d in dirnames if d != "system"]
            for name in filenames:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(dirpath, name))
                    if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_size
        return total

    def host_path(self, device_path: str) -> Path:
        """Map a device path into the sandbox; ``PermissionError`` if it would leave the sandbox."""
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
        """Point absolute device paths under the mapped prefixes into the sandbox."""
        return self._prefix_re.sub(lambda m: str(self.root) + m.group(1), command)

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
        env["PATH"] = f"{self.root / 'system/bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["EDGEDEPLOY_DEVICE_ROOT"] = str(self.root)
        env["TMPDIR"] = str(self.root / "data/local/tmp")
        env["ANDROID_DATA"] = str(self.root / "data")
        return env

    async def _shell(self, stream: _Stream, command: str, v2: bool) -> None:
        argv = ["/bin/sh", "-c", self.rewrite_command(command)] if command.strip() else ["/bin/sh"]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if v2 else asyncio.subprocess.STDOUT,
            cwd=self.root / "data/local/tmp",
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
            if v2 and not stream.eof:
                await stream.write(struct.pack("<BIB", SHELL_EXIT, 1, code))
        finally:
            for h in helpers:
                h.cancel()
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
                    data = await stream.readexactly(length) if length else b""
                    if packet_id == SHELL_CLOSE_STDIN:
                        break
                    if packet_id != SHELL_STDIN:
                        continue  # window size changes mean nothing without a pty
                else:
                    data = await stream.read_some()
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
        with open(self.logcat_path, "a") as f:
            f.write(line)

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
                stream.queue(self._stat_v1(path))
            elif request in (b"STA2", b"LST2"):
                stream.queue(self._stat_v2(path, request))
            elif request in (b"LIST", b"LIS2"):
                await self._list(stream, path, request == b"LIS2")
            elif request == b"SEND":
                await self._recv_file(stream, path)
            elif request == b"RECV":
                await self._send_file(stream, path)
            else:
                await _sync_fail(stream, f"unknown sync request {request!r}")
                return
            await stream.flush()

    def _stat_v1(self, path: str) -> bytes:
        try:
            st = os.stat(self.host_path(path))
        except OSError:
            return _STAT_V1.pack(b"STAT", 0, 0, 0)  # adbd reports a missing file as all zeros
        return _STAT_V1.pack(b"STAT", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime) & 0xFFFFFFFF)

    def _stat_v2(self, path: str, request: bytes) -> bytes:
        try:
            host = self.host_path(path)
            st = os.stat(host) if request == b"STA2" else os.lstat(host)
        except OSError as e:
            return _STAT_V2.pack(request, e.errno or errno.EIO, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        return _STAT_V2.pack(request, 0, *_stat_fields(st))

    async def _list(self, stream: _Stream, path: str, v2: bool) -> None:
        try:
            entries = list(os.scandir(self.host_path(path)))
        except OSError:
            entries = []
        for entry in entries:
            name = entry.name.encode("utf-8", "surrogateescape")
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if v2:
                stream.queue(_DENT_V2.pack(b"DNT2", 0, *_stat_fields(st), len(name)) + name)
            else:
                mtime = int(st.st_mtime) & 0xFFFFFFFF
                stream.queue(_DENT_V1.pack(b"DENT", st.st_mode, st.st_size & 0xFFFFFFFF, mtime, len(name)) + name)
            await stream.flush(final=False)
        stream.queue(b"DONE" + bytes((_DENT_V2 if v2 else _DENT_V1).size - 4))

    async def _recv_file(self, stream: _Stream, spec: str) -> None:
        """SEND from the client: stream DATA chunks into the file; answer OKAY or FAIL once DONE arrives."""
        path, comma, mode_text = spec.rpartition(",")
        error: str | None = None
        fd = -1
        host: Path | None = None
        try:
            mode = int(mode_text) if comma else 0o644
            if stat.S_ISLNK(mode):
                raise OSError(errno.EPERM, "symlinks are not supported by the virtual phone")
            if (path if comma else spec).endswith("/"):
                raise OSError(errno.EISDIR, "Is a directory")
            host = self.host_path(path if comma else spec)
            host.parent.mkdir(parents=True, exist_ok=True)  # fixed_push_mkdir: adbd creates parents
            fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, (mode & 0o777) or 0o644)
        except (OSError, ValueError) as e:
            error = f"{spec}: {getattr(e, 'strerror', None) or e}"
        # Quota: usage at the start (the target is already truncated) plus every SEND byte received since,
        # from this push or concurrent ones; overwrites and failed pushes make it err on the full side.
        mark = self._send_bytes
        used = await asyncio.to_thread(self.disk_used) if self.disk_bytes is not None and fd >= 0 else 0
        # The client streams the whole file before it reads any reply, so keep reading to DONE even on error.
        try:
            while True:
                request, length = _SYNC.unpack(await stream.readexactly(8))
                if request == b"DONE":
                    mtime = length
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
                if fd >= 0 and error is None:
                    try:
                        os.write(fd, data)
                    except OSError as e:
                        error = f"{spec}: {e.strerror}"
                if drop:
                    self._dropped = True  # once per daemon lifetime, so the client's retry goes through
                    stream.conn.drop()
                    raise ConnectionResetError("drop_after_bytes: connection cut during SEND")
        finally:
            if fd >= 0:
                os.close(fd)
        if error is None and host is not None:
            os.utime(host, (mtime, mtime))
            stream.queue(_SYNC.pack(b"OKAY", 0))
        else:
            if fd >= 0 and host is not None:
                with contextlib.suppress(OSError):
                    host.unlink()
            await _sync_fail(stream, error or "push failed")

    async def _send_file(self, stream: _Stream, path: str) -> None:
        """RECV for the client: DATA chunks of at most 64 KiB packed into maxdata WRTEs, then DONE."""
        try:
            f = open(self.host_path(path), "rb")  # noqa: SIM115 - closed below, across awaits
        except OSError as e:
            await _sync_fail(stream, f"{path}: {e.strerror}")
            return
        with f:
            while chunk := f.read(SYNC_DATA_MAX):
                stream.queue(_SYNC.pack(b"DATA", len(chunk)))
                stream.queue(chunk)
                await stream.flush(final=False)
        stream.queue(_SYNC.pack(b"DONE", 0))

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> int:
        """Start listening; returns the bound port (useful with ``port=0``)."""
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

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
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for group in self._groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        self._groups.clear()

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
    ``phone_options`` (props, memory_budget_bytes, disk_bytes, drop_after_bytes, abi, app_runner_dir) go to
    :class:`VirtualPhone`.
    """
    keys: list[Any] | None = load_auth_keys(auth_keys_file) if auth_keys_file is not None else None
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
    args = ap.parse_args(argv)
    props = {}
    for item in args.prop:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--prop needs KEY=VALUE, got {item!r}")
        props[key] = value
    budget = args.budget_mb * 1024 * 1024 if args.budget_mb else None
    disk = int(args.disk_mb * 1024 * 1024) if args.disk_mb is not None else None
    serve(args.sandbox, args.port, args.auth_keys, args.allow_any_key, props=props, memory_budget_bytes=budget,
          disk_bytes=disk, drop_after_bytes=args.drop_after_bytes, abi=args.abi, app_runner_dir=args.app_harness)
    return 0


if __name__ == "__main__":
    sys.exit(main())
