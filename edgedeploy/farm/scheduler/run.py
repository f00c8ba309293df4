"""``edgedeploy farm run``: every (model, device) pair profiled, one job per device at a time, devices in parallel.

A job is one pair: a model's bundle profiled on its *home* device with the public profiler
(:func:`edgedeploy.profile.profiler.profile_models`), under that device's lease (:mod:`edgedeploy.farm.leases`).
One worker thread per device takes its own pairs first. When a device drops mid-job (``ConnectionLost``,
or a ``DeviceError`` after which it no longer answers), the pair goes back to the queue for another
device with the same profile (never one it was already tried on), up to ``max_attempts`` tries; a device
that failed twice is unhealthy for the rest of the run, and its remaining pairs move to its peers. An
error that is not the device's (a bundle the device cannot run, a runner crash) ends the pair there.
Whatever a job cut short left on a device is removed under the next lease on it (see the journal in
:mod:`edgedeploy.farm.leases`); the end of the run tries every such device once more.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.bundle import read_manifest
from edgedeploy.devices.base import ConnectionLost, DeviceError
from edgedeploy.errors import EdgeDeployError, InputError
from edgedeploy.farm import leases
from edgedeploy.farm.inventory import FarmDevice

#: A device with this many faults in one run is not used again in that run.
UNHEALTHY_AFTER = 2
DEFAULT_MAX_ATTEMPTS = 3
#: Called with (kind, message) for the log lines above the live table.
Event = Callable[[str, str], None]


def _no_event(kind: str, message: str) -> None:
    pass


@dataclass
class FarmModel:
    """One model of the run: its name and the bundle for each build target (a bundle input has one)."""

    name: str
    source: Path
    bundles: dict[str, Path]
    built: bool = False

    def bundle_for(self, device: FarmDevice) -> Path:
        if not self.built:
            return next(iter(self.bundles.values()))
        return self.bundles[device.profile.target]


def _is_bundle(path: Path) -> bool:
    return (path / "bundle.json").is_file()


def prepare_models(inputs: list[Path], devices: list[FarmDevice], out_dir: Path, dtype: str = "float16",
                   context_window: int | None = None, prefill_chunk: int | None = None,
                   event: Event = _no_event) -> list[FarmModel]:
    """Check every input; build each model folder once per build target the devices' profiles need."""
    models: list[FarmModel] = []
    names: dict[str, Path] = {}
    for path in inputs:
        if not path.is_dir():
            raise InputError(f"{path}: not a folder (give bundles or model folders)")
        name = path.resolve().name
        if name in names:
            raise InputError(f"{path}: two inputs are named {name!r} ({names[name]}); the farm names models "
                             "and their device folders after the folder name")
        names[name] = path
        if _is_bundle(path):
            read_manifest(path)  # a broken bundle is refused before any device is leased
            models.append(FarmModel(name, path, {"bundle": path}))
        elif (path / "config.json").is_file():
            models.append(FarmModel(name, path, {}, built=True))
        else:
            raise InputError(f"{path}: neither a bundle (bundle.json) nor a model folder (config.json)")
    from edgedeploy.compile.build import build_bundle

    targets: dict[str, Any] = {}
    for d in devices:
        targets.setdefault(d.profile.target, d.profile)
    for model in models:
        if not model.built:
            continue
        for target, profile in targets.items():
            out = out_dir / "bundles" / f"{model.name}-{dtype}-{target}"
            event("build", f"{model.name} for {target} -> {out}")
            build_bundle(model.source, out, target=target, dtype=dtype, context_window=context_window,
                         prefill_chunk=prefill_chunk, profile=profile)
            model.bundles[target] = out
    return models


def _first_device_error(e: DeviceError) -> DeviceError:
    """The device error a failure began with: the profiler's clean-up after a drop fails too, and that later
    error ("not connected") would hide the first ("broken pipe")."""
    first, seen = e, {id(e)}
    cause = e.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, DeviceError):
            first = cause
        cause = cause.__context__
    return first


