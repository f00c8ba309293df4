"""Scheduling farm jobs (one per device at a time, devices in parallel, retries on peers): see :mod:`.run`."""

from edgedeploy.farm.scheduler.run import DEFAULT_MAX_ATTEMPTS, UNHEALTHY_AFTER, FarmModel, FarmRun, prepare_models

__all__ = ["DEFAULT_MAX_ATTEMPTS", "UNHEALTHY_AFTER", "FarmModel", "FarmRun", "prepare_models"]
