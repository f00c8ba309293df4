"""Putting a finished bundle in place without ever losing one, and recovering from a killed build.

A build writes into ``.NAME.partial-*`` beside the destination ``NAME`` and holds an ``flock`` on that
folder while it lives, so a partial whose lock can be taken belongs to a dead build and is removed.
The swap runs under an ``flock`` on the parent folder, in three renames that each leave a state the
next reader can complete:

1. ``.NAME.partial-*`` -> ``.NAME.ready``   (the new bundle is complete)
2. ``NAME``            -> ``.NAME.old``     (only if a bundle was there)
3. ``.NAME.ready``     -> ``NAME``,         then ``.NAME.old`` is deleted.

:func:`recover` (called by every build and every :func:`~edgedeploy.bundle.read_manifest`) finishes a
swap that has a ``.ready`` folder, restores ``.old`` if nothing else is there, and deletes stale
partials. Only a folder that is provably an edgedeploy bundle is ever replaced (:func:`check_replaceable`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgedeploy.errors import InputError


#: Test hook: called after each step of the swap ("ready", "moved-old", "swapped", "cleaned"); tests
#: replace it to kill the process there and check that :func:`recover` repairs every state.
def _no_hook(step: str) -> None:
    pass


after_step: Callable[[str], None] = _no_hook


def _ready(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.ready")


def _old(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.old")


def _partial_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.partial-"


@contextmanager
def _flock(folder: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``folder``; yields False (non-blocking) when another process holds it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class Partial:
    """A build's working folder beside the destination, locked for as long as the build lives."""

    def __init__(self, out_dir: Path):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=_partial_prefix(out_dir), dir=out_dir.parent))
        self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        """Drop the lock (the folder is gone, or was renamed into place)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Delete the folder of a failed build."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()


def check_replaceable(out_dir: Path) -> None:
    """Refuse (``InputError``) unless ``out_dir`` is absent, empty, or provably an edgedeploy bundle.

    Provably: a valid manifest of ours AND nothing in the folder that the manifest does not list, so a
    user's folder that merely holds a file called ``bundle.json`` is never deleted.
    """
    from edgedeploy.bundle.manifest import read_manifest_file, unlisted_files

    try:
        st = os.lstat(out_dir)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise InputError(f"{out_dir}: is a symbolic link; give the real folder as --out")
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"{out_dir}: exists and is not a folder; choose another --out")
    if not any(out_dir.iterdir()):
        return
    try:
        manifest = read_manifest_file(out_dir)
        extra = unlisted_files(out_dir, manifest)
    except InputError as e:
        raise InputError(f"{out_dir}: exists and is not an edgedeploy bundle, so it is left alone ({e}); "
                         "choose another --out") from None
    if extra:
        raise InputError(f"{out_dir}: holds {extra[0]}"
                         + (f" and {len(extra) - 1} more files" if len(extra) > 1 else "")
                         + " that its bundle.json does not list, so it is left alone; choose another --out")


def install(partial: Partial, out_dir: Path) -> None:
    """Move the finished ``partial`` to ``out_dir``; the bundle it replaces is deleted only after."""
    with _flock(out_dir.parent):
        _recover_locked(out_dir)
        check_replaceable(out_dir)
        ready, old = _ready(out_dir), _old(out_dir)
        partial.path.rename(ready)
        partial.release()
        after_step("ready")
        had_old = out_dir.exists()
        if had_old:
            out_dir.rename(old)
            after_step("moved-old")
        ready.rename(out_dir)
        after_step("swapped")
        if had_old:
            shutil.rmtree(old)
        after_step("cleaned")


def recover(out_dir: Path) -> list[str]:
    """Repair what a killed build left beside ``out_dir``; returns what was done (empty: nothing to do).

    Cheap when there is nothing to repair (one listing of the parent folder), and takes no lock then,
    so readers of a bundle in a read-only place are not affected.
    """
    parent = out_dir.parent
    prefix = f".{out_dir.name}."
    try:
        leftovers = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return []
    if not leftovers:
        return []
    with _flock(parent):
        return _recover_locked(out_dir)


def _recover_locked(out_dir: Path) -> list[str]:
    done: list[str] = []
    ready, old = _ready(out_dir), _old(out_dir)
    if ready.is_dir():
        # The new bundle was complete: finish the swap it was in.
        if out_dir.exists():
            if old.exists():
                shutil.rmtree(old)
            out_dir.rename(old)
        ready.rename(out_dir)
        done.append(f"finished installing the new bundle at {out_dir}")
    if old.exists():
        if out_dir.exists():
            shutil.rmtree(old)
            done.append(f"removed the replaced bundle {old.name}")
        else:
            old.rename(out_dir)
            done.append(f"restored the previous bundle at {out_dir}")
    for name in os.listdir(out_dir.parent):
        path = out_dir.parent / name
        if not name.startswith(_partial_prefix(out_dir)) or not path.is_dir() or path.is_symlink():
            continue
        with _flock(path, blocking=False) as free:
            if free:  # no live build holds it
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {name} left by an interrupted build")
    return done
