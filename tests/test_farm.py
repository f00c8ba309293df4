"""The device farm (issue #12): inventory checks, leases, and ``farm run`` on three virtual phones.

The phones are virtual phone subprocesses on 127.0.0.1 (stopped by pid); ``farm run`` runs as the real
entry point in a subprocess, so a phone can be stopped while it works and two runs can compete.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from edgedeploy.cli import main
from edgedeploy.devices.adb import AdbTcpDevice
from edgedeploy.devices.base import ConnectionLost
from edgedeploy.farm import leases
from edgedeploy.farm.inventory import expand, load_inventory
from edgedeploy.history import open_history

from .test_virtual_phone import ADB, REPO_ROOT, AdbServer, Phone

FAST = ["--runs", "1", "--warmup", "0", "--prompts", "chat-short"]
ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
REFERENCE = (REPO_ROOT / "profiles" / "reference-12gb.toml").read_text()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny Llamas (different weights): ``tiny-a`` as a host bundle built once for this module, ``tiny-b``
    as a checkpoint folder, which ``farm run`` builds itself."""
    from edgedeploy.compile.build import build_bundle
    from edgedeploy.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("farm-models")
    ckpt_a = make_tiny_checkpoint(root / "hf" / "tiny-a", "llama", dtype="float16", seed=0)
    build_bundle(ckpt_a, root / "tiny-a", target="host", context_window=128, prefill_chunk=32)
    return [root / "tiny-a", make_tiny_checkpoint(root / "tiny-b", "llama", dtype="float16", seed=1)]


def _files(phone_sandbox: Path) -> list[str]:
    """Every file the farm or the profiler left under the phone's /data/local/tmp/edgedeploy."""
    root = phone_sandbox / "data/local/tmp/edgedeploy"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _profile(folder: Path, name: str, budget_mb: int) -> str:
    """A profile file beside the inventory: the reference phone with another budget, building for this host
    (a virtual phone runs host bundles)."""
    text = REFERENCE.replace('name = "reference-12gb"', f'name = "{name}"')
    text = re.sub(r"(?m)^usable_budget_mb = .*$", f"usable_budget_mb = {budget_mb}", text)
    text = re.sub(r'(?m)^target = "android".*$', 'target = "host"', text)
    (folder / f"{name}.toml").write_text(text)
    return f"{name}.toml"


