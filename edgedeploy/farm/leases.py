"""Device leases: two farm runs never use one device at the same time.

Two layers, both taken before a job and released after it:

* **Host lock**: a file per device in ``.INVENTORY.locks/`` beside the inventory, held with ``flock`` while
  the job runs. Farm runs on one host that share the inventory exclude each other there, without
  touching the device; the kernel drops the lock when a process dies, so it never goes stale.
* **Device lease**: ``/data/local/tmp/edgedeploy/.lease`` on the device, JSON with owner, pid, host, token
  and expiry (the device's clock, seconds since the epoch). It is what farm runs on *different* hosts
  (remote adb servers, ``tcp:`` endpoints) see of each other. A thread renews it every ``ttl / 3`` seconds
  while it is held; it is taken over only when it has expired (its holder died or lost the device);
  release removes it when it is still ours. Creation uses the shell's ``noclobber``, so two hosts that
  find the device free cannot both create it; taking over an expired lease removes it first, and
  a takeover racing another takeover within the same instant could still let both proceed (the lease
  is advisory, as on any shared farm).

A job also keeps a **journal** on the device (``.farm/TOKEN.json``: what existed under the work folder
before it started). When the device drops mid-job, what the job left there is removed by whoever holds
the next lease on it (the end of the same farm run, a later run, or ``edgedeploy farm clean``).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import posixpath
import shlex
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edgedeploy.devices.base import Device, DeviceError
from edgedeploy.farm.inventory import FarmDevice

WORK_DIR = "/data/local/tmp/edgedeploy"
LEASE_FILE = posixpath.join(WORK_DIR, ".lease")
JOURNAL_DIR = posixpath.join(WORK_DIR, ".farm")
DEFAULT_TTL_S = 60.0
#: How long to wait between tries when the device is leased by someone else.
POLL_S = 0.5


class LeaseBusy(Exception):
    """The device is held by another farm run (``holder`` says who)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def owner_info(run_id: str) -> dict[str, Any]:
    host = socket.gethostname()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"owner": f"{user}@{host}", "host": host, "pid": os.getpid(), "run": run_id}


def describe_holder(info: dict[str, Any] | None, now: float | None = None) -> str:
    if not info:
        return "unknown holder"
    text = f"{info.get('owner', '?')} pid {info.get('pid', '?')}"
    if info.get("run"):
        text += f" (run {info['run']})"
    if now is not None and isinstance(info.get("expiry"), int | float):
        left = info["expiry"] - now
        text += f", expires in {left:.0f} s" if left > 0 else f", expired {-left:.0f} s ago"
    return text


# -- host lock ------------------------------------------------------------------------------------


class HostLock:
    """``flock`` on ``lock_dir/SLUG.lock``: held by one process (and one open file) on this host at a time."""

    def __init__(self, lock_dir: Path, device: FarmDevice):
        self.path = lock_dir / f"{device.slug}.lock"
        self._file: IO[str] | None = None

    def try_acquire(self, info: dict[str, Any]) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(json.dumps({**info, "since": time.time()}) + "\n")
        f.flush()
        self._file = f
        return True

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.truncate(0)
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def holder(self) -> dict[str, Any] | None:
        """Who holds it now (None when free), read without taking it."""
        if not self.path.is_file():
            return None
        with open(self.path, "a+", encoding="utf-8") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                try:
                    data = json.loads(f.read() or "{}")
                except ValueError:
                    data = {}
                return data if isinstance(data, dict) and data else {"owner": "another process"}
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return None


# -- device lease -----------------------------------------------------------------------------------


def _lease_script(token: str, info: dict[str, Any], ttl: float, mode: str, acquired: int | None = None,
                  stale_token: str | None = None) -> str:
    """Shell script for ``mode`` ``acquire`` (create, or take over an expired lease, or the lease of
    ``stale_token``, whose holder is known to be gone) or ``renew``.

    Prints ``ok EXPIRY ACQUIRED``, ``busy CONTENT`` (exit 3) or ``lost CONTENT`` (renew only, exit 4).
    """
    q = shlex.quote
    body = json.dumps({**info, "token": token, "acquired": 0, "expiry": 0}, sort_keys=True)
    head, _, rest = body.partition('"acquired": 0')
    mid, _, tail = rest.partition('"expiry": 0')
    mine = f'"token": "{token}"'
    stale = f'"token": "{stale_token or token}"'
    write = (f"printf '%s%s%s%s%s\\n' {q(head)} \"\\\"acquired\\\": $acq\" {q(mid)} \"\\\"expiry\\\": $exp\" {q(tail)}")
    lines = [f"d={q(WORK_DIR)}; f={q(LEASE_FILE)}",
             'mkdir -p "$d" || exit 90',
             "now=$(date +%s)",
             f"exp=$((now + {int(ttl)})); acq={int(acquired) if acquired is not None else '$now'}",
             'cur=$(cat "$f" 2>/dev/null)']
    if mode == "renew":
        lines += [f"case \"$cur\" in *{q(mine)}*) ;; *) printf 'lost %s\\n' \"$cur\"; exit 4;; esac",
                  f'{write} > "$f.$$" && mv -f "$f.$$" "$f" || exit 91',
                  "echo ok $exp $acq"]
    else:
        lines += ['if [ -n "$cur" ]; then',
                  f"  case \"$cur\" in *{q(mine)}*) ;; *{q(stale)}*) "
                  "printf 'stale %s\\n' \"$cur\"; rm -f \"$f\";; *)",
                  "    old=$(printf '%s' \"$cur\" | sed -n 's/.*\"expiry\": *\\([0-9][0-9]*\\).*/\\1/p')",
                  "    if [ -n \"$old\" ] && [ \"$old\" -gt \"$now\" ]; then printf 'busy %s\\n' \"$cur\"; exit 3; fi",
                  "    printf 'stale %s\\n' \"$cur\"",
                  '    rm -f "$f";;',
                  "  esac",
                  "fi",
                  f'( set -C; {write} > "$f" ) 2>/dev/null || {{ printf \'busy %s\\n\' "$(cat "$f")"; exit 3; }}',
                  "echo ok $exp $acq"]
    # In a subshell: its `exit` ends the script, not the device shell (the tcp: backend reads the exit
    # code from a line printed after the command).
    return "(\n" + "\n".join(lines) + "\n)\n"


