"""Reading the JSON files users hand us (config.json, bundle.json, prompt files) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgedeploy.errors import InputError


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`InputError` naming the file and ``what`` it should be otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read {what} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} must hold a JSON object")
    return data