def _inventory(folder: Path, entries: list[tuple[str, str, dict[str, str]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for address, profile, tags in entries:
        tag_text = ", ".join(f'{k} = "{v}"' for k, v in tags.items())
        lines += ["[[device]]", f'address = "{address}"', f'profile = "{profile}"', f"tags = {{ {tag_text} }}", ""]
    path = folder / "farm.toml"
    path.write_text("\n".join(lines))
    return path


def _farm(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "edgedeploy.cli", "farm", *args], env=ENV, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Phones:
    """Virtual phones started by a test, each stopped by pid at its end."""

    def __init__(self, root: Path) -> None:
        self.root, self.started = root, []

    def start(self, name: str, budget_mb: int, *extra: str, sandbox: Path | None = None) -> Phone:
        phone = Phone(sandbox or self.root / f"phone-{name}", "--budget-mb", str(budget_mb), *extra)
        self.started.append(phone)
        return phone

    def stop_all(self) -> None:
        for p in self.started:
            p.stop()


@pytest.fixture
def phones(tmp_path: Path) -> Iterator[Phones]:
    pool = Phones(tmp_path)
    yield pool
    pool.stop_all()


# -- inventory -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "needle"), [
    ('[[device]]\nprofile = "reference-12gb"\n', "[[device]] #1: missing field 'address'"),
    ('[[device]]\naddress = "tcp:127.0.0.1"\nprofile = "reference-12gb"\n', "field 'address' must be"),
    ('[[device]]\naddress = "a b"\nprofile = "reference-12gb"\n', "field 'address' must be"),
    ('[[device]]\naddress = "X@host"\nprofile = "reference-12gb"\n', "the adb server after '@' must be HOST:PORT"),
    ('[[device]]\naddress = "tcp:127.0.0.1:7"\nprofile = "nope-12gb"\n', "field 'profile': unknown device profile"),
    ('[[device]]\naddress = "S1"\nprofile = "reference-12gb"\ncolour = "red"\n', "unknown field 'colour'"),
    ('[[device]]\naddress = "S1"\nprofile = "reference-12gb"\ntags = { ram = 12 }\n', "tag 'ram' must be a string"),
    ('[[device]]\naddress = "S1"\nprofile = "reference-12gb"\n[[device]]\naddress = "S1"\nprofile = "host"\n',
     "[[device]] #2: address 'S1' is already [[device]] #1"),
    ('[[adb_server]]\naddress = "farmhost"\nprofile = "reference-12gb"\n',
     "[[adb_server]] #1: field 'address' must be"),
    ('[[phone]]\naddress = "S1"\n', "unknown table 'phone'"),
    ("", "no [[device]] or [[adb_server]] entries"),
    ("[[device]\n", "not valid TOML"),
])
def test_inventory_is_validated_on_load(text: str, needle: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "farm.toml"
    path.write_text(text)
    rc = main(["farm", "status", "--inventory", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err
    assert str(path) in err and needle in err, err


def test_inventory_addresses_and_selection(tmp_path: Path) -> None:
    profile = _profile(tmp_path, "small-phone", 60)
    path = tmp_path / "farm.toml"
    path.write_text('[[device]]\naddress = "tcp:127.0.0.1:6520"\nprofile = "reference-12gb"\ntags = { ram = "12g" }\n'
                    f'[[device]]\naddress = "R58M@farm-host.example:5037"\nprofile = "{profile}"\n'
                    '[[device]]\naddress = "emulator-5554"\nprofile = "reference-12gb"\n')
    inv = load_inventory(path)
    kinds = [(d.kind, d.spec) for d in inv.devices]
    assert kinds == [("tcp", ("tcp:127.0.0.1:6520", None)), ("remote-adb", ("R58M", "farm-host.example:5037")),
                     ("adb", ("emulator-5554", None))]
    assert inv.devices[1].profile.name == "small-phone"  # a profile file relative to the inventory
    assert [d.address for d in inv.devices if d.matches({"ram": "12g"})] == ["tcp:127.0.0.1:6520"]
    assert len([d for d in inv.devices if d.matches({"profile": "reference-12gb"})]) == 2
    assert inv.lock_dir == tmp_path / ".farm.toml.locks"
    rc = main(["farm", "run", "--inventory", str(path), str(tmp_path), "--select", "ram=16g"])
    assert rc == 2  # no device matches


# -- leases ----------------------------------------------------------------------------------------------


def test_leases_exclude_other_runs_and_expire(phones: Phones, tmp_path: Path) -> None:
    phone = phones.start("a", 500)
    inv = load_inventory(_inventory(tmp_path / "host1", [(f"tcp:127.0.0.1:{phone.port}", "reference-12gb", {})]))
    device = inv.devices[0]
    lease_file = phone.tmp / "edgedeploy" / ".lease"
    other_host = tmp_path / "host2" / ".locks"  # another host: its own lock folder, only the device lease is shared

    held = leases.try_acquire(device, inv.lock_dir, "run-1", ttl=3)
    try:
        data = json.loads(lease_file.read_text())
        assert data["pid"] == os.getpid() and data["run"] == "run-1" and data["token"] == held.token
        assert {"owner", "host", "expiry", "acquired"} <= set(data) and data["expiry"] > time.time()
        with pytest.raises(leases.LeaseBusy, match="another farm run on this host"):
            leases.try_acquire(device, inv.lock_dir, "run-2")  # same host: the flock'ed file
        with pytest.raises(leases.LeaseBusy, match=r"leased on the device by .* pid \d+ \(run run-1\)"):
            leases.try_acquire(device, other_host, "run-2")  # another host: the device lease
        first_expiry = data["expiry"]
        deadline = time.monotonic() + 10
        while json.loads(lease_file.read_text())["expiry"] == first_expiry:  # renewed every ttl/3 while held
            assert time.monotonic() < deadline, "the lease was not renewed"
            time.sleep(0.2)
        assert json.loads(lease_file.read_text())["acquired"] == data["acquired"]
        status = json.loads(_farm("status", "--inventory", str(inv.path), "--json").communicate(timeout=60)[0])
        row = status["devices"][0]
        assert row["reachable"] and row["lease_state"].startswith("held by") and row["host_lock"]["pid"] == os.getpid()
    finally:
        held.release()
    assert not lease_file.exists()  # removed on release

    # An expired lease of a holder on another host is taken over; a live one is not.
    stale = {"owner": "ci@elsewhere", "host": "elsewhere", "pid": 4242, "run": "x", "token": "t0",
             "acquired": 1, "expiry": int(time.time()) - 5}
    lease_file.write_text(json.dumps(stale, sort_keys=True) + "\n")
    taken = leases.try_acquire(device, other_host, "run-3")
    assert taken.took_over and taken.took_over["token"] == "t0"
    taken.release()
    lease_file.write_text(json.dumps({**stale, "expiry": int(time.time()) + 600}, sort_keys=True) + "\n")
    with pytest.raises(leases.LeaseBusy, match="ci@elsewhere pid 4242"):
        leases.try_acquire(device, other_host, "run-3")
    lease_file.unlink()


@pytest.mark.skipif(ADB is None, reason="Debian's adb client is not installed (apt-get install adb)")
def test_adb_server_entry_lists_its_devices(phones: Phones, tmp_path: Path) -> None:
    phone = phones.start("a", 500)
    server = AdbServer(tmp_path / "adbhome")
    try:
        server.connect(phone.serial)
        path = tmp_path / "farm.toml"
        path.write_text(f'[[adb_server]]\naddress = "127.0.0.1:{server.port}"\nprofile = "reference-12gb"\n'
                        'tags = { site = "lab" }\n')
        proc = _farm("status", "--inventory", str(path), "--select", "site=lab", "--json")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        row = json.loads(out)["devices"][0]
        assert row["address"] == f"{phone.serial}@127.0.0.1:{server.port}" and row["kind"] == "remote-adb"
        assert row["reachable"] and row["lease_state"] == "free" and row["tags"] == {"site": "lab"}
        # The lease works the same through the adb server (shell v2 exit codes instead of tcp:'s marker line).
        device = next(iter(expand(load_inventory(path))[0]))
        lease = leases.try_acquire(device, tmp_path / "locks", "run-adb")
        assert json.loads((phone.tmp / "edgedeploy" / ".lease").read_text())["token"] == lease.token
        with pytest.raises(leases.LeaseBusy):
            leases.try_acquire(device, tmp_path / "other-host", "run-other")
        lease.release()
        assert not (phone.tmp / "edgedeploy" / ".lease").exists()
    finally:
        server.stop()


def test_a_phone_that_stops_mid_command_is_connection_lost(phones: Phones) -> None:
    """adb-shell reads b"" from a closed socket and would retry until its read timeout (minutes): the farm
    needs the drop reported at once to move the job to another phone."""
    phone = phones.start("a", 500)
    device = AdbTcpDevice(f"127.0.0.1:{phone.port}")
    threading.Timer(1.0, phone.stop).start()
    t0 = time.monotonic()
    with pytest.raises(ConnectionLost):
        device.shell("sleep 60", timeout=20)
    assert time.monotonic() - t0 < 15
    device.close()


# -- farm run ----------------------------------------------------------------------------------------------


def test_farm_run_three_phones_one_drops_mid_job(models: list[Path], phones: Phones, tmp_path: Path) -> None:
    """A and B share a profile (budgets 3000 and 2000 MiB); C has a 60 MiB budget, so its pairs FAIL (exit 1).
    B is stopped while it runs its first job: that pair finishes on A, and so does B's other pair. ``tiny-b``
    is a checkpoint: built once, for the one target both profiles need."""
    a, b, c = (phones.start(n, mb) for n, mb in (("a", 3000), ("b", 2000), ("c", 60)))
    folder = tmp_path / "inv"
    folder.mkdir()
    big, small = _profile(folder, "virtual-12gb", 8192), _profile(folder, "small-phone", 60)
    addr = {n: f"tcp:127.0.0.1:{p.port}" for n, p in (("a", a), ("b", b), ("c", c))}
    inv = _inventory(folder, [(addr["a"], big, {"name": "a"}), (addr["b"], big, {"name": "b"}),
                              (addr["c"], small, {"name": "c"})])
    out = tmp_path / "out"
    history = tmp_path / "history.sqlite"
    proc = _farm("run", "--inventory", str(inv), *map(str, models), *FAST, "--context", "128", "--prefill-chunk",
                 "32", "--out", str(out), "--json", "--history", str(history))
    b_runs = b.tmp / "edgedeploy" / "runs"
    deadline = time.monotonic() + 240
    while proc.poll() is None and not any(b_runs.glob("*/prompt.json")):
        assert time.monotonic() < deadline, "B never started a run"
        time.sleep(0.02)
    b_port = b.port
    b.stop()  # in the middle of B's first job: the runner's prompt is on the phone
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 1, stderr[-3000:]
    result = json.loads(stdout)
    assert result == json.loads((out / "farm.json").read_text())
    pairs = {(p["model"], p["device"]): p for p in result["pairs"]}
    assert len(pairs) == 6 and all(p["verdict"] in ("PASS", "FAIL") for p in pairs.values()), result["pairs"]
    for m in ("tiny-a", "tiny-b"):
        pa, pb, pc = pairs[(m, addr["a"])], pairs[(m, addr["b"])], pairs[(m, addr["c"])]
        assert pa["verdict"] == "PASS" and pa["ran_on"] == addr["a"] and len(pa["attempts"]) == 1
        assert pc["verdict"] == "FAIL" and pc["ran_on"] == addr["c"] and "killed" in " ".join(pc["reasons"])
        # B's pairs: tried on B first, finished on A (the other phone with B's profile), not on C.
        assert pb["verdict"] == "PASS" and pb["ran_on"] == addr["a"], pb
        assert pb["devices_tried"] == [addr["b"], addr["a"]] and pb["attempts"][-1]["outcome"] == "done"
        assert pb["measured_peak_bytes"] > 0 and pb["decode_tok_s"]["chat-short"] > 0
    outcomes = sorted(pairs[(m, addr["b"])]["attempts"][0]["outcome"] for m in ("tiny-a", "tiny-b"))
    assert outcomes == ["dropped", "unreachable"]  # the job cut short, then B's next one could not connect
    interrupted = next(pairs[(m, addr["b"])] for m in ("tiny-a", "tiny-b")
                       if pairs[(m, addr["b"])]["attempts"][0]["outcome"] == "dropped")
    assert interrupted["model"] == "tiny-a"  # B's first job
    devices = {d["address"]: d for d in result["devices"]}
    assert devices[addr["b"]]["health"] == "unhealthy" and devices[addr["b"]]["failures"] == 2
    assert devices[addr["a"]]["health"] == devices[addr["c"]]["health"] == "ok"
    assert result["matrix"]["tiny-a"][addr["b"]] == "PASS" and result["matrix"]["tiny-b"][addr["c"]] == "FAIL"
    md = (out / "farm.md").read_text()
    assert f"PASS (ran on {addr['a']})" in md and "unhealthy" in md
    junit = ET.parse(out / "farm.junit.xml").getroot()
    assert len(junit.findall("testcase")) == 6 and len(junit.findall(".//failure")) == 2
    assert json.loads((out / "pairs" / f"tiny-a@{addr['a'].replace(':', '_')}" / "results.json").read_text())["verdict"]
    assert "<table" in (out / "farm.html").read_text()
    assert [p.name for p in (out / "bundles").iterdir()] == ["tiny-b-float16-host"]  # one build for both profiles
    with open_history(history) as h:  # every pair in one batch of the history, on the device it ran on
        batch = h.newest_batch()
        assert sorted(r.id for r in batch) == sorted(p["history_id"] for p in result["pairs"])
        assert {r.device_serial for r in batch} == {addr["a"], addr["c"]}

    # Nothing is left on the phones that stayed up; B's leftovers wait for the next lease on it.
    assert _files(a.sandbox) == [] and _files(c.sandbox) == []
    assert devices[addr["b"]]["cleanup"].startswith("pending")
    left = _files(b.sandbox)
    assert any(f.startswith("bundles/tiny-a/") for f in left) and any(f.startswith(".farm/") for f in left)
    phones.start("b", 2000, "--port", str(b_port), sandbox=b.sandbox)  # B comes back on the same port
    assert main(["farm", "clean", "--inventory", str(inv)]) == 0
    assert _files(b.sandbox) == []


def test_pairs_no_device_could_run_exit_2(models: list[Path], tmp_path: Path, capsys) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    inv = _inventory(tmp_path / "inv", [(f"tcp:127.0.0.1:{port}", "reference-12gb", {})])
    out = tmp_path / "out"
    rc = main(["farm", "run", "--inventory", str(inv), str(models[0]), *FAST, "--out", str(out), "--no-history"])
    assert rc == 2, capsys.readouterr().err
    pair = json.loads((out / "farm.json").read_text())["pairs"][0]
    assert pair["verdict"] == "not run" and pair["ran_on"] is None
    assert "no device with profile reference-12gb left to try" in pair["reason"]
    assert pair["attempts"][0]["outcome"] == "unreachable" and "cannot connect" in pair["attempts"][0]["message"]
    assert "not run" in (out / "farm.md").read_text()


def _intervals(result: dict, tag: str) -> list[tuple[str, float, float, str]]:
    return [(a["device"], a["started"], a["ended"], f"{tag}:{p['model']}")
            for p in result["pairs"] for a in p["attempts"] if a["started"] is not None]


def test_two_farm_runs_never_share_a_device(models: list[Path], phones: Phones, tmp_path: Path) -> None:
    a, b = phones.start("a", 3000), phones.start("b", 2500)
    inv = _inventory(tmp_path / "inv", [(f"tcp:127.0.0.1:{a.port}", "reference-12gb", {}),
                                        (f"tcp:127.0.0.1:{b.port}", "reference-12gb", {})])
    procs = [_farm("run", "--inventory", str(inv), str(models[0]), *FAST, "--out", str(tmp_path / f"out{i}"),
                   "--json", "--no-history") for i in (1, 2)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout))
    spans = _intervals(results[0], "run1") + _intervals(results[1], "run2")
    assert len(spans) == 4  # 2 runs x 2 devices, one attempt each
    for device in {s[0] for s in spans}:
        mine = sorted((s for s in spans if s[0] == device), key=lambda s: s[1])
        for before, after in zip(mine, mine[1:], strict=False):
            assert before[2] <= after[1], f"{device}: {before[3]} ran until {before[2]} but {after[3]} began {after[1]}"
    # They did compete: one run waited for a lease the other held.
    waited = [a["lease_wait_s"] for r in results for p in r["pairs"] for a in p["attempts"]]
    assert max(waited) > 0.3, waited
    assert _files(a.sandbox) == [] and _files(b.sandbox) == []
