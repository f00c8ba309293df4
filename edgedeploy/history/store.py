"""The results history: every profiled model appended to one SQLite database.

One row in ``runs`` per model of a profile invocation (its ``batch``), with what identifies the run
(bundle sha256, model, device, profile, tool version, git commit of the working directory) and the
whole :class:`~edgedeploy.results.ModelResult` as JSON, so nothing measured is lost; one row in
``metrics`` per number: model-level figures (``measured_peak_bytes``, ``estimate.peak_bytes``, …) with
an empty ``prompt``, and every stat of every prompt set's summary (``decode_tok_s.median``, …).

The database is ``~/.local/share/edgedeploy/history.sqlite`` (``$XDG_DATA_HOME`` is honoured), or
``$EDGEDEPLOY_HISTORY``, or ``--history PATH``. Appends are one transaction each, so several profile or
farm processes may share one file. Reading never creates the file.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.errors import InputError
from edgedeploy.results import ModelResult, Results

#: ``PRAGMA user_version`` of the layout below.
DB_VERSION = 1
ENV = "EDGEDEPLOY_HISTORY"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch TEXT NOT NULL,
    recorded TEXT NOT NULL,
    created TEXT,
    model TEXT NOT NULL,
    bundle TEXT,
    bundle_sha256 TEXT,
    device_key TEXT NOT NULL,
    device_serial TEXT,
    device_model TEXT,
    device_json TEXT,
    profile TEXT,
    tool_version TEXT,
    git_commit TEXT,
    verdict TEXT,
    threads INTEGER,
    runner TEXT,
    target TEXT,
    dtype TEXT,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_model_device ON runs (model, device_key, id);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    prompt TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, prompt, metric)
);
"""

_COLUMNS = ("id", "batch", "recorded", "created", "model", "bundle", "bundle_sha256", "device_key", "device_serial",
            "device_model", "profile", "tool_version", "git_commit", "verdict", "threads", "runner", "target", "dtype")


def default_path() -> Path:
    """``$EDGEDEPLOY_HISTORY``, else ``$XDG_DATA_HOME/edgedeploy/history.sqlite`` (``~/.local/share``)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "edgedeploy" / "history.sqlite"


def working_commit(cwd: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of ``cwd`` (default: the working directory), or None outside a git checkout."""
    try:
        r = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "HEAD"], cwd=cwd, capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = r.stdout.strip()
    return commit if r.returncode == 0 and len(commit) in (40, 64) else None


def device_key(model: ModelResult, results: Results) -> str:
    """What "the same device" means: its serial; for this host (serial ``local``), ``local@HOSTNAME``."""
    dev = model.device or results.device
    serial = (dev.serial if dev else None) or "?"
    if dev is not None and dev.backend == "local":
        return f"{serial}@{socket.gethostname()}"
    return serial


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def metrics_of(model: ModelResult) -> list[tuple[str, str, float]]:
    """Every number of one model's result as (prompt, metric, value); prompt ``""`` for model-level ones.

    Model level: its own numbers (``measured_peak_bytes``, …) and those one object down (``estimate.peak_bytes``,
    ``push.mb_per_s``, ``manifest.parameters``, …); per prompt set: ``prompt_tokens`` and every stat of its
    summary (``decode_tok_s.median``, …, including stats a newer producer added).
    """
    out: list[tuple[str, str, float]] = []
    record = model.to_dict()
    for key, value in record.items():
        if (v := _number(value)) is not None:
            out.append(("", key, v))
    # Numbers one level down: the estimate, the push, the manifest's sizes, and any concern a newer
    # producer adds as its own object (the device's facts are stored with the run, not as metrics).
    for part, value in record.items():
        if isinstance(value, dict) and part != "device":
            out += [("", f"{part}.{k}", v) for k, x in value.items() if (v := _number(x)) is not None]
    for p in model.prompts:
        out.append((p.name, "prompt_tokens", float(p.prompt_tokens)))
        for name, stat in p.summary.stats().items():
            for key, value in stat.to_dict().items():
                if (v := _number(value)) is not None:
                    out.append((p.name, f"{name}.{key}", v))
    # One value per (prompt, metric): a prompt set named twice keeps its first.
    seen: set[tuple[str, str]] = set()
    return [m for m in out if (m[0], m[1]) not in seen and not seen.add((m[0], m[1]))]


@dataclass
class HistoryRun:
    """One row of ``runs`` with its metrics."""

    id: int
    batch: str
    recorded: str
    created: str | None
    model: str
    bundle: str | None
    bundle_sha256: str | None
    device_key: str
    device_serial: str | None
    device_model: str | None
    profile: str | None
    tool_version: str | None
    git_commit: str | None
    verdict: str | None
    threads: int | None
    runner: str | None
    target: str | None
    dtype: str | None
    metrics: dict[tuple[str, str], float | None] = field(default_factory=dict)

    def metric(self, name: str, prompt: str = "") -> float | None:
        return self.metrics.get((prompt, name))

    def prompts(self) -> list[str]:
        """Prompt set names in the order they were recorded."""
        return list(dict.fromkeys(p for p, _ in self.metrics if p))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {c: getattr(self, c) for c in _COLUMNS}
        model_level = {m: v for (p, m), v in self.metrics.items() if not p}
        per_prompt: dict[str, dict[str, float | None]] = {}
        for (p, m), v in self.metrics.items():
            if p:
                per_prompt.setdefault(p, {})[m] = v
        return {**out, "metrics": model_level, "prompts": per_prompt}


