"""The results history database and the regression gate (``edgedeploy history``, ``check-regression``)."""

from edgedeploy.history.compare import (
    DEFAULT_DECODE_DROP_PCT,
    DEFAULT_MEMORY_GROWTH_PCT,
    Delta,
    compare,
    run_line,
)
from edgedeploy.history.store import History, HistoryRun, default_path, open_history, record, working_commit

__all__ = ["DEFAULT_DECODE_DROP_PCT", "DEFAULT_MEMORY_GROWTH_PCT", "Delta", "History", "HistoryRun", "compare",
           "default_path", "open_history", "record", "run_line", "working_commit"]
