"""Conformance of the virtual reference phone against real ADB clients.

The daemon runs as a subprocess on an ephemeral port (never 5555-5585, which the adb server probes); the
Debian ``adb`` server is private (own port, HOME and TMPDIR inside tmp_path) and is killed at the end.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgedeploy.devices.virtual_phone import VirtualPhone
from edgedeploy.devices.virtual_phone_process import VirtualPhoneProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
ADB = shutil.which("adb")
needs_adb = pytest.mark.skipif(ADB is None, reason="Debian's adb client is not installed (apt-get install adb)")
BIG_MB = 200
BUDGET_MB = 100


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 5037 <= port <= 5585:
            return port


class Phone(VirtualPhoneProcess):
    """A virtual phone subprocess of this checkout; ``serial`` is what ``adb connect`` takes."""

    def __init__(self, sandbox: Path, *args: str) -> None:
        # Test this checkout, whatever is pip-installed.
        super().__init__(sandbox, *args, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
        self.start()
        self.serial = f"127.0.0.1:{self.port}"
        self.tmp = sandbox / "data/local/tmp"


class AdbServer:
    """A private Debian adb server; every call gets ``-P port``."""

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("ANDROID_", "ADB_"))}
        self.env.update(HOME=str(home), TMPDIR=str(home))  # keys and the server log stay in tmp_path
        self.adb("start-server", check=True)

    def adb(self, *args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [ADB, "-P", str(self.port), *args],  # type: ignore[list-item]
            env=self.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=check,
        )  # fmt: skip

    def connect(self, serial: str) -> None:
        out = self.adb("connect", serial, check=True).stdout
        assert "connected to" in out, out
        deadline = time.monotonic() + 10
        while self.adb("-s", serial, "get-state").stdout.strip() != "device":
            assert time.monotonic() < deadline, self.adb("devices").stdout
            time.sleep(0.1)

    def stop(self) -> None:
        self.adb("kill-server")


def _write_random(path: Path, size_mb: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size_mb):
            block = os.urandom(1 << 20)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("virtual_phone")


@pytest.fixture(scope="module")
def phone(workdir: Path) -> Iterator[Phone]:
    p = Phone(workdir / "sandbox", "--budget-mb", str(BUDGET_MB), "--prop", "ro.product.model=RefPhone 12GB")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def adb_server(workdir: Path, phone: Phone) -> Iterator[AdbServer]:
    if ADB is None:
        pytest.skip("Debian's adb client is not installed (apt-get install adb)")
    server = AdbServer(workdir / "adbhome")
    try:
        server.connect(phone.serial)
        yield server
    finally:
        server.stop()


def test_refuses_non_loopback_host(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        VirtualPhone(tmp_path, 0, host="0.0.0.0")


def test_sync_paths_cannot_escape_sandbox(tmp_path: Path) -> None:
    vp = VirtualPhone(tmp_path / "sb", 0)
    assert vp.host_path("/data/local/tmp/a/../b") == vp.root / "data/local/tmp/b"
    (vp.root / "data/local/tmp/out").symlink_to(tmp_path)
    for bad in ("/../etc/passwd", "/data/local/tmp/../../../../etc/passwd", "/data/local/tmp/out/x"):
        with pytest.raises(PermissionError):
            vp.host_path(bad)
    assert vp.rewrite_command("ls /data/local/tmp/x '/sdcard' /data/local/tmpfoo") == (
        f"ls {vp.root}/data/local/tmp/x '{vp.root}/sdcard' /data/local/tmpfoo"
    )


# -- Debian adb --------------------------------------------------------------------------------------------
@needs_adb
def test_adb_shell_exit_code_output_and_props(adb_server: AdbServer, phone: Phone) -> None:
    assert adb_server.adb("-s", phone.serial, "shell", "exit 3").returncode == 3
    r = adb_server.adb("-s", phone.serial, "shell", "echo hi; echo oops >&2")
    assert (r.returncode, r.stdout, r.stderr) == (0, "hi\n", "oops\n")
    assert adb_server.adb("-s", phone.serial, "shell", "getprop ro.product.model").stdout == "RefPhone 12GB\n"
    listing = adb_server.adb("-s", phone.serial, "shell", "getprop").stdout
    assert "[ro.product.model]: [RefPhone 12GB]" in listing
    assert f"[ro.edgedeploy.memtotal_kb]: [{BUDGET_MB * 1024}]" in listing


@needs_adb
def test_adb_push_pull_big_file(adb_server: AdbServer, phone: Phone, tmp_path: Path) -> None:
    src, back = tmp_path / "big.bin", tmp_path / "back.bin"
    digest = _write_random(src, BIG_MB)
    r = adb_server.adb("-s", phone.serial, "push", str(src), "/data/local/tmp/new/dir/big.bin")
    assert r.returncode == 0, r.stderr
    assert _sha256(phone.tmp / "new/dir/big.bin") == digest
    r = adb_server.adb("-s", phone.serial, "pull", "/data/local/tmp/new/dir/big.bin", str(back))
    assert r.returncode == 0, r.stderr
    assert _sha256(back) == digest
    r = adb_server.adb("-s", phone.serial, "shell", "stat -c %s /data/local/tmp/new/dir/big.bin")
    assert r.stdout.strip() == str(BIG_MB << 20)
    (phone.tmp / "new/dir/big.bin").unlink()


@needs_adb
def test_adb_refuses_escaping_paths(adb_server: AdbServer, phone: Phone, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host file")
    (phone.tmp / "link").symlink_to(outside)
    for remote in ("/data/local/tmp/../../../../" + str(outside / "secret"), "/data/local/tmp/link/secret"):
        r = adb_server.adb("-s", phone.serial, "pull", remote, str(tmp_path / "got"))
        assert r.returncode != 0 and not (tmp_path / "got").exists()
    r = adb_server.adb("-s", phone.serial, "push", str(outside / "secret"), "/data/local/tmp/link/planted")
    assert r.returncode != 0 and not (outside / "planted").exists()


@needs_adb
def test_adb_quoted_argument_is_not_executed(adb_server: AdbServer, phone: Phone) -> None:
    (phone.tmp / "canary").write_text("alive")
    arg = "name; rm -rf canary"
    r = adb_server.adb("-s", phone.serial, "shell", f"echo {shlex.quote(arg)}")
    assert r.stdout == arg + "\n"
    assert (phone.tmp / "canary").read_text() == "alive"


@needs_adb
def test_adb_memory_budget_kills_with_137_and_logs(adb_server: AdbServer, phone: Phone) -> None:
    adb_server.adb("-s", phone.serial, "shell", "logcat -c")
    hog = 'python3 -c "b=bytearray(300*2**20); import time; time.sleep(5)"'
    assert adb_server.adb("-s", phone.serial, "shell", hog).returncode == 137
    log = adb_server.adb("-s", phone.serial, "shell", "logcat -d").stdout
    assert "lowmemorykiller: Kill 'python3' (" in log and "uid 2000, oom_score_adj 0 to free " in log
    assert adb_server.adb("-s", phone.serial, "shell", "logcat -c; logcat -d").stdout == ""


@needs_adb
def test_closing_the_stream_kills_the_process(adb_server: AdbServer, phone: Phone) -> None:
    client = subprocess.Popen(
        [ADB, "-P", str(adb_server.port), "-s", phone.serial, "shell", "echo $$; exec sleep 60"],  # type: ignore[list-item]
        env=adb_server.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    pid = int(client.stdout.readline())  # type: ignore[union-attr]
    client.kill()
    client.wait()
    deadline = time.monotonic() + 5
    while _alive(pid):
        assert time.monotonic() < deadline, "device-side process survived its stream"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- adb-shell ---------------------------------------------------------------------------------------------
def _adb_shell_roundtrip(port: int, tmp_path: Path, keys: list | None = None) -> None:
    from adb_shell.adb_device import AdbDeviceTcp

    dev = AdbDeviceTcp("127.0.0.1", port, default_transport_timeout_s=30)
    assert dev.connect(rsa_keys=keys, auth_timeout_s=2)
    try:
        assert dev.shell("echo hi; getprop ro.product.name") == "hi\nedgedeploy_ref\n"
        src, back = tmp_path / "as.bin", tmp_path / "as_back.bin"
        digest = _write_random(src, 8)
        dev.push(str(src), "/data/local/tmp/as/as.bin")
        mode, size, mtime = dev.stat("/data/local/tmp/as/as.bin")
        assert size == 8 << 20 and mode & 0o170000 == 0o100000 and mtime > 0
        assert dev.stat("/data/local/tmp/missing") == (0, 0, 0)
        dev.pull("/data/local/tmp/as/as.bin", str(back))
        assert _sha256(back) == digest
        assert [f.filename for f in dev.list("/data/local/tmp/as")] == [b"as.bin"]
    finally:
        dev.close()


def test_adb_shell_without_auth(phone: Phone, tmp_path: Path) -> None:
    _adb_shell_roundtrip(phone.port, tmp_path)


def test_adb_shell_with_auth(tmp_path: Path) -> None:
    from adb_shell.adb_device import AdbDeviceTcp
    from adb_shell.auth.keygen import keygen
    from adb_shell.auth.sign_pythonrsa import PythonRSASigner
    from adb_shell.exceptions import DeviceAuthError, TcpTimeoutException

    def signer(name: str) -> PythonRSASigner:
        keygen(str(tmp_path / name))
        return PythonRSASigner((tmp_path / f"{name}.pub").read_text(), (tmp_path / name).read_text())

    good, bad = signer("good"), signer("bad")
    (tmp_path / "adb_keys").write_text((tmp_path / "good.pub").read_text() + "\n")
    p = Phone(tmp_path / "sb", "--auth-keys", str(tmp_path / "adb_keys"))
    try:
        _adb_shell_roundtrip(p.port, tmp_path, [good])
        for keys, error in (([bad], TcpTimeoutException), (None, DeviceAuthError)):
            dev = AdbDeviceTcp("127.0.0.1", p.port, default_transport_timeout_s=5)
            with pytest.raises(error):
                dev.connect(rsa_keys=keys, auth_timeout_s=1)
            dev.close()
    finally:
        p.stop()


# -- adbutils through the Debian adb server ----------------------------------------------------------------
@needs_adb
def test_adbutils_through_adb_server(adb_server: AdbServer, phone: Phone, tmp_path: Path) -> None:
    import adbutils

    dev = adbutils.AdbClient(host="127.0.0.1", port=adb_server.port).device(serial=phone.serial)
    r = dev.shell2("echo out; echo err >&2; exit 5", v2=True)
    assert (r.returncode, r.stdout, r.stderr) == (5, "out\n", "err\n")
    assert dev.shell2("echo out; false").returncode == 1
    src, back = tmp_path / "au.bin", tmp_path / "au_back.bin"
    digest = _write_random(src, 8)
    dev.sync.push(src, "/data/local/tmp/au/au.bin")
    assert dev.sync.stat("/data/local/tmp/au/au.bin").size == 8 << 20
    assert [f.path for f in dev.sync.list("/data/local/tmp/au")] == ["au.bin"]
    dev.sync.pull("/data/local/tmp/au/au.bin", back)
    assert _sha256(back) == digest
    assert dev.getprop("ro.product.model") == "RefPhone 12GB"


def test_detached_job_survives_command_but_not_daemon(tmp_path: Path) -> None:
    from adb_shell.adb_device import AdbDeviceTcp

    p = Phone(tmp_path / "sb")
    try:
        dev = AdbDeviceTcp("127.0.0.1", p.port, default_transport_timeout_s=10)
        dev.connect()
        pid = int(dev.shell("sleep 60 >/dev/null 2>&1 & echo $!"))
        dev.close()
        time.sleep(0.2)
        assert _alive(pid)
    finally:
        p.stop()
    deadline = time.monotonic() + 5
    while _alive(pid):
        assert time.monotonic() < deadline, "a job of the virtual phone outlived the daemon"
        time.sleep(0.05)


@needs_adb
def test_adb_exec_in_and_exec_out(adb_server: AdbServer, phone: Phone) -> None:
    r = subprocess.run(
        [ADB, "-P", str(adb_server.port), "-s", phone.serial, "exec-in", "cat > /data/local/tmp/exec_in.txt"],  # type: ignore[list-item]
        env=adb_server.env, input="through stdin\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # exec-in returns once the client has sent stdin and closed; the device command may still be writing.
    deadline = time.monotonic() + 10
    while (out := adb_server.adb("-s", phone.serial, "exec-out", "cat exec_in.txt").stdout) != "through stdin\n":
        assert time.monotonic() < deadline, out
        time.sleep(0.1)


@needs_adb
def test_adb_auth_with_server_key(adb_server: AdbServer, tmp_path: Path) -> None:
    from adb_shell.auth.keygen import keygen

    keygen(str(tmp_path / "foreign"))
    own = (Path(adb_server.env["HOME"]) / ".android/adbkey.pub").read_text()
    (tmp_path / "own_keys").write_text(own + "\n")
    (tmp_path / "foreign_keys").write_text((tmp_path / "foreign.pub").read_text() + "\n")
    trusting = Phone(tmp_path / "sb1", "--auth-keys", str(tmp_path / "own_keys"))
    refusing = Phone(tmp_path / "sb2", "--auth-keys", str(tmp_path / "foreign_keys"))
    try:
        adb_server.connect(trusting.serial)
        assert adb_server.adb("-s", trusting.serial, "shell", "echo ok").stdout == "ok\n"
        adb_server.adb("connect", refusing.serial)
        time.sleep(0.5)
        assert f"{refusing.serial}\tunauthorized" in adb_server.adb("devices").stdout
    finally:
        for p in (trusting, refusing):
            adb_server.adb("disconnect", p.serial)
            p.stop()