class History:
    """An open history database. Use :func:`open_history`."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    def _fail(self, e: sqlite3.Error) -> InputError:
        return InputError(f"{self.path}: not a usable edgedeploy history database ({e})")

    def append(self, results: Results, batch: str | None = None) -> list[int]:
        """Add every model of ``results``; return the new run ids (one transaction)."""
        batch = batch or uuid.uuid4().hex
        recorded = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ids = []
        try:
            with self.conn:
                for model in results.models:
                    dev = model.device or results.device
                    run = next((r for r in model.all_runs() if r.threads is not None), None)
                    cur = self.conn.execute(
                        "INSERT INTO runs (batch, recorded, created, model, bundle, bundle_sha256, device_key, "
                        "device_serial, device_model, device_json, profile, tool_version, git_commit, verdict, "
                        "threads, runner, target, dtype, record) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (batch, recorded, results.created, model.model, model.bundle, model.bundle_sha256,
                         device_key(model, results), dev.serial if dev else None, dev.model if dev else None,
                         json.dumps(dev.to_dict()) if dev else None, results.profile.name,
                         results.edgedeploy_version, results.git_commit, model.verdict,
                         run.threads if run else model.threads, model.runner.kind, model.manifest.target,
                         model.manifest.dtype, json.dumps(model.to_dict())))
                    run_id = int(cur.lastrowid or 0)
                    self.conn.executemany("INSERT INTO metrics (run_id, prompt, metric, value) VALUES (?,?,?,?)",
                                          [(run_id, p, m, v) for p, m, v in metrics_of(model)])
                    ids.append(run_id)
        except sqlite3.Error as e:
            raise self._fail(e) from None
        return ids

    def _rows(self, where: str = "", args: tuple[Any, ...] = (), order: str = "id") -> list[HistoryRun]:
        try:
            query = f"SELECT {', '.join(_COLUMNS)} FROM runs {where} ORDER BY {order}"
            rows = self.conn.execute(query, args).fetchall()
            runs = [HistoryRun(*row) for row in rows]
            by_id = {r.id: r for r in runs}
            if by_id:
                marks = ",".join("?" * len(by_id))
                for run_id, prompt, metric, value in self.conn.execute(
                        f"SELECT run_id, prompt, metric, value FROM metrics WHERE run_id IN ({marks})", tuple(by_id)):
                    by_id[run_id].metrics[(prompt, metric)] = value
        except (sqlite3.Error, TypeError) as e:
            raise self._fail(e) if isinstance(e, sqlite3.Error) else InputError(f"{self.path}: {e}") from None
        return runs

    def runs(self, model: str | None = None, device: str | None = None, limit: int | None = None) -> list[HistoryRun]:
        """Runs, oldest first; ``device`` matches the serial, the device key or the device's model name."""
        clauses, args = [], []
        if model:
            clauses.append("model = ?")
            args.append(model)
        if device:
            clauses.append("(device_serial = ? OR device_key = ? OR device_model = ?)")
            args += [device] * 3
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._rows(where, tuple(args), order="id DESC" + (f" LIMIT {int(limit)}" if limit else ""))
        return rows[::-1]

    def get(self, run_id: int) -> HistoryRun:
        rows = self._rows("WHERE id = ?", (run_id,))
        if not rows:
            raise InputError(f"{self.path}: no run {run_id} in the history (see `edgedeploy history`)")
        return rows[0]

    def newest_batch(self) -> list[HistoryRun]:
        """The runs of the most recent profile invocation."""
        rows = self._rows("WHERE batch = (SELECT batch FROM runs ORDER BY id DESC LIMIT 1)")
        if not rows:
            raise InputError(f"{self.path}: the history holds no runs yet (`edgedeploy profile` adds them)")
        return rows

    def latest_before(self, run: HistoryRun) -> HistoryRun | None:
        """The newest earlier run of the same model on the same device, from another invocation."""
        rows = self._rows("WHERE model = ? AND device_key = ? AND id < ? AND batch != ?",
                          (run.model, run.device_key, run.id, run.batch), order="id DESC LIMIT 1")
        return rows[0] if rows else None


@contextmanager
def open_history(path: Path | str | None = None, write: bool = False) -> Iterator[History]:
    """Open the database at ``path`` (default :func:`default_path`); ``write`` creates it and its folder.

    Read-only opens never create anything; a missing file, a file that is not SQLite, or one made by a
    newer edgedeploy is an :class:`InputError` naming it.
    """
    path = Path(path) if path else default_path()
    try:
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=60)
        else:
            if not path.is_file():
                raise InputError(f"{path}: no history database here (`edgedeploy profile` creates it; "
                                 f"--history PATH or ${ENV} point elsewhere)")
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
    except sqlite3.Error as e:
        raise InputError(f"{path}: cannot open the history database ({e})") from None
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > DB_VERSION:
            raise InputError(f"{path}: history database version {version}; this edgedeploy reads {DB_VERSION} "
                             "(upgrade edgedeploy)")
        if write:
            with conn:
                conn.executescript(_SCHEMA)
                conn.execute(f"PRAGMA user_version = {DB_VERSION}")
        elif version != DB_VERSION:
            raise InputError(f"{path}: not an edgedeploy history database (user_version {version})")
        yield History(conn, path)
    except sqlite3.Error as e:
        raise InputError(f"{path}: not a usable edgedeploy history database ({e})") from None
    finally:
        conn.close()


def record(results: Results, path: Path | str | None = None) -> tuple[Path, list[int]]:
    """Append ``results`` to the history at ``path`` (default :func:`default_path`); (path, new run ids)."""
    with open_history(path, write=True) as h:
        return h.path, h.append(results)
