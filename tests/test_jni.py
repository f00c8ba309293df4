"""The app harness's JNI bridge, on the host JVM.

``libedgedeploy_jni.so`` is built from the same sources as the CLI runner (against the JDK's ``jni.h``)
and loaded by the app's own ``RunnerBridge.java``; a plain Java driver calls its native method twice in
one JVM (as the Activity does for ``runs`` > 1) on a tiny host bundle.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from edgedeploy.runtime import native
from tests.test_native_runner import (  # noqa: F401 - session fixtures shared with the runner tests
    PROMPT,
    family_bundles,
    host_runner_build,
    run_python,
    write_prompt,
)

APP_JAVA = Path(__file__).resolve().parents[1] / "android_template" / "app" / "harness" / "src" / "main" / "java"
BRIDGE = APP_JAVA / "ai" / "edgedeploy" / "harness" / "RunnerBridge.java"

DRIVER = """
import ai.edgedeploy.harness.RunnerBridge;

public class HostDriver {
    public static void main(String[] args) {
        for (int i = 0; i < 2; i++) {
            System.out.println(RunnerBridge.run(args));
        }
        System.out.println(RunnerBridge.run(new String[] {"--bogus"}));
    }
}
"""


@pytest.fixture(scope="module")
def java_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("javac", "java"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (Debian package openjdk-17-jdk-headless)")
    out = tmp_path_factory.mktemp("jni-classes")
    (out / "HostDriver.java").write_text(DRIVER)
    subprocess.run(["javac", "-d", str(out), str(BRIDGE), str(out / "HostDriver.java")], check=True,
                   capture_output=True, text=True)
    return out


def test_jni_bridge_on_host_jvm(java_classes: Path, host_runner_build: native.RunnerBuild,  # noqa: F811
                                family_bundles: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    assert host_runner_build.jni is not None and host_runner_build.jni.is_file()
    bundle = family_bundles["phi"]
    prompt = write_prompt(tmp_path / "p.json", PROMPT, max_new_tokens=10, stop_token_ids=[])
    proc = subprocess.run(["java", f"-Djava.library.path={host_runner_build.jni.parent}", "-cp", str(java_classes),
                           "HostDriver", str(bundle), "--prompt-file", str(prompt), "--threads", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert len(lines) == 3
    py = run_python(bundle, prompt, "--threads", "2")
    for line in lines[:2]:
        assert line["error"] is None and line["runner"] == "native"
        assert line["token_ids"] == py["token_ids"] and len(line["token_ids"]) == 10
        assert set(line) == set(py) - {"exit_code"}
    assert lines[0]["pid"] == lines[1]["pid"]  # one process: the JVM
    assert lines[2]["error_kind"] == "input" and "unknown option --bogus" in lines[2]["error"]


def test_jni_bridge_main_entry(java_classes: Path, host_runner_build: native.RunnerBuild,  # noqa: F811
                               family_bundles: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """``RunnerBridge.main`` prints one result line, an error line for a missing bundle."""
    prompt = write_prompt(tmp_path / "p.json", [1, 2, 3])
    proc = subprocess.run(["java", f"-Djava.library.path={host_runner_build.jni.parent}", "-cp", str(java_classes),
                           "ai.edgedeploy.harness.RunnerBridge", str(tmp_path / "nobundle"), "--prompt-file",
                           str(prompt)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout)
    assert line["error_kind"] == "input" and "no such bundle folder" in line["error"]
