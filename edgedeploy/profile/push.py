"""Push a bundle to a device: only what changed, resumable after a dropped connection, verified.

Beside the bundle folder on the device we keep ``.FOLDER.edgedeploy-pushed.json``: the sha256, size and
mtime of every file that arrived whole and was verified there. A file is sent as ``NAME.part``, checked
with the device's own ``sha256sum``, then renamed; only then is it recorded. A dropped connection
therefore loses at most the file in flight, and a retry (or the next ``profile``) sends just what is
missing or different. Every push also re-checks what is already there: a file whose size or mtime
differs from the record (or every file, with ``rehash``) is hashed again on the device, so a copy
kept with ``--keep`` that changed since is caught and replaced before it runs.
"""

from __future__ import annotations

import json
import posixpath
import queue
import shlex
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.bundle import MANIFEST, is_int, read_manifest, sha256_file, unlisted_files
from edgedeploy.devices.base import ConnectionLost, Device, DeviceError, RemoteStat
from edgedeploy.errors import InputError

#: Called as (bytes_sent_so_far, bytes_to_send).
PushProgress = Callable[[int, int], None]


def state_path(remote_dir: str) -> str:
    """The push record of ``remote_dir``: beside it, so the folder holds exactly the files pushed."""
    parent, name = posixpath.split(remote_dir.rstrip("/"))
    return posixpath.join(parent, f".{name}.edgedeploy-pushed.json")


def remove_pushed(device: Device, remote_dir: str) -> None:
    """Delete a pushed folder and its record."""
    device.run_args(["rm", "-rf", remote_dir, state_path(remote_dir)])


@dataclass
class PushStats:
    files_sent: int
    files_skipped: int
    bytes_sent: int
    seconds: float
    retries: int
    verified_on_device: bool
    #: Files re-hashed on the device (changed size or mtime since recorded, no record yet, or --reverify).
    files_rehashed: int = 0
    #: Files that were verified once and no longer matched on the device: sent again.
    changed_on_device: list[str] = field(default_factory=list)
    #: Files in the device folder that the push did not name (a stray or an interrupted ``.part``): removed.
    removed_unlisted: int = 0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_sent / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "mb_per_s": round(self.mb_per_s, 1)}


def _remote_state(device: Device, remote_dir: str) -> dict[str, dict[str, Any]]:
    """The device's record: name -> {sha256, bytes, mtime} of each file verified there."""
    path = state_path(remote_dir)
    if device.stat(path) is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "state.json"
        device.pull(path, local)
        try:
            data = json.loads(local.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return {}  # a record cut off by a drop: every file is re-hashed
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("sha256"), str)
            and is_int(v.get("bytes")) and is_int(v.get("mtime"))}


