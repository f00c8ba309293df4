"""Typed profile results (``results.json``): the records, their schema version, and the checked loader."""

from __future__ import annotations

from pathlib import Path

from edgedeploy.errors import InputError
from edgedeploy.fileio import read_json_object
from edgedeploy.results.record import Record, SchemaError, describe, find_problem
from edgedeploy.results.types import (
    FAIL,
    PASS,
    SCHEMA_VERSION,
    SKIP,
    Check,
    DeviceInfo,
    EstimateInfo,
    Killed,
    LmkdKill,
    ManifestInfo,
    ModelResult,
    ProfileInfo,
    PromptSet,
    PushInfo,
    Reference,
    Results,
    Run,
    RunnerInfo,
    Sample,
    Stat,
    Summary,
)

__all__ = ["FAIL", "PASS", "SCHEMA_VERSION", "SKIP", "Check", "DeviceInfo", "EstimateInfo", "Killed", "LmkdKill",
           "ManifestInfo", "ModelResult", "ProfileInfo", "PromptSet", "PushInfo", "Record", "Reference", "Results",
           "Run", "RunnerInfo", "Sample", "SchemaError", "Stat", "Summary", "describe", "find_problem",
           "load_results"]


def load_results(path: Path | str) -> Results:
    """Read a results file and check it; :class:`InputError` naming the file (and the key) otherwise."""
    path = Path(path)
    data = read_json_object(path, "results file")
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise InputError(f"{path}: results file has schema_version {version}; this edgedeploy reads "
                         f"{SCHEMA_VERSION} (upgrade edgedeploy)")
    try:
        return Results.from_dict(data)
    except SchemaError as e:
        raise InputError(f"{path}: not an edgedeploy results file: {e}") from None
