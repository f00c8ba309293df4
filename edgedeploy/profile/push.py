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
import shlex
import tempfile
import time
from collections.abc import Callable
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
    total = sum(sizes[r] for r in todo)
    done = 0
    if progress:
        progress(0, total)
    for rel in todo:
        remote = posixpath.join(remote_dir, rel)

        def send(rel: str = rel, remote: str = remote) -> None:
            part = remote + ".part"
            # `done` is read when called: bytes of the files before this one plus this file's so far.
            on_bytes = (lambda n: progress(done + n, total)) if progress else None  # noqa: B023
            device.push(files[rel].path, part, on_bytes)
            got = device.sha256(part)
            if got is None:
                stats.verified_on_device = False  # no sha256sum on this device: fall back to the size check
                st = device.stat(part)
                if st is None or st.size != sizes[rel]:
                    raise ConnectionLost(f"{device.serial}: {rel} arrived incomplete")
            elif got != wanted[rel]:
                if sha256_file(files[rel].path) != wanted[rel]:
                    raise InputError(f"{files[rel].path}: differs locally from the sha256 recorded for {rel} "
                                     "(altered after the build); rebuild the bundle")
                raise ConnectionLost(f"{device.serial}: {rel} arrived corrupt (sha256 differs on the device)")
            r = device.run_args(["mv", "-f", part, remote])
            if r.exit_code:
                raise DeviceError(f"{device.serial}: cannot move {part} into place: {(r.stderr or r.stdout).strip()}")
            final = device.stat(remote)
            state[rel] = {"sha256": wanted[rel], "bytes": sizes[rel], "mtime": final.mtime if final else -1}
            _save_state(device, remote_dir, state)

        with_retry(send)
        done += sizes[rel]
        if progress:
            progress(done, total)
    stray = sorted(_remote_files(device, remote_dir) - set(wanted))
    for i in range(0, len(stray), 64):
        device.run_args(["rm", "-f", *(posixpath.join(remote_dir, rel) for rel in stray[i : i + 64])])
    stats.removed_unlisted = len(stray)
    _save_state(device, remote_dir, state)
    stats.files_sent, stats.files_skipped, stats.bytes_sent = len(todo), len(wanted) - len(todo), total
    stats.seconds, stats.retries = time.perf_counter() - t0, attempts
    return stats