@dataclass
class Attempt:
    device: str
    outcome: str = "running"  # done | dropped | unreachable | error | running
    message: str = ""
    started: float | None = None
    ended: float | None = None
    lease_wait_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "outcome": self.outcome, "message": self.message, "started": self.started,
                "ended": self.ended, "lease_wait_s": round(self.lease_wait_s, 3)}


@dataclass
class Job:
    """One (model, device) pair and what happened to it."""

    model: FarmModel
    home: FarmDevice
    state: str = "pending"  # pending | running | done | error | not-run
    attempts: list[Attempt] = field(default_factory=list)
    results: Any = None  # the profile Results of the attempt that completed
    reason: str = ""
    running_on: str | None = None

    @property
    def tried(self) -> list[str]:
        return [a.device for a in self.attempts]

    @property
    def verdict(self) -> str | None:
        return self.results.verdict if self.results is not None and self.state == "done" else None


@dataclass
class DeviceState:
    device: FarmDevice
    failures: int = 0
    state: str = "idle"
    detail: str = ""
    jobs_done: int = 0
    faults: list[str] = field(default_factory=list)
    #: Its worker ended (no pair can come to it any more, or it crashed): its own pairs go to peers.
    retired: bool = False
    cleanup_pending: bool = False
    cleanup: str = "clean"
    removed: list[str] = field(default_factory=list)
    facts: dict[str, Any] | None = None

    @property
    def unhealthy(self) -> bool:
        return self.failures >= UNHEALTHY_AFTER


