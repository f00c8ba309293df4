"""Reading the files users hand us: JSON with one-line errors, confined file names, exact positional reads.

Every JSON file edgedeploy reads (config.json, safetensors headers, weight indexes, bundle.json, prompt
files) goes through :func:`parse_json`, so a hostile file fails the same way everywhere: an
:class:`InputError` naming the file, never a traceback, and never unbounded memory or recursion.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from edgedeploy.errors import InputError

#: Largest JSON file we read whole. Real config.json, weight indexes, bundle.json and prompt files are
#: kilobytes to a few MB; 16 MiB leaves room for a long pre-tokenized prompt and refuses /dev/zero-like input.
MAX_JSON_BYTES = 16 * 2**20
#: Deepest nesting we accept. Real files nest 2-5 levels; code that walks the parsed value
#: (dataclasses.asdict, json.dumps, rich) recurses, so a depth near Python's recursion limit would
#: crash it later even when the parser itself copes.
MAX_JSON_DEPTH = 64
#: ``\uD800``-``\uDFFF`` escapes can decode to lone surrogates, which cannot be printed or re-encoded
#: as UTF-8; only files containing such an escape need the (slower) check of every string.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
#: Longest file name (path inside a folder) and name component we accept from an index.
_MAX_NAME, _MAX_COMPONENT = 1024, 255


def _check_value(value: Any, where: str, what: str, strings: bool) -> None:
    """Reject nesting deeper than :data:`MAX_JSON_DEPTH` and (with ``strings``) lone surrogates; no recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise InputError(f"{where}: {what} nests deeper than {MAX_JSON_DEPTH} levels")
            children = list(node.values()) + (list(node) if strings else []) if isinstance(node, dict) else node
            # Numbers and literals need no visit; pushing only what can nest (or hold a string) keeps a
            # multi-megabyte list of token ids fast.
            stack.extend((child, depth + 1) for child in children
                         if isinstance(child, (dict, list)) or (strings and isinstance(child, str)))
        elif strings and isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"{where}: {what} holds a string with an unpaired \\u surrogate escape") from None


def parse_json(data: bytes, where: str, what: str) -> Any:
    """Parse UTF-8 JSON ``data``; :class:`InputError` naming ``where`` (a file) and ``what`` otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: {what} is not valid UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise InputError(f"{where}: {what} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: {what} is not valid JSON ({e})") from None
    except ValueError:
        # int() refuses numbers of more than sys.get_int_max_str_digits() digits with a plain ValueError.
        raise InputError(f"{where}: {what} is not valid JSON (a number with too many digits)") from None
    _check_value(value, where, what, strings=bool(_SURROGATE_ESCAPE.search(text)))
    return value


def read_capped(path: Path, what: str, max_bytes: int) -> bytes:
    """The bytes of ``path``; :class:`InputError` when it cannot be read or holds more than ``max_bytes``.

    Reads at most ``max_bytes + 1`` bytes, so a character device or a file that grows cannot make us
    allocate without bound.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise InputError(f"{path}: {what} is a folder, expected a file")
            if stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
                raise InputError(f"{path}: {what} is {st.st_size:,} bytes, more than the {max_bytes:,} allowed")
            data = f.read(max_bytes + 1)
    except IsADirectoryError:
        raise InputError(f"{path}: {what} is a folder, expected a file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise InputError(f"{path}: {what} is more than the {max_bytes:,} bytes allowed")
    return data


def read_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``; :class:`InputError` naming the file and ``what`` it should be otherwise."""
    return parse_json(read_capped(Path(path), what, max_bytes), str(path), what)


def read_json_object(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Like :func:`read_json`, and the value must be a JSON object."""
    data = read_json(path, what, max_bytes)
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} must hold a JSON object")
    return data


def plain_relative_name(name: object, where: str) -> str:
    """``name`` if it is a plain relative file name (``a.bin``, ``sub/a.bin``); :class:`InputError` otherwise.

    Names that files hand us (an index's shard names, a bundle manifest's files) must not climb out
    (``..``), be absolute, carry a control character (NUL, newline: they end up in device shell
    commands and listings) or a Windows separator, or be absurdly long. Links are checked by :func:`resolve_inside`.
    """
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: file name {name!r:.80} must be a non-empty string")
    parts = name.split("/")
    if (any(ord(c) < 32 or c == "\x7f" for c in name) or "\\" in name or name.startswith("/") or len(name) > _MAX_NAME
            or any(p in ("", ".", "..") or len(p) > _MAX_COMPONENT for p in parts)):
        raise InputError(f"{where}: file name {name!r:.120} is not a plain relative name inside the folder")
    return name


def resolve_inside(folder: Path, name: str, root: Path, where: str) -> Path:
    """``folder / name`` after :func:`plain_relative_name`, if it (links followed) stays inside ``root``.

    ``root`` is ``folder`` itself or a folder above it that its links may point into. The returned path
    is the unresolved one, so messages show the name the user knows.
    """
    path = Path(folder) / plain_relative_name(name, where)
    try:
        real = path.resolve()
        root_real = Path(root).resolve()
    except (OSError, RuntimeError) as e:  # a link loop: RuntimeError before Python 3.13, OSError after
        raise InputError(f"{where}: cannot resolve {name!r} ({e})") from None
    if not real.is_relative_to(root_real):
        raise InputError(f"{where}: {name!r} leads outside {root} (to {real}); refusing to read it "
                         "(copy the file into the folder if it belongs there)")
    return path


def pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` without a file mapping (pread may return short reads)."""
    done, n = 0, len(buf)
    while done < n:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise InputError(f"unexpected end of file reading {n} bytes at offset {offset}")
        done += got


def write_renderings(subject: Any, out_dir: Path, renderers: dict[str, Any], names: dict[str, str]) -> dict[str, Path]:
    """Write ``renderers[fmt](subject)`` to ``out_dir / names[fmt]`` for every format; return format -> path.

    Each file is written beside its final name and renamed into place, so a reader never sees half a report.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt, render in renderers.items():
        path = out_dir / names[fmt]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(render(subject), encoding="utf-8")
        tmp.replace(path)
        paths[fmt] = path
    return paths


def check_field_names(cls: type, data: dict[str, Any], where: str) -> None:
    """:class:`InputError` when ``data`` has a key that dataclass ``cls`` lacks, or lacks one it requires."""
    from dataclasses import MISSING, fields

    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r:.60}")
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise InputError(f"{where}: lacks field {missing[0]!r}")
