"""The shape of a results file (``results.json``), checked once where one comes in from outside.

``edgedeploy report`` re-renders files written by another run, another machine or a person's editor.
The renderers in :mod:`edgedeploy.report.fit` index into them freely; rather than guarding every
lookup, they only ever see a file that :func:`load_results` has checked against :data:`RESULTS`: each
key a renderer indexes is there with a JSON type the renderer can use, each key it reads with ``.get()``
may be absent, and keys no renderer reads are not checked at all (so newer files with extra fields
still render). A file that does not match is refused with one line naming the file and the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.errors import InputError
from edgedeploy.fileio import read_json_object
from edgedeploy.report.fit import SCHEMA_VERSION


@dataclass(frozen=True)
class Leaf:
    """A JSON scalar of one of ``kinds``, described to the user as ``name``."""

    kinds: tuple[type, ...]
    name: str


@dataclass(frozen=True)
class ListOf:
    """A JSON array whose every item matches ``item``."""

    item: Schema


@dataclass(frozen=True)
class Obj:
    """A JSON object with ``required`` and ``optional`` keys; other keys are allowed and not looked at."""

    required: Mapping[str, Schema] = field(default_factory=dict)
    optional: Mapping[str, Schema] = field(default_factory=dict)
    #: null is accepted in its place (the renderer reads it with ``x.get(k) or {}``).
    nullable: bool = False
    #: ``{}`` is accepted whatever ``required`` says: the profiler writes it for "no data".
    empty_ok: bool = False


Schema = Leaf | ListOf | Obj

_NONE = type(None)
STR = Leaf((str,), "a string")
INT = Leaf((int,), "an integer")
NUM = Leaf((int, float), "a number")
NUM_OR_NULL = Leaf((int, float, _NONE), "a number or null")
INT_OR_NULL = Leaf((int, _NONE), "an integer or null")
STR_OR_NULL = Leaf((str, _NONE), "a string or null")

_STAT = Obj(required={"median": NUM, "stdev": NUM}, nullable=True, empty_ok=True)
_RUN = Obj(optional={"gpu_peak_bytes": NUM})
_PROMPT = Obj(
    required={"name": STR, "prompt_tokens": INT, "warmup": ListOf(_RUN), "runs": ListOf(_RUN),
              "summary": Obj(optional={k: _STAT for k in ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s")})},
    optional={"clipped_from": INT_OR_NULL},
)
_CHECK = Obj(required={"name": STR, "status": STR, "message": STR})
_MODEL = Obj(
    required={
        "model": STR,
        "manifest": Obj(required={"architecture": STR, "dtype": STR, "target": STR, "parameters": NUM,
                                  "weights_bytes": NUM_OR_NULL, "context_window": INT, "prefill_chunk": INT}),
        "runner": Obj(required={"kind": STR}, optional={"elf_machine": STR_OR_NULL}),
        "push": Obj(required={"files_sent": INT, "files_skipped": INT, "mb_per_s": NUM_OR_NULL}),
        "prompts": ListOf(_PROMPT),
    },
    optional={
        "verdict": STR, "reasons": ListOf(STR), "checks": ListOf(_CHECK), "harness": STR,
        "estimate": Obj(optional={"peak_bytes": NUM_OR_NULL}), "device": Obj(),
        **{k: NUM_OR_NULL for k in ("measured_peak_bytes", "peak_error_pct", "budget_bytes", "headroom_bytes")},
    },
)
#: What the renderers of :mod:`edgedeploy.report.fit` read from a results file.
RESULTS = Obj(required={"verdict": STR, "profile": Obj(required={"name": STR}), "models": ListOf(_MODEL)},
              optional={"schema_version": INT, "created": STR, "device": Obj()})


def describe(value: Any) -> str:
    """The JSON type of ``value`` in words, for messages ("a string", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "a boolean"
    for kind, name in ((dict, "an object"), (list, "a list"), (str, "a string"), (int, "an integer")):
        if isinstance(value, kind):
            return name
    return "a number"


def _matches(value: Any, leaf: Leaf) -> bool:
    # true/false would pass isinstance(value, int); no renderer wants a boolean where it formats a number.
    return isinstance(value, leaf.kinds) and (not isinstance(value, bool) or bool in leaf.kinds)


def find_problem(value: Any, schema: Schema, where: str = "") -> str | None:
    """The first place where ``value`` departs from ``schema``, in words, or None when it matches.

    ``where`` is the dotted path of ``value`` in the file (``models[0].manifest``). Recursion follows the
    schema, not the data, so its depth is the schema's (a few levels) however deep the file nests.
    """
    label = f"'{where}'" if where else "the file"
    if isinstance(schema, Leaf):
        return None if _matches(value, schema) else f"{label} must be {schema.name}, got {describe(value)}"
    if isinstance(schema, ListOf):
        if not isinstance(value, list):
            return f"{label} must be a list, got {describe(value)}"
        return next((p for i, item in enumerate(value) if (p := find_problem(item, schema.item, f"{where}[{i}]"))),
                    None)
    if value is None and schema.nullable:
        return None
    if not isinstance(value, dict):
        return f"{label} must be an object, got {describe(value)}"
    if schema.empty_ok and not value:
        return None
    prefix = f"{where}." if where else ""
    missing = next((k for k in schema.required if k not in value), None)
    if missing is not None:
        return f"missing key '{prefix}{missing}'"
    fields = {**schema.required, **schema.optional}
    return next((p for k, sub in fields.items() if k in value and (p := find_problem(value[k], sub, prefix + k))),
                None)


def load_results(path: Path | str) -> dict[str, Any]:
    """Read a results file and check it against :data:`RESULTS`; :class:`InputError` naming the file otherwise."""
    path = Path(path)
    results = read_json_object(path, "results file")
    version = results.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise InputError(f"{path}: results file has schema_version {version}; this edgedeploy reads "
                         f"{SCHEMA_VERSION} (upgrade edgedeploy)")
    problem = find_problem(results, RESULTS)
    if problem:
        raise InputError(f"{path}: not an edgedeploy results file: {problem}")
    return results