def _save_state(device: Device, remote_dir: str, state: dict[str, dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "state.json"
        local.write_text(json.dumps(state, indent=1, sort_keys=True))
        device.push(local, state_path(remote_dir))


def _remote_files(device: Device, remote_dir: str) -> set[str]:
    """Names (relative to ``remote_dir``) of everything but folders below it on the device."""
    # Relative output: a device (or the virtual phone) may print absolute paths in its own form.
    r = device.shell(f"cd {shlex.quote(remote_dir)} && find . ! -type d")
    return {line[2:] for line in r.stdout.splitlines() if line.startswith("./")} if r.exit_code == 0 else set()


@dataclass(frozen=True)
class LocalFile:
    """A file to push: where it is here, and what it must hash to on the device."""

    path: Path
    sha256: str
    size: int


def local_files(paths: dict[str, Path]) -> dict[str, LocalFile]:
    """Hash local files for :func:`push_files` (device-relative name -> file)."""
    return {rel: LocalFile(p, sha256_file(p), p.stat().st_size) for rel, p in paths.items()}


#: Device handles that check arrived files while the next ones are sent: hashing a file on the device
#: takes about as long as sending it, and with two checkers the hash keeps up with the transfer.
CHECKERS = 2
#: The push record is saved at most this often while files arrive (and always at the end): a record lost
#: to a drop costs a re-hash of those files on the next push, not a re-send.
SAVE_EVERY_S = 2.0


class _Sender:
    """Sends files as ``NAME.part`` and has each checked and moved into place on the device.

    The check (the device's sha256sum, then ``mv``, in one shell call) of a file runs on a second
    handle (:meth:`Device.companion`) while the next file is sent; what fails its check is sent again
    in line on the main handle, with its reconnects and retries.
    """

    def __init__(self, device: Device, files: dict[str, LocalFile], remote_dir: str,
                 state: dict[str, dict[str, Any]], stats: PushStats, progress: PushProgress | None):
        self.device, self.files, self.remote_dir = device, files, remote_dir
        self.state, self.stats, self.progress = state, stats, progress
        self.lock, self.saving = threading.Lock(), threading.Lock()
        self.saved_at = time.monotonic()

    def run(self, todo: list[str], with_retry: Callable[[Callable[[], Any]], Any]) -> None:
        total = sum(self.files[r].size for r in todo)
        if self.progress:
            self.progress(0, total)
        checkers = self._checkers() if len(todo) > 1 else []
        again = todo if not checkers else []
        if checkers:
            idle: queue.SimpleQueue[Device] = queue.SimpleQueue()
            for c in checkers:
                idle.put(c)

            def check(rel: str) -> None:
                dev = idle.get()
                try:
                    self.verify(dev, rel)
                finally:
                    idle.put(dev)

            try:
                with ThreadPoolExecutor(max_workers=len(checkers)) as pool:
                    checks, done = [], 0
                    for rel in todo:
                        with_retry(lambda rel=rel, sent=done: self.send(rel, sent, total))
                        checks.append((rel, pool.submit(check, rel)))
                        done += self.files[rel].size
                        if self.progress:
                            self.progress(done, total)
                    for rel, fut in checks:
                        try:
                            fut.result()
                        except ConnectionLost:
                            again.append(rel)  # corrupt, incomplete, or a checker's connection dropped
            finally:
                for c in checkers:
                    if c is not self.device:
                        c.close()
        done = total - sum(self.files[r].size for r in again)
        for rel in again:
            with_retry(lambda rel=rel, sent=done: (self.send(rel, sent, total), self.verify(self.device, rel)))
            done += self.files[rel].size
            if self.progress:
                self.progress(done, total)

    def _checkers(self) -> list[Device]:
        """Handles for the checks; none (check in line) when a second one cannot be opened."""
        out: list[Device] = []
        for _ in range(CHECKERS):
            try:
                out.append(self.device.companion())
            except DeviceError:
                break
        return out

    def send(self, rel: str, sent_before: int, total: int) -> None:
        progress = self.progress
        on_bytes = (lambda n: progress(sent_before + n, total)) if progress else None
        self.device.push(self.files[rel].path, posixpath.join(self.remote_dir, rel) + ".part", on_bytes)

    def verify(self, dev: Device, rel: str) -> None:
        """Check ``rel``'s ``.part`` against its sha256 on the device, move it into place and record it."""
        f = self.files[rel]
        final = posixpath.join(self.remote_dir, rel)
        part = final + ".part"
        qp, qf = shlex.quote(part), shlex.quote(final)
        r = dev.shell(f'set -- $(sha256sum {qp} 2>/dev/null); echo "sha=$1"; '
                      f'if [ "$1" = {f.sha256} ]; then mv -f {qp} {qf} && stat -c "mtime=%Y" {qf}; fi')
        out = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        got = out.get("sha", "")
        if not got:
            self.stats.verified_on_device = False  # no sha256sum on this device: fall back to the size check
            st = dev.stat(part)
            if st is None or st.size != f.size:
                raise ConnectionLost(f"{dev.serial}: {rel} arrived incomplete")
            moved = dev.run_args(["mv", "-f", part, final])
            if moved.exit_code:
                raise DeviceError(f"{dev.serial}: cannot move {part} into place: "
                                  f"{(moved.stderr or moved.stdout).strip()}")
            st = dev.stat(final)
            out["mtime"] = str(st.mtime if st else -1)
        elif got != f.sha256:
            if sha256_file(f.path) != f.sha256:
                raise InputError(f"{f.path}: differs locally from the sha256 recorded for {rel} "
                                 "(altered after the build); rebuild the bundle")
            raise ConnectionLost(f"{dev.serial}: {rel} arrived corrupt (sha256 differs on the device)")
        elif not out.get("mtime", "").lstrip("-").isdigit():
            raise DeviceError(f"{dev.serial}: cannot move {part} into place: {(r.stderr or r.stdout).strip()}")
        with self.lock:
            self.state[rel] = {"sha256": f.sha256, "bytes": f.size, "mtime": int(out["mtime"])}
            due = time.monotonic() - self.saved_at >= SAVE_EVERY_S
            snapshot = dict(self.state)
        if due and self.saving.acquire(blocking=False):
            try:
                _save_state(dev, self.remote_dir, snapshot)
                self.saved_at = time.monotonic()
            finally:
                self.saving.release()


def push_bundle(device: Device, bundle_dir: Path, remote_dir: str, progress: PushProgress | None = None,
                retries: int = 3, extra: dict[str, Path] | None = None, rehash: bool = False) -> PushStats:
    """Make ``remote_dir`` on ``device`` an exact, verified copy of the local bundle (plus ``extra`` files).

    Only the bundle's listed files (and ``extra``, e.g. a library linked for the device) are pushed;
    the local bundle must have no unlisted file either.
    """
    manifest = read_manifest(bundle_dir)
    stray = unlisted_files(bundle_dir, manifest)
    if stray:
        raise InputError(f"{bundle_dir}: file {stray[0]} is not listed in {MANIFEST}; a bundle holds only the "
                         "files its manifest lists (rebuild it, or remove the file)")
    # No local re-hash: the device checks every file against the manifest's sha256, and a mismatch is
    # then traced to the local file or the transfer.
    files: dict[str, LocalFile] = {}
    for rel, meta in manifest.files.items():
        path = bundle_dir / rel
        if not path.is_file() or path.is_symlink() or path.stat().st_size != meta["bytes"]:
            raise InputError(f"{bundle_dir}: file {rel} is missing or has the wrong size")
        files[rel] = LocalFile(path, meta["sha256"], meta["bytes"])
    files.update(local_files({MANIFEST: bundle_dir / MANIFEST, **(extra or {})}))
    return push_files(device, files, remote_dir, progress, retries, rehash)


def push_files(device: Device, files: dict[str, LocalFile], remote_dir: str, progress: PushProgress | None = None,
               retries: int = 3, rehash: bool = False) -> PushStats:
    """Make ``remote_dir`` hold exactly ``files``, each verified on the device against its sha256.

    A file is trusted without hashing only when the device's record says it was verified with the
    same size and mtime it has now; otherwise (or with ``rehash``) the device hashes it again, and
    what does not match is sent again. Files in ``remote_dir`` that ``files`` does not name are removed.
    """
    wanted = {rel: f.sha256 for rel, f in files.items()}
    sizes = {rel: f.size for rel, f in files.items()}

    t0 = time.perf_counter()
    attempts = 0

    def with_retry(action: Callable[[], Any]) -> Any:
        nonlocal attempts
        while True:
            try:
                return action()
            except ConnectionLost:
                attempts += 1
                if attempts > retries:
                    raise
                time.sleep(min(0.5 * attempts, 2.0))
                device.reconnect()

    device.mkdir(remote_dir)
    state: dict[str, dict[str, Any]] = with_retry(lambda: _remote_state(device, remote_dir))
    stats = PushStats(0, 0, 0, 0.0, 0, True)
    todo = []
    for rel in sorted(wanted):
        remote = posixpath.join(remote_dir, rel)
        st: RemoteStat | None = with_retry(lambda remote=remote: device.stat(remote))
        rec = state.pop(rel, None)
        if st is None or st.size != sizes[rel]:
            if rec is not None and st is not None:
                stats.changed_on_device.append(rel)
            todo.append(rel)
            continue
        if (not rehash and rec is not None and rec["sha256"] == wanted[rel] and rec["bytes"] == st.size
                and rec["mtime"] == st.mtime):
            state[rel] = rec
            continue
        got = with_retry(lambda remote=remote: device.sha256(remote))
        stats.files_rehashed += 1
        if got == wanted[rel]:
            state[rel] = {"sha256": got, "bytes": st.size, "mtime": st.mtime}
        elif got is None and rec is not None and rec["sha256"] == wanted[rel] and rec["mtime"] == st.mtime:
            stats.verified_on_device = False  # no sha256sum here: the record and size are all we have
            state[rel] = rec
        else:
            if rec is not None and rec["sha256"] == wanted[rel]:
                stats.changed_on_device.append(rel)
            todo.append(rel)
    _Sender(device, files, remote_dir, state, stats, progress).run(todo, with_retry)
    stray = sorted(_remote_files(device, remote_dir) - set(wanted))
    for i in range(0, len(stray), 64):
        device.run_args(["rm", "-f", *(posixpath.join(remote_dir, rel) for rel in stray[i : i + 64])])
    stats.removed_unlisted = len(stray)
    _save_state(device, remote_dir, state)
    stats.files_sent, stats.files_skipped = len(todo), len(wanted) - len(todo)
    stats.bytes_sent = sum(sizes[r] for r in todo)
    stats.seconds, stats.retries = time.perf_counter() - t0, attempts
    return stats
