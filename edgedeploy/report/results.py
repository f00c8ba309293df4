"""The results file as the report reads it: the typed records of :mod:`edgedeploy.results`.

``edgedeploy report`` re-renders files written by another run, another machine or a person's editor.
:func:`load_results` checks such a file once against :class:`~edgedeploy.results.Results` (every key
the records declare has the JSON type they declare; keys they do not declare are kept, unchecked, so
newer files still render) and refuses a file that does not match with one line naming the file and the
key. The renderers only ever see the checked records.
"""

from __future__ import annotations

from edgedeploy.results import Results, describe, find_problem, load_results

#: The record a results file must match (``find_problem(data, RESULTS)``).
RESULTS = Results

__all__ = ["RESULTS", "describe", "find_problem", "load_results"]
