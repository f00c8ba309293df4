"""The farm's inventory (``farm.toml``): which devices, through which transport, judged against which profile.

::

    [[device]]
    address = "tcp:127.0.0.1:6520"     # or an adb serial, or "SERIAL@HOST:PORT" (a serial behind a remote adb server)
    profile = "reference-12gb"         # a profile name or file (relative to the inventory's folder)
    tags = { ram = "12g", soc = "sm8650" }

    [[adb_server]]                     # every device this server lists joins the farm
    address = "farm-host.example:5037"
    profile = "reference-12gb"

The file is validated on load like device profiles: an error names the file, the entry, the field and
what is expected (:class:`~edgedeploy.errors.InputError`, exit code 2). The devices an ``[[adb_server]]``
lists are only known when the farm runs (:func:`expand`).
"""

from __future__ import annotations

import hashlib
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.devices.base import Device
from edgedeploy.devices.profiles import DeviceProfile, load_profile
from edgedeploy.errors import InputError

_TOP = {"device": "an array of [[device]] tables", "adb_server": "an array of [[adb_server]] tables"}
_DEVICE_FIELDS = {"address": "an adb serial, tcp:HOST:PORT or SERIAL@HOST:PORT",
                  "profile": "a profile name or .toml file",
                  "tags": "a table of strings (tags = { ram = \"12g\" })"}
_SERVER_FIELDS = {"address": "HOST:PORT of an adb server", "profile": "a profile name or .toml file",
                  "tags": "a table of strings (tags = { site = \"lab-2\" })"}
_TAG_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class FarmDevice:
    """One device of the farm: how to reach it and what it is judged against."""

    address: str
    profile: DeviceProfile
    tags: dict[str, str] = field(default_factory=dict)
    #: Where it came from: ``[[device]] #N`` or ``[[adb_server]] ADDRESS``.
    origin: str = ""

    @property
    def kind(self) -> str:
        """``tcp`` (direct), ``remote-adb`` (serial behind a remote adb server) or ``adb`` (the local server)."""
        if self.address.startswith("tcp:"):
            return "tcp"
        return "remote-adb" if "@" in self.address else "adb"

    @property
    def spec(self) -> tuple[str, str | None]:
        """``(device, adb_server)`` as ``open_device`` takes them."""
        if self.kind == "remote-adb":
            serial, _, server = self.address.rpartition("@")
            return serial, server
        return self.address, None

    @property
    def slug(self) -> str:
        """A file name for this device (lock files): readable, and unique through a hash of the address."""
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", self.address)[:48]
        return f"{readable}-{hashlib.sha256(self.address.encode()).hexdigest()[:8]}"

    def open(self) -> Device:
        from edgedeploy.devices.adb import open_device

        serial, server = self.spec
        return open_device(serial, server)

    def matches(self, selectors: dict[str, str]) -> bool:
        """Every ``TAG=VALUE`` holds (``profile`` and ``address`` can be selected on too)."""
        builtin = {"profile": self.profile.name, "address": self.address}
        return all(self.tags.get(k, builtin.get(k)) == v for k, v in selectors.items())

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "profile": self.profile.name, "profile_source": self.profile.source,
                "tags": dict(self.tags), "origin": self.origin, "kind": self.kind}


@dataclass(frozen=True)
class AdbServerEntry:
    address: str
    profile: DeviceProfile
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Inventory:
    path: Path
    devices: tuple[FarmDevice, ...]
    adb_servers: tuple[AdbServerEntry, ...]

    @property
    def lock_dir(self) -> Path:
        """Beside the inventory: one flock'ed file per device, shared by every farm run on this host."""
        return self.path.parent / f".{self.path.name}.locks"