def _parse_json_line(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def read_device_lease(device: Device) -> tuple[dict[str, Any] | None, float | None]:
    """The lease on ``device`` (None when there is none) and the device's clock."""
    r = device.shell(f"date +%s; cat {shlex.quote(LEASE_FILE)} 2>/dev/null", timeout=30)
    first, _, rest = r.stdout.partition("\n")
    now = float(first) if first.strip().isdigit() else None
    return (_parse_json_line(rest.strip()) if rest.strip() else None), now


@dataclass
class Lease:
    """A held lease on one device: the host lock, the device lease, and the renewal thread."""

    device: FarmDevice
    token: str
    info: dict[str, Any]
    host_lock: HostLock
    connection: Device
    ttl: float
    #: The device's clock when it was taken (kept by every renewal).
    acquired: int | None = None
    took_over: dict[str, Any] | None = None
    lost: str | None = None
    _stop: threading.Event | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {self.device.address}", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def using(self) -> Iterator[Device]:
        """The lease's own connection to the device, not shared with the renewal thread meanwhile."""
        assert self._lock is not None
        with self._lock:
            yield self.connection

    def _renew_loop(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(self.ttl / 3):
            try:
                with self.using() as dev:
                    r = dev.shell(_lease_script(self.token, self.info, self.ttl, "renew", self.acquired), timeout=30)
            except DeviceError as e:
                self.lost = f"renewal failed: {e}"
                return
            if r.exit_code == 4:
                self.lost = f"taken over: {r.stdout.strip()[5:]}"
                return

    def release(self) -> None:
        """Stop renewing, remove the device lease if it is still ours, unlock the host lock (always)."""
        assert self._stop is not None and self._thread is not None
        self._stop.set()
        self._thread.join(timeout=35)
        try:
            with self.using() as dev:
                mine = shlex.quote(f'"token": "{self.token}"')
                dev.shell(f"f={shlex.quote(LEASE_FILE)}; case \"$(cat \"$f\" 2>/dev/null)\" in *{mine}*) "
                          "rm -f \"$f\";; esac", timeout=30)
        except DeviceError:
            pass  # the device is gone: the lease expires on its own
        finally:
            with contextlib.suppress(Exception):
                self.connection.close()
            self.host_lock.release()


def _holder_gone(holder: dict[str, Any], run_id: str) -> bool:
    """A lease whose holder is known to be gone before it expires: one of this farm run's own (it holds at most
    one lease per device, and none while it asks for one: an earlier job's that could not be removed when the
    device dropped), or one taken by a process of this host that no longer exists."""
    if not holder.get("token"):
        return False
    if holder.get("run") == run_id:
        return True
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def try_acquire(device: FarmDevice, lock_dir: Path, run_id: str, ttl: float = DEFAULT_TTL_S) -> Lease:
    """Take the lease now or raise :class:`LeaseBusy`; :class:`DeviceError` when the device cannot be reached."""
    info = owner_info(run_id)
    host_lock = HostLock(lock_dir, device)
    if not host_lock.try_acquire(info):
        raise LeaseBusy(f"another farm run on this host ({describe_holder(host_lock.holder())})")
    try:
        conn = device.open()
    except BaseException:
        host_lock.release()
        raise
    token = uuid.uuid4().hex
    try:
        r = conn.shell(_lease_script(token, info, ttl, "acquire"), timeout=30)
        lines = r.stdout.strip().splitlines()
        holder = _parse_json_line(lines[-1][5:]) if r.exit_code == 3 and lines else None
        if holder and _holder_gone(holder, run_id):
            # Its holder is gone although the lease has not expired yet: take it over by its token.
            r = conn.shell(_lease_script(token, info, ttl, "acquire", stale_token=str(holder.get("token"))), timeout=30)
            lines = r.stdout.strip().splitlines()
    except BaseException:
        conn.close()
        host_lock.release()
        raise
    if r.exit_code == 3 or r.exit_code != 0 or not lines or not lines[-1].startswith("ok "):
        conn.close()
        host_lock.release()
        if r.exit_code == 3 and lines:
            holder = _parse_json_line(lines[-1][5:])
            raise LeaseBusy(f"leased on the device by {describe_holder(holder)}")
        raise DeviceError(f"{device.address}: cannot write the lease file {LEASE_FILE}: "
                          f"{(r.stderr or r.stdout).strip()[:200]}")
    stale = next((_parse_json_line(line[6:]) for line in lines if line.startswith("stale ")), None)
    acquired = lines[-1].split()[2] if len(lines[-1].split()) > 2 else ""
    return Lease(device, token, {**info, "token": token}, host_lock, conn, ttl,
                 acquired=int(acquired) if acquired.isdigit() else None, took_over=stale)


def acquire(device: FarmDevice, lock_dir: Path, run_id: str, ttl: float = DEFAULT_TTL_S,
            on_wait: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> Lease:
    """Take the lease, waiting while another farm run holds it (``on_wait`` is told who, once per holder)."""
    told = None
    while True:
        try:
            return try_acquire(device, lock_dir, run_id, ttl)
        except LeaseBusy as e:
            if stop is not None and stop.is_set():
                raise
            if on_wait and e.holder != told:
                on_wait(e.holder)
                told = e.holder
            time.sleep(POLL_S)


# -- journal: what a job leaves behind when the device drops --------------------------------------------


def _listing(dev: Device) -> list[str]:
    """Entries two levels under the work folder (``bundles/NAME``, ``runs/ID``), ours excluded."""
    r = dev.shell(f"cd {shlex.quote(WORK_DIR)} 2>/dev/null && find . -mindepth 2 -maxdepth 2", timeout=60)
    return sorted(p for p in r.stdout.split("\n") if p.startswith("./") and not p.startswith("./.farm/"))


def journal_path(token: str) -> str:
    return posixpath.join(JOURNAL_DIR, f"{token}.json")


def open_journal(lease: Lease) -> None:
    """Record what is on the device before the job, so a job cut short can be cleaned up later."""
    with lease.using() as dev:
        before = _listing(dev)
        body = json.dumps({**lease.info, "created": time.time(), "before": before})
        r = dev.shell(f"mkdir -p {shlex.quote(JOURNAL_DIR)} && printf '%s\\n' {shlex.quote(body)} > "
                      f"{shlex.quote(journal_path(lease.token))}", timeout=30)
    if r.exit_code:
        raise DeviceError(f"{lease.device.address}: cannot write the farm journal in {JOURNAL_DIR}: "
                          f"{(r.stderr or r.stdout).strip()[:200]}")


def close_journal(dev: Device, token: str) -> None:
    dev.shell(f"rm -f {shlex.quote(journal_path(token))}; rmdir {shlex.quote(JOURNAL_DIR)} 2>/dev/null; true",
              timeout=30)


def sweep(lease: Lease, include_own: bool = False) -> list[str]:
    """Remove what jobs cut short left on the device (their journals name it); return the removed paths.

    Called with the lease held, so every journal but this lease's own is from a job that is over.
    """
    removed: list[str] = []
    with lease.using() as dev:
        r = dev.shell(f"cd {shlex.quote(JOURNAL_DIR)} 2>/dev/null && for j in *.json; do [ -f \"$j\" ] && "
                      "{ echo \"@@ $j\"; cat \"$j\"; }; done; true", timeout=30)
        journals: list[tuple[str, dict[str, Any]]] = []
        name = None
        for line in r.stdout.splitlines():
            if line.startswith("@@ "):
                name = line[3:].strip()
            elif name and line.strip():
                data = _parse_json_line(line.strip())
                journals.append((name, data or {}))
                name = None
        journals = [(n, d) for n, d in journals if include_own or n != f"{lease.token}.json"]
        if not journals:
            return removed
        now = _listing(dev)
        for name, data in journals:
            before = set(data.get("before") or [])
            # New entries: bundle folders, their push records (``.NAME.edgedeploy-pushed.json``), run folders.
            extra = [p for p in now if p not in before]
            targets = [posixpath.join(WORK_DIR, p[2:]) for p in extra]
            if targets:
                dev.run_args(["rm", "-rf", *targets])
                removed += targets
            now = [p for p in now if p not in extra]
            dev.run_args(["rm", "-f", posixpath.join(JOURNAL_DIR, name)])
        dev.shell(f"rmdir {shlex.quote(JOURNAL_DIR)} 2>/dev/null; true", timeout=30)
    return removed


def pending_journals(dev: Device) -> list[dict[str, Any]]:
    """Journals on the device (``farm status``): jobs that were cut short, or are running now."""
    r = dev.shell(f"cat {shlex.quote(JOURNAL_DIR)}/*.json 2>/dev/null; true", timeout=30)
    return [d for line in r.stdout.splitlines() if line.strip() and (d := _parse_json_line(line.strip()))]
