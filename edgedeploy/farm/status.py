"""``edgedeploy farm status`` (devices, reachability, leases, health) and ``farm clean`` (leftovers of cut jobs)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgedeploy.devices.base import DeviceError
from edgedeploy.farm import leases
from edgedeploy.farm.inventory import FarmDevice, Inventory

HEALTH_FILE = "health.json"


def record_health(lock_dir: Path, result: dict[str, Any]) -> None:
    """Keep each device's health from the last farm run that used it (``farm status`` shows it)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / HEALTH_FILE
    with open(lock_dir / "health.lock", "a") as guard:
        fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
        data = read_health(lock_dir)
        for d in result["devices"]:
            data[d["address"]] = {"health": d["health"], "failures": d["failures"], "faults": d["faults"][-3:],
                                  "cleanup": d["cleanup"], "run_id": result["run_id"], "at": result["ended"]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(path)


def read_health(lock_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((lock_dir / HEALTH_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def device_status(device: FarmDevice, lock_dir: Path, health: dict[str, Any]) -> dict[str, Any]:
    """One device: reachable or why not, its facts, the host lock and device lease, leftovers, last health."""
    out: dict[str, Any] = {**device.to_dict(), "reachable": False, "error": None, "model": None,
                           "host_lock": leases.HostLock(lock_dir, device).holder(), "lease": None,
                           "lease_state": "unknown", "leftover_jobs": None, "last_run": health.get(device.address)}
    try:
        with device.open() as dev:
            facts = dev.facts()
            out.update(reachable=True, model=facts.model, serial=facts.serial, abi=facts.abi,
                       mem_available_bytes=facts.mem_available_bytes)
            lease, now = leases.read_device_lease(dev)
            out["lease"] = lease
            if lease is None:
                out["lease_state"] = "free"
            else:
                expiry = lease.get("expiry")
                live = isinstance(expiry, int | float) and now is not None and expiry > now
                out["lease_state"] = ("held by " if live else "expired: ") + leases.describe_holder(lease, now)
            journals = leases.pending_journals(dev)
            mine = lease.get("token") if lease else None
            out["leftover_jobs"] = sum(1 for j in journals if j.get("token") != mine)
    except DeviceError as e:
        out["error"] = str(e)
    return out


def farm_status(inventory: Inventory, devices: list[FarmDevice]) -> list[dict[str, Any]]:
    health = read_health(inventory.lock_dir)
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(devices)))) as pool:
        return list(pool.map(lambda d: device_status(d, inventory.lock_dir, health), devices))


def clean_device(device: FarmDevice, lock_dir: Path) -> dict[str, Any]:
    """Take the lease (no waiting), remove what jobs cut short left, release; what happened, as a dict."""
    run_id = "clean-" + time.strftime("%Y%m%d%H%M%S")
    try:
        lease = leases.try_acquire(device, lock_dir, run_id)
    except leases.LeaseBusy as e:
        return {"address": device.address, "state": "busy", "detail": f"leased: {e.holder}", "removed": []}
    except DeviceError as e:
        return {"address": device.address, "state": "unreachable", "detail": str(e), "removed": []}
    removed: list[str] = []
    try:
        removed = leases.sweep(lease)
        state, detail = "clean", (f"took over an expired lease of {leases.describe_holder(lease.took_over)}"
                                  if lease.took_over else "")
    except DeviceError as e:
        state, detail = "unreachable", str(e)
    finally:
        with contextlib.suppress(DeviceError):
            lease.release()
    return {"address": device.address, "state": state, "detail": detail, "removed": removed}


def farm_clean(inventory: Inventory, devices: list[FarmDevice]) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(devices)))) as pool:
        return list(pool.map(lambda d: clean_device(d, inventory.lock_dir), devices))
