"""Push a bundle to a device: only what changed, resumable after a dropped connection, verified.

Beside the bundle on the device we keep ``.edgedeploy-pushed.json``: the sha256 of every file that
arrived whole and was verified there. A file is sent as ``NAME.part``, checked with the device's own
``sha256sum``, then renamed; only then is it recorded. A dropped connection therefore loses at most the
file in flight, and a retry (or the next ``profile``) sends just what is missing or different.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edgedeploy.bundle import MANIFEST, read_manifest, sha256_file
from edgedeploy.devices.base import ConnectionLost, Device, DeviceError
from edgedeploy.errors import InputError

STATE_FILE = ".edgedeploy-pushed.json"
#: Called as (bytes_sent_so_far, bytes_to_send).
PushProgress = Callable[[int, int], None]


@dataclass
class PushStats:
    files_sent: int
    files_skipped: int
    bytes_sent: int
    seconds: float
    retries: int
    verified_on_device: bool

    @property
    def mb_per_s(self) -> float:
        return self.bytes_sent / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "mb_per_s": round(self.mb_per_s, 1)}


def _remote_state(device: Device, remote_dir: str) -> dict[str, str]:
    path = posixpath.join(remote_dir, STATE_FILE)
    if device.stat(path) is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / STATE_FILE
        device.pull(path, local)
        try:
            data = json.loads(local.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # a state file cut off by a drop: treat everything as unsent
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def _save_state(device: Device, remote_dir: str, state: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / STATE_FILE
        local.write_text(json.dumps(state, indent=1, sort_keys=True))
        device.push(local, posixpath.join(remote_dir, STATE_FILE))


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
                retries: int = 3, extra: dict[str, Path] | None = None) -> PushStats:
    """Make ``remote_dir`` on ``device`` an exact, verified copy of the local bundle (plus ``extra`` files)."""
    manifest = read_manifest(bundle_dir)
    # No local re-hash: the device checks every file against the manifest's sha256, which also catches
    # a bundle altered on the host.
    files: dict[str, LocalFile] = {}
    for rel, meta in manifest.files.items():
        path = bundle_dir / rel
        if not path.is_file() or path.stat().st_size != meta["bytes"]:
            raise InputError(f"{bundle_dir}: file {rel} is missing or has the wrong size")
        files[rel] = LocalFile(path, meta["sha256"], meta["bytes"])
    files.update(local_files({MANIFEST: bundle_dir / MANIFEST, **(extra or {})}))
    return push_files(device, files, remote_dir, progress, retries)


def push_files(device: Device, files: dict[str, LocalFile], remote_dir: str, progress: PushProgress | None = None,
               retries: int = 3) -> PushStats:
    """Push what differs from the device's record in ``remote_dir``, verify each file there, record it."""
    wanted = {rel: f.sha256 for rel, f in files.items()}
    sizes = {rel: f.size for rel, f in files.items()}

    t0 = time.perf_counter()
    attempts = 0

    def with_retry(action: Callable[[], object]) -> object:
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
    state: dict[str, str] = with_retry(lambda: _remote_state(device, remote_dir))  # type: ignore[assignment]
    todo = []
    for rel, sha in sorted(wanted.items()):
        st = with_retry(lambda rel=rel: device.stat(posixpath.join(remote_dir, rel)))
        if state.get(rel) == sha and st is not None and st.size == sizes[rel]:  # type: ignore[union-attr]
            continue
        todo.append(rel)
    total = sum(sizes[r] for r in todo)
    done = 0
    verified = True
    if progress:
        progress(0, total)
    for rel in todo:
        remote = posixpath.join(remote_dir, rel)

        def send(rel: str = rel, remote: str = remote) -> None:
            nonlocal verified
            part = remote + ".part"
            # `done` is read when called: bytes of the files before this one plus this file's so far.
            on_bytes = (lambda n: progress(done + n, total)) if progress else None  # noqa: B023
            device.push(files[rel].path, part, on_bytes)
            got = device.sha256(part)
            if got is None:
                verified = False  # no sha256sum on this device: fall back to the size check
                st = device.stat(part)
                if st is None or st.size != sizes[rel]:
                    raise ConnectionLost(f"{device.serial}: {rel} arrived incomplete")
            elif got != wanted[rel]:
                raise ConnectionLost(f"{device.serial}: {rel} arrived corrupt (sha256 differs)")
            r = device.run_args(["mv", "-f", part, remote])
            if r.exit_code:
                raise DeviceError(f"{device.serial}: cannot move {part} into place: {(r.stderr or r.stdout).strip()}")
            state[rel] = wanted[rel]
            _save_state(device, remote_dir, state)

        with_retry(send)
        done += sizes[rel]
        if progress:
            progress(done, total)
    return PushStats(files_sent=len(todo), files_skipped=len(wanted) - len(todo), bytes_sent=total,
                     seconds=time.perf_counter() - t0, retries=attempts, verified_on_device=verified)