def _host_port(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536 and not any(c.isspace() for c in host)


def _serial_ok(serial: str) -> bool:
    return bool(serial) and not any(c.isspace() for c in serial) and shlex.quote(serial) == serial


def check_address(address: str) -> str | None:
    """None when ``address`` is a usable device address, else what is wrong with it."""
    if address.startswith("tcp:"):
        return None if _host_port(address[4:]) else "tcp: must be followed by HOST:PORT"
    if "@" in address:
        serial, _, server = address.rpartition("@")
        if not _serial_ok(serial):
            return "the serial before '@' must be a plain adb serial"
        return None if _host_port(server) else "the adb server after '@' must be HOST:PORT"
    return None if _serial_ok(address) else "an adb serial has no spaces or shell characters"


def _fail(source: str, where: str, message: str) -> InputError:
    return InputError(f"{source}: {where}: {message}")


def _check_fields(entry: Any, where: str, source: str, fields: dict[str, str]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise _fail(source, where, "must be a table")
    unknown = sorted(set(entry) - set(fields))
    if unknown:
        raise _fail(source, where, f"unknown field {unknown[0]!r} (known: {', '.join(fields)})")
    for name in ("address", "profile"):
        if name not in entry:
            raise _fail(source, where, f"missing field {name!r} ({fields[name]})")
        if not isinstance(entry[name], str) or not entry[name].strip():
            raise _fail(source, where, f"field {name!r} must be {fields[name]}, got {entry[name]!r:.60}")
    tags = entry.get("tags", {})
    if not isinstance(tags, dict):
        raise _fail(source, where, f"field 'tags' must be {fields['tags']}, got {tags!r:.60}")
    for k, v in tags.items():
        if not _TAG_NAME.match(k):
            raise _fail(source, where, f"tag name {k!r:.60} must be letters, digits, '_', '.' or '-'")
        if not isinstance(v, str):
            raise _fail(source, where, f"tag {k!r} must be a string, got {v!r:.60}")
    return entry


def _profile(name: str, base: Path, where: str, source: str, cache: dict[str, DeviceProfile]) -> DeviceProfile:
    """A profile by name, or by a .toml path relative to the inventory's folder."""
    key = str((base / name).resolve()) if name.endswith(".toml") else name
    if key not in cache:
        try:
            cache[key] = load_profile(key)
        except InputError as e:
            raise _fail(source, where, f"field 'profile': {e}") from None
    return cache[key]


def load_inventory(path: Path | str) -> Inventory:
    """Read and check ``farm.toml``; :class:`InputError` naming the file, the entry and the field otherwise."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{source}: inventory file not found") from None
    except IsADirectoryError:
        raise InputError(f"{source}: is a folder, not an inventory file") from None
    except UnicodeDecodeError:
        raise InputError(f"{source}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{source}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - set(_TOP))
    if unknown:
        raise InputError(f"{source}: unknown table {unknown[0]!r} (known: [[device]], [[adb_server]])")
    for name, expected in _TOP.items():
        if name in data and not isinstance(data[name], list):
            raise InputError(f"{source}: {name!r} must be {expected}")
    if not data.get("device") and not data.get("adb_server"):
        raise InputError(f"{source}: no [[device]] or [[adb_server]] entries: the farm has no devices")
    profiles: dict[str, DeviceProfile] = {}
    devices: list[FarmDevice] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(data.get("device", []), 1):
        where = f"[[device]] #{i}"
        entry = _check_fields(entry, where, source, _DEVICE_FIELDS)
        address = entry["address"].strip()
        problem = check_address(address)
        if problem:
            raise _fail(source, where, f"field 'address' must be {_DEVICE_FIELDS['address']} ({problem}), "
                                       f"got {address!r:.80}")
        if address in seen:
            raise _fail(source, where, f"address {address!r} is already {seen[address]}")
        seen[address] = where
        devices.append(FarmDevice(address, _profile(entry["profile"], path.parent, where, source, profiles),
                                  dict(entry.get("tags", {})), where))
    servers: list[AdbServerEntry] = []
    for i, entry in enumerate(data.get("adb_server", []), 1):
        where = f"[[adb_server]] #{i}"
        entry = _check_fields(entry, where, source, _SERVER_FIELDS)
        address = entry["address"].strip()
        if not _host_port(address):
            raise _fail(source, where, f"field 'address' must be {_SERVER_FIELDS['address']}, got {address!r:.80}")
        if address in seen:
            raise _fail(source, where, f"address {address!r} is already {seen[address]}")
        seen[address] = where
        servers.append(AdbServerEntry(address, _profile(entry["profile"], path.parent, where, source, profiles),
                                      dict(entry.get("tags", {}))))
    return Inventory(path.resolve(), tuple(devices), tuple(servers))


def list_server(entry: AdbServerEntry, timeout: float = 10.0) -> tuple[list[tuple[str, str]], str | None]:
    """``[(serial, state)]`` that an adb server lists, and the error when it cannot be asked."""
    import adbutils

    host, _, port = entry.address.rpartition(":")
    try:
        client = adbutils.AdbClient(host=host, port=int(port), socket_timeout=timeout)
        return [(d.serial, d.state) for d in client.list()], None
    except (adbutils.AdbError, OSError, ValueError) as e:
        return [], f"cannot list devices on the adb server at {entry.address}: {e}"


def expand(inventory: Inventory) -> tuple[list[FarmDevice], list[str]]:
    """Every device: the ``[[device]]`` entries, then what each ``[[adb_server]]`` lists as ready.

    Returns the devices and warnings (a server that cannot be reached, devices that are offline or
    unauthorized); a device listed twice keeps its ``[[device]]`` entry.
    """
    devices = list(inventory.devices)
    known = {d.address for d in devices}
    warnings: list[str] = []
    for entry in inventory.adb_servers:
        listed, error = list_server(entry)
        if error:
            warnings.append(error)
        for serial, state in listed:
            address = f"{serial}@{entry.address}"
            if state != "device":
                warnings.append(f"{address} is {state}: not used")
            elif address not in known and check_address(address) is None:
                known.add(address)
                devices.append(FarmDevice(address, entry.profile, dict(entry.tags), f"[[adb_server]] {entry.address}"))
    return devices, warnings


def parse_selectors(items: list[str] | None) -> dict[str, str]:
    """``--select TAG=VALUE`` options as a dict; :class:`InputError` for one without ``=``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--select must be TAG=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def select(devices: list[FarmDevice], selectors: dict[str, str], source: str) -> list[FarmDevice]:
    chosen = [d for d in devices if d.matches(selectors)]
    if not chosen:
        want = " ".join(f"{k}={v}" for k, v in selectors.items())
        raise InputError(f"{source}: no device matches --select {want}" if selectors
                         else f"{source}: no device is available (every [[adb_server]] listed none ready)")
    return chosen