class FarmRun:
    """The jobs, the per-device workers and their shared state (read by the live table)."""

    def __init__(self, devices: list[FarmDevice], models: list[FarmModel], lock_dir: Path,
                 profile_options: dict[str, Any], parallel: int | None = None,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, lease_ttl_s: float = leases.DEFAULT_TTL_S,
                 event: Event = _no_event):
        self.run_id = uuid.uuid4().hex[:12]
        self.devices = {d.address: DeviceState(d) for d in devices}
        self.jobs = [Job(m, d) for m in models for d in devices]
        self.lock_dir = lock_dir
        self.options = profile_options
        self.max_attempts = max_attempts
        self.lease_ttl_s = lease_ttl_s
        self.event = event
        self.cond = threading.Condition()
        self.slots = threading.Semaphore(parallel or len(devices))
        self.stop = threading.Event()
        self.started = self.ended = 0.0
        self.crashed: list[BaseException] = []

    # -- scheduling ------------------------------------------------------------------------------

    def _same_profile(self, job: Job, d: FarmDevice) -> bool:
        return d.profile.name == job.home.profile.name and d.profile.source == job.home.profile.source

    def _displaced(self, job: Job) -> bool:
        home = self.devices[job.home.address]
        return home.unhealthy or home.retired or job.home.address in job.tried

    def _eligible(self, job: Job, state: DeviceState) -> bool:
        d = state.device
        return (job.state == "pending" and not state.unhealthy and d.address not in job.tried
                and len(job.attempts) < self.max_attempts and self._same_profile(job, d)
                and (job.home.address == d.address or self._displaced(job)))

    def _may_need(self, job: Job, state: DeviceState) -> bool:
        """The job could still come to this device (now or after a fault elsewhere)."""
        d = state.device
        return (job.state in ("pending", "running") and d.address not in job.tried
                and len(job.attempts) < self.max_attempts and self._same_profile(job, d))

    def _claim(self, state: DeviceState) -> Job | None:
        """The next job for this device (its own pairs first), or None when none can ever come."""
        with self.cond:
            while True:
                if self.stop.is_set() or state.unhealthy:
                    return None
                own = [j for j in self.jobs if j.home.address == state.device.address and self._eligible(j, state)]
                job = own[0] if own else next((j for j in self.jobs if self._eligible(j, state)), None)
                if job is not None:
                    job.state = "running"
                    job.running_on = state.device.address
                    return job
                if not any(self._may_need(j, state) for j in self.jobs):
                    return None
                state.state, state.detail = "idle", "waiting for pairs that may be retried here"
                self.cond.wait(1.0)

    def _worker(self, state: DeviceState) -> None:
        try:
            while (job := self._claim(state)) is not None:
                with self.slots:
                    self._run_job(job, state)
                with self.cond:
                    self.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - a defect: reported by run() after the other workers end
            self.crashed.append(e)
        finally:
            with self.cond:
                state.retired = True
                state.state = "unhealthy" if state.unhealthy else "done"
                state.detail = state.faults[-1] if state.unhealthy and state.faults else ""
                self.cond.notify_all()

    def _fault(self, job: Job, state: DeviceState, attempt: Attempt, outcome: str, message: str) -> None:
        with self.cond:
            attempt.outcome, attempt.message = outcome, message
            state.failures += 1
            state.faults.append(f"{job.model.name}: {message}")
            job.state, job.running_on = "pending", None
            if len(job.attempts) >= self.max_attempts:
                job.state, job.reason = "not-run", f"gave up after {len(job.attempts)} attempts"
            unhealthy = state.unhealthy
            self.cond.notify_all()
        # Never print while holding self.cond: the live table's refresh holds the console while it reads it.
        self.event("fault", f"{state.device.address} {outcome} during {job.model.name}: {message}")
        if unhealthy:
            self.event("unhealthy", f"{state.device.address} failed {state.failures} times: not used again in this run")

    def _run_job(self, job: Job, state: DeviceState) -> None:
        d = state.device
        attempt = Attempt(d.address)
        with self.cond:
            job.attempts.append(attempt)
            state.state, state.detail = "leasing", job.model.name
        t0 = time.monotonic()

        def on_wait(holder: str) -> None:
            with self.cond:
                state.state, state.detail = "waiting", f"lease held by {holder}"
            self.event("wait", f"{d.address}: waiting for the lease ({holder})")

        try:
            lease = leases.acquire(d, self.lock_dir, self.run_id, self.lease_ttl_s, on_wait=on_wait, stop=self.stop)
        except leases.LeaseBusy:  # only when stopping
            with self.cond:
                job.attempts.remove(attempt)
                job.state, job.running_on, job.reason = "not-run", None, "interrupted"
            return
        except DeviceError as e:
            attempt.lease_wait_s = time.monotonic() - t0
            self._fault(job, state, attempt, "unreachable", str(e))
            return
        attempt.lease_wait_s = time.monotonic() - t0
        try:
            self._profile(job, state, attempt, lease)
        finally:
            lease.release()

    def _profile(self, job: Job, state: DeviceState, attempt: Attempt, lease: leases.Lease) -> None:
        from edgedeploy.profile.profiler import profile_models

        d = state.device
        try:
            removed = leases.sweep(lease)
            if removed:
                state.removed += removed
                self.event("clean", f"{d.address}: removed what an earlier job cut short left: {', '.join(removed)}")
            leases.open_journal(lease)
        except DeviceError as e:
            self._fault(job, state, attempt, "unreachable", str(e))
            return
        with self.cond:
            state.state, state.detail = "running", job.model.name
            attempt.started = time.time()
        note = f" (pair of {job.home.address})" if job.home.address != d.address else ""
        self.event("start", f"{job.model.name} on {d.address}{note}")
        serial, server = d.spec
        try:
            results = profile_models([job.model.bundle_for(d)], serial, server, d.profile,
                                     event=lambda what, detail: self._detail(state, job, what, detail), **self.options)
        except DeviceError as e:
            attempt.ended = time.time()
            e = _first_device_error(e)
            if isinstance(e, ConnectionLost) or not self._answers(lease):
                self._after_drop(job, state, attempt, lease, e)
            else:
                self._job_error(job, state, attempt, lease, e)
            return
        except EdgeDeployError as e:
            attempt.ended = time.time()
            self._job_error(job, state, attempt, lease, e)
            return
        attempt.ended = time.time()
        try:
            with lease.using() as dev:
                leases.close_journal(dev, lease.token)
        except DeviceError:
            state.cleanup_pending = True
        with self.cond:
            attempt.outcome = "done"
            attempt.message = results.verdict
            if lease.lost:
                attempt.message += f"; the lease was lost meanwhile ({lease.lost})"
            job.results, job.state, job.running_on = results, "done", None
            state.jobs_done += 1
            if results.device is not None and state.facts is None:
                state.facts = results.device.to_dict()
            self.cond.notify_all()
        self.event("done", f"{job.model.name} on {d.address}: {results.verdict}")

    def _detail(self, state: DeviceState, job: Job, what: str, detail: str) -> None:
        with self.cond:
            state.detail = f"{job.model.name}: {what} {detail}"[:120]

    def _answers(self, lease: leases.Lease) -> bool:
        """Whether the device still answers (a fresh connection), after a job ended with a device error."""
        try:
            with lease.using() as dev:
                dev.reconnect()
                return dev.shell("true", timeout=15).exit_code == 0
        except DeviceError:
            return False

    def _clean_own(self, state: DeviceState, lease: leases.Lease) -> None:
        try:
            if not self._answers(lease):
                raise DeviceError("does not answer")
            state.removed += leases.sweep(lease, include_own=True)
        except DeviceError:
            state.cleanup_pending = True

    def _after_drop(self, job: Job, state: DeviceState, attempt: Attempt, lease: leases.Lease,
                    e: DeviceError) -> None:
        self._fault(job, state, attempt, "dropped", str(e))
        self._clean_own(state, lease)

    def _job_error(self, job: Job, state: DeviceState, attempt: Attempt, lease: leases.Lease,
                   e: EdgeDeployError) -> None:
        self._clean_own(state, lease)
        with self.cond:
            attempt.outcome, attempt.message = "error", str(e)
            job.state, job.running_on, job.reason = "error", None, str(e)
            self.cond.notify_all()
        self.event("error", f"{job.model.name} on {state.device.address}: {e}")

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> None:
        self.started = time.time()
        threads = [threading.Thread(target=self._worker, args=(s,), name=f"farm {a}", daemon=True)
                   for a, s in self.devices.items()]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            self.stop.set()
            self.event("stop", "interrupted: finishing the jobs in flight")
            for t in threads:
                t.join()
        self._finish()
        self._final_cleanup()
        self.ended = time.time()
        if self.crashed:
            raise self.crashed[0]

    def _finish(self) -> None:
        for job in self.jobs:
            if job.state in ("pending", "running"):
                job.state = "not-run"
            if job.state == "not-run" and not job.reason:
                job.reason = self._why_not_run(job)

    def _why_not_run(self, job: Job) -> str:
        if self.stop.is_set():
            return "interrupted"
        peers = [s for s in self.devices.values() if self._same_profile(job, s.device)]
        if len(job.attempts) >= self.max_attempts:
            return f"gave up after {len(job.attempts)} attempts (--max-attempts)"
        return (f"no device with profile {job.home.profile.name} left to try "
                f"({len(peers)} in the farm, {sum(s.unhealthy for s in peers)} unhealthy)")

    def _final_cleanup(self) -> None:
        """Each device a job was cut short on: one more try to remove what it left (skipped when leased)."""
        for state in self.devices.values():
            if not state.cleanup_pending:
                continue
            try:
                lease = leases.try_acquire(state.device, self.lock_dir, self.run_id, self.lease_ttl_s)
            except (leases.LeaseBusy, DeviceError) as e:
                state.cleanup = (f"pending: {e}; removed under the next lease on it (a later farm run, or "
                                 "`edgedeploy farm clean`)")
                continue
            try:
                state.removed += leases.sweep(lease, include_own=True)
                state.cleanup_pending = False
            except DeviceError as e:
                state.cleanup = f"pending: {e}"
            finally:
                lease.release()
        for state in self.devices.values():
            if not state.cleanup_pending and state.removed:
                state.cleanup = f"removed {len(state.removed)} leftovers of jobs cut short"

    # -- views -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Devices and jobs as they are now (the live table)."""
        with self.cond:
            return {
                "devices": [{"address": a, "profile": s.device.profile.name, "state": s.state, "detail": s.detail,
                             "failures": s.failures, "jobs_done": s.jobs_done} for a, s in self.devices.items()],
                "jobs": [{"model": j.model.name, "device": j.home.address, "state": j.state,
                          "running_on": j.running_on, "attempts": len(j.attempts), "verdict": j.verdict}
                         for j in self.jobs],
            }
