"""The results of ``edgedeploy profile`` as typed records: what ``results.json`` holds.

One tree, one :data:`SCHEMA_VERSION`, shared by the profiler (which builds it), the report (which renders
it), the history database (which stores it) and the farm::

    Results                      one profile invocation on one device
    ├── profile: ProfileInfo     the device profile it was judged against
    ├── device: DeviceInfo       the device's facts (serial, model, SoC, Android, ABI, RAM, CPUs)
    └── models: [ModelResult]    one per bundle: manifest, runner, push, verdict, checks, estimate
        └── prompts: [PromptSet] one per prompt set: warm-up and measured runs, summary
            ├── runs: [Run]      one runner process each: its result line plus what the device saw
            └── summary: Summary median / stdev / min / max / n of each metric over the runs

Adding a measured quantity: give it a field on the record it belongs to, typed, with a default so that
older files still load; a concern with several values gets its own nested record (for example
``thermal: ThermalSamples | None = None`` on :class:`Run`, with ``class ThermalSamples(Record)``).
Until a key has a field, it is carried in the record's ``extra`` and written back unchanged, so a
producer may add keys before the record declares them. Stats over runs belong in :class:`Summary`
(a :class:`Stat` per metric; the history database stores every stat it finds there).

Files written by this version are version 1, the same shape as before the records existed (keys that
were null and optional are now left out; ``bundle_sha256`` and ``git_commit`` are new, optional keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgedeploy.results.record import Record, SchemaError

SCHEMA_VERSION = 1
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
VERDICTS = (PASS, FAIL)


@dataclass(kw_only=True)
class Stat(Record):
    """One metric over the measured runs of a prompt set. ``{}`` in a file means "no data"."""

    EMPTY_IS_NONE: ClassVar[bool] = True
    median: float
    stdev: float
    min: float | None = None
    max: float | None = None
    n: int | None = None


@dataclass(kw_only=True)
class Summary(Record):
    """Stats per metric; None where no run measured it."""

    load_s: Stat | None = None
    ttft_s: Stat | None = None
    prefill_tok_s: Stat | None = None
    decode_tok_s: Stat | None = None
    peak_rss_bytes: Stat | None = None

    def stats(self) -> dict[str, Stat]:
        """Every stat present, declared or (from a newer file or producer) in ``extra``, by metric name."""
        out = {k: v for k, v in ((f, getattr(self, f)) for f in ("load_s", "ttft_s", "prefill_tok_s",
                                                                 "decode_tok_s", "peak_rss_bytes")) if v}
        for k, v in self.extra.items():
            if isinstance(v, dict) and v:
                try:
                    out[k] = Stat.from_dict(v, k)
                except SchemaError:
                    continue
        return out


@dataclass(kw_only=True)
class Sample(Record):
    """One memory sample of ``/proc/PID/status`` taken while the runner ran."""

    t_s: float | None = None
    rss_bytes: float = 0
    hwm_bytes: float = 0
    gpu_bytes: float | None = None


@dataclass(kw_only=True)
class LmkdKill(Record):
    """The low-memory killer's logcat line for a killed runner."""

    process: str = ""
    pid: int | None = None
    freed_bytes: float = 0
    line: str = ""


@dataclass(kw_only=True)
class Killed(Record):
    """How a runner killed for memory (exit 137) ended."""

    signal: str = "SIGKILL"
    last_rss_bytes: float = 0
    killed_at_bytes: float = 0
    lmkd: LmkdKill | None = None


@dataclass(kw_only=True)
class MemoryAccount(Record):
    """A run's peak with what is behind it (:func:`edgedeploy.profile.memory.account`): peak = CPU + GPU,
    CPU = max(VmHWM, VmRSS+VmSwap), GPU = max(DMA-BUF, memtrack); each part's source named."""

    peak_bytes: float = 0
    cpu_bytes: float = 0
    cpu_source: str = ""
    vmhwm_bytes: float = 0
    rss_swap_bytes: float = 0
    swap_bytes: float = 0
    gpu_bytes: float = 0
    gpu_source: str = ""
    dmabuf_bytes: float = 0
    memtrack_bytes: float = 0
    pss_bytes: float | None = None


