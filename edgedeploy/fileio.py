"""Reading the files users hand us: JSON with one-line errors, and exact positional reads for weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgedeploy.errors import InputError


def read_json(path: Path, what: str) -> Any:
    """The JSON value in ``path``; :class:`InputError` naming the file and ``what`` it should be otherwise."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read {what} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: {what} is not valid JSON ({e})") from None


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """Like :func:`read_json`, and the value must be a JSON object."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} must hold a JSON object")
    return data


def pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` without a file mapping (pread may return short reads)."""
    done, n = 0, len(buf)
    while done < n:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise InputError(f"unexpected end of file reading {n} bytes at offset {offset}")
        done += got