@dataclass(kw_only=True)
class Run(Record):
    """One runner process: the runner's own result line (absent when it was killed) and the device's view.

    Every key is optional: a killed or timed-out run has no speed figures.
    """

    token_ids: list[int] | None = None
    prompt_tokens: int | None = None
    load_s: float | None = None
    ttft_s: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    peak_rss_bytes: float | None = None
    threads: int | None = None
    threads_default: bool | None = None
    cpus: list[int] | None = None
    kv_touched: bool | None = None
    exit_code: int | None = None
    error: str | None = None
    killed: Killed | None = None
    timed_out: bool | None = None
    last_rss_bytes: float | None = None
    wall_s: float | None = None
    device_pid: int | None = None
    gpu_peak_bytes: float | None = None
    #: The peak that counts swap and GPU buffers (absent in files from before it was measured).
    memory: MemoryAccount | None = None
    timeline: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The run completed and reported (no error, not killed, not timed out)."""
        return not self.error and not self.killed and not self.timed_out

    def metric(self, name: str) -> float | None:
        """A numeric measurement by name: a declared field, or a number kept in ``extra``; None if absent."""
        value = getattr(self, name, None) if name in type(self).__dataclass_fields__ else self.extra.get(name)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(kw_only=True)
class Reference(Record):
    """The host run of the same prompt whose tokens the device must reproduce."""

    bundle: str | None = None
    token_ids: list[int] | None = None
    error: str | None = None


@dataclass(kw_only=True)
class PromptSet(Record):
    """One scripted prompt: its warm-up and measured runs, and their summary."""

    name: str
    prompt_tokens: int
    warmup: list[Run]
    runs: list[Run]
    summary: Summary
    max_new_tokens: int | None = None
    clipped_from: int | None = None
    description: str | None = None
    reference: Reference | None = None

    def all_runs(self) -> list[Run]:
        return self.warmup + self.runs


@dataclass(kw_only=True)
class ManifestInfo(Record):
    """The bundle's manifest fields the report needs (bundle.json, see :mod:`edgedeploy.bundle`)."""

    architecture: str
    dtype: str
    target: str
    parameters: float
    weights_bytes: float | None
    context_window: int
    prefill_chunk: int
    family: str | None = None
    config: dict[str, Any] | None = None
    rules: dict[str, Any] | None = None


@dataclass(kw_only=True)
class RunnerInfo(Record):
    kind: str
    abi: str | None = None
    elf_machine: str | None = None


@dataclass(kw_only=True)
class PushInfo(Record):
    """What the push sent (the full :class:`~edgedeploy.profile.push.PushStats` is kept in ``extra``)."""

    files_sent: int
    files_skipped: int
    mb_per_s: float | None


@dataclass(kw_only=True)
class Check(Record):
    name: str
    status: str
    message: str


@dataclass(kw_only=True)
class EstimateInfo(Record):
    """The prediction for this model on the profile (the whole :class:`~edgedeploy.estimate.Estimate`)."""

    peak_bytes: float | None = None
    budget_bytes: float | None = None
    decode_tok_s: float | None = None
    prefill_tok_s: float | None = None


@dataclass(kw_only=True)
class DeviceInfo(Record):
    """The device's facts (:class:`edgedeploy.devices.base.DeviceFacts` as recorded in a results file)."""

    serial: str | None = None
    backend: str | None = None
    model: str | None = None
    manufacturer: str | None = None
    soc: str | None = None
    android_release: str | None = None
    sdk: str | None = None
    abi: str | None = None
    mem_total_bytes: float | None = None
    mem_available_bytes: float | None = None
    cpu_count: int | None = None
    props: dict[str, Any] | None = None


@dataclass(kw_only=True)
class ModelResult(Record):
    """One bundle profiled on one device: the measurements, and (once evaluated) checks and verdict."""

    model: str
    manifest: ManifestInfo
    runner: RunnerInfo
    push: PushInfo
    prompts: list[PromptSet]
    bundle: str | None = None
    #: sha256 of the bundle's bundle.json, which lists the sha256 of every other file: the build's identity.
    bundle_sha256: str | None = None
    threads: int | None = None
    touch_kv: bool | None = None
    runs: int | None = None
    warmup: int | None = None
    harness: str = "shell"
    device: DeviceInfo | None = None
    estimate: EstimateInfo | None = None
    measured_peak_bytes: float | None = None
    peak_error_pct: float | None = None
    budget_bytes: float | None = None
    headroom_bytes: float | None = None
    checks: list[Check] = field(default_factory=list)
    verdict: str | None = None
    reasons: list[str] = field(default_factory=list)

    def all_runs(self) -> list[Run]:
        return [r for p in self.prompts for r in p.all_runs()]


@dataclass(kw_only=True)
class ProfileInfo(Record):
    """The device profile (name, budget, …; :meth:`DeviceProfile.to_dict` is kept whole in ``extra``)."""

    name: str


@dataclass(kw_only=True)
class Results(Record):
    """One ``edgedeploy profile`` invocation: every bundle profiled on one device (``results.json``)."""

    schema_version: int = SCHEMA_VERSION
    kind: str = "profile"
    created: str | None = None
    edgedeploy_version: str | None = None
    #: ``git rev-parse HEAD`` of the working directory profile ran in, when it is a git checkout.
    git_commit: str | None = None
    device: DeviceInfo | None = None
    profile: ProfileInfo
    models: list[ModelResult]
    verdict: str

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Results:
        """Check and build; also refuses a newer schema version and a verdict other than PASS / FAIL."""
        version = data.get("schema_version") if isinstance(data, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise SchemaError(f"schema_version {version}; this edgedeploy reads {SCHEMA_VERSION} (upgrade edgedeploy)")
        results = super().from_dict(data, where)
        if results.verdict not in VERDICTS:
            raise SchemaError(f"'verdict' must be PASS or FAIL, got {results.verdict[:40]!r}")
        return results
