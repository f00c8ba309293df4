"""The error-shape matrix (issue #11): bad input and device/tool errors end with exit code 2 (3: the runner
failed) and ONE ``error:`` line that names the problem, never a traceback (README, "Exit codes").

Each case runs ``edgedeploy.cli.main(argv)`` in-process; two run the real entry point in a subprocess.
"""

from __future__ import annotations

import copy
import errno
import json
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgedeploy.cli import main
from edgedeploy.errors import EdgeDeployError, InputError
from edgedeploy.report.results import RESULTS, find_problem, load_results

from .conftest import REFERENCE_CONFIGS

PHI2 = str(REFERENCE_CONFIGS / "phi-2")


# -- how an error must look -------------------------------------------------------------------------

def assert_one_error_line(rc: int, out: str, err: str, code: int, needle: str, chatty: bool = False) -> str:
    """Exit ``code``, no traceback, exactly one ``error:`` line containing ``needle`` and ending stderr.

    ``chatty`` commands (profile) may print progress lines before it; all others print nothing else.
    Returns the error line.
    """
    assert "Traceback" not in out + err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err  # nothing after the error (a wrapped second half would be)
    if not chatty:
        assert len(lines) == 1, err
    assert needle in errors[0], err
    assert rc == code, err
    return errors[0]


def run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# -- a results file the renderers accept, and ways to spoil it -----------------------------------------

def valid_results(verdict: str = "PASS") -> dict:
    """The smallest results file every renderer accepts: the keys the profiler writes that they read."""
    run = {"peak_rss_bytes": 90_000_000, "token_ids": [1, 2], "gpu_peak_bytes": 0}
    stat = {"median": 1.0, "stdev": 0.0, "min": 1.0, "max": 1.0, "n": 2}
    model = {
        "model": "tiny", "verdict": verdict, "reasons": ["all checks passed"],
        "manifest": {"architecture": "LlamaForCausalLM", "dtype": "float16", "target": "host", "parameters": 1000,
                     "weights_bytes": 2000, "context_window": 128, "prefill_chunk": 32},
        "runner": {"kind": "python", "abi": "x86_64", "elf_machine": None},
        "push": {"files_sent": 3, "files_skipped": 0, "mb_per_s": 12.5},
        "prompts": [{"name": "chat-short", "prompt_tokens": 9, "clipped_from": None, "warmup": [run], "runs": [run],
                     "summary": {"ttft_s": stat, "prefill_tok_s": stat, "decode_tok_s": {}, "load_s": stat}}],
        "checks": [{"name": "run", "status": verdict, "message": "2 runs completed"}],
        "estimate": {"peak_bytes": 100_000_000}, "measured_peak_bytes": 90_000_000, "peak_error_pct": 11.1,
        "budget_bytes": 8 * 2**30, "headroom_bytes": 1, "device": {"model": "Reference 12GB"},
    }
    return {"schema_version": 1, "kind": "profile", "created": "2025-01-01T00:00:00", "verdict": verdict,
            "profile": {"name": "reference-12gb"}, "device": {"serial": "local"}, "models": [model]}


def _spoiled(edit: Callable[[dict], None]) -> str:
    data = copy.deepcopy(valid_results())
    edit(data)
    return json.dumps(data)


# -- the matrix ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """``argv`` with ``{tmp}`` for the test's folder, ``{bundle}`` for a copy of the tiny host bundle and
    ``{junk}`` for the port of a TCP server that answers like an HTTP server, not like adb."""

    argv: tuple[str, ...]
    needle: str
    code: int = 2
    #: Files the argv names: name -> text (or bytes) written under {tmp} before the run.
    files: tuple[tuple[str, str | bytes], ...] = ()
    chatty: bool = False
    needs: str = ""  # a program on PATH without which the case skips (README: name the missing package)


def case(*argv: str, needle: str, **kw: object) -> Case:
    return Case(tuple(argv), needle, **kw)  # type: ignore[arg-type]


def report(content: str | bytes, *extra: str, needle: str, name: str = "results.json", **kw: object) -> Case:
    """``edgedeploy report`` on a file holding ``content``."""
    return case("report", f"{{tmp}}/{name}", *extra, needle=needle, files=((name, content),), **kw)


DEEP = "[" * 5000 + "]" * 5000

CASES: dict[str, Case] = {
    # argument level: one line from argparse, exit 2, before any file or device is touched
    "run max-new-tokens -1": case("run", "B", "--max-new-tokens", "-1",
                                  needle="argument --max-new-tokens: must be an integer >= 0, got '-1'"),
    "run max-new-tokens 1.5": case("run", "B", "--max-new-tokens", "1.5", needle="--max-new-tokens"),
    "run threads -1": case("run", "B", "--threads", "-1", needle="argument --threads: must be an integer >= 1"),
    "run threads 0": case("run", "B", "--threads", "0", needle="--threads: must be an integer >= 1, got '0'"),
    "run threads word": case("run", "B", "--threads", "all", needle="--threads: must be an integer >= 1, got 'all'"),
    "profile threads 0": case("profile", "B", "--threads", "0", needle="--threads: must be an integer >= 1"),
    "profile timeout -1": case("profile", "B", "--timeout", "-1", needle="--timeout: must be a number > 0"),
    "profile timeout 0": case("profile", "B", "--timeout", "0", needle="--timeout: must be a number > 0, got '0'"),
    "profile timeout nan": case("profile", "B", "--timeout", "nan", needle="--timeout: must be a number > 0"),
    "profile timeout inf": case("profile", "B", "--timeout", "inf", needle="got 'inf'"),
    "profile runs 0": case("profile", "B", "--runs", "0", needle="--runs: must be an integer >= 1, got '0'"),
    "profile runs -1": case("profile", "B", "--runs", "-1", needle="--runs: must be an integer >= 1"),
    "profile warmup -1": case("profile", "B", "--warmup", "-1", needle="--warmup: must be an integer >= 0"),
    "profile cooldown -1": case("profile", "B", "--cooldown", "-1", needle="--cooldown: must be a number >= 0"),
    "profile cooldown nan": case("profile", "B", "--cooldown", "nan", needle="--cooldown: must be a number >= 0"),
    "phone port 70000": case("virtual-phone", "--port", "70000",
                             needle="--port: must be an integer from 0 to 65535, got '70000'"),
    "phone port -1": case("virtual-phone", "--port", "-1", needle="--port: must be an integer from 0 to 65535"),
    "phone budget -5": case("virtual-phone", "--budget-mb", "-5", needle="--budget-mb: must be a number > 0"),
    "phone budget nan": case("virtual-phone", "--budget-mb", "nan", needle="--budget-mb: must be a number > 0"),
    "phone disk -5": case("virtual-phone", "--disk-mb", "-5", needle="--disk-mb: must be a number > 0"),
    "phone disk nan": case("virtual-phone", "--disk-mb", "nan", needle="--disk-mb: must be a number > 0"),
    "estimate context 0": case("estimate", PHI2, "--context", "0", needle="--context: must be an integer >= 1"),
    "estimate chunk -1": case("estimate", PHI2, "--prefill-chunk", "-1", needle="--prefill-chunk: must be an"),
    "build context -8": case("build", "M", "--context", "-8", needle="--context: must be an integer >= 1"),
    "build chunk 0": case("build", "M", "--prefill-chunk", "0", needle="--prefill-chunk: must be an integer >= 1"),
    "no command": case(needle="the following arguments are required: command"),
    "unknown command": case("deploy", needle="invalid choice: 'deploy'"),
    "unknown option": case("inspect", PHI2, "--fast", needle="unrecognized arguments: --fast"),
    "report bad format": case("report", "r.json", "--format", "pdf", needle="invalid choice: 'pdf'"),
    # report: the results file is checked once, naming the file and the key
    "results lack keys": report('{"verdict": "PASS"}', needle="results.json: not an edgedeploy results file: "
                                "missing key 'profile'"),
    "results lack a nested key": report(_spoiled(lambda d: d["models"][0]["manifest"].pop("dtype")),
                                        needle="missing key 'models[0].manifest.dtype'"),
    "results lack a run list": report(_spoiled(lambda d: d["models"][0]["prompts"][0].pop("runs")),
                                      needle="missing key 'models[0].prompts[0].runs'"),
    "verdict is a number": report(_spoiled(lambda d: d.update(verdict=1)),
                                  needle="'verdict' must be a string, got an integer"),
    "models is an object": report(_spoiled(lambda d: d.update(models={})),
                                  needle="'models' must be a list, got an object"),
    "parameters is a string": report(_spoiled(lambda d: d["models"][0]["manifest"].update(parameters="1B")),
                                     needle="'models[0].manifest.parameters' must be a number, got a string"),
    "a boolean for a number": report(_spoiled(lambda d: d["models"][0]["push"].update(files_sent=True)),
                                     "--format", "junit", needle="files_sent' must be an integer, got a boolean"),
    "a check message is null": report(_spoiled(lambda d: d["models"][0]["checks"][0].update(message=None)),
                                      "--format", "html", needle="checks[0].message' must be a string, got null"),
    "a stat lacks its median": report(_spoiled(lambda d: d["models"][0]["prompts"][0]["summary"].update(
                                      ttft_s={"n": 1})), needle="summary.ttft_s.median'"),
    "results not an object": report("[]", needle="results.json: results file must hold a JSON object"),
    "results a string": report('"PASS"', needle="must hold a JSON object"),
    "results deeply nested": report(DEEP, needle="results.json"),
    "results deep inside an object": report('{"verdict": ' + DEEP + "}", needle="results.json"),
    "results not JSON": report('{"verdict": "PASS", ', needle="results.json: results file is not valid JSON"),
    "results not UTF-8": report(b"\xff\xfe{}", needle="results.json"),
    "results empty": report("", needle="results.json"),
    "results newer schema": report(_spoiled(lambda d: d.update(schema_version=99)), needle="schema_version 99"),
    "results missing": case("report", "{tmp}/none.json", needle="none.json: cannot read results file"),
    "results a folder": case("report", "{tmp}", needle="expected a file"),
    "markup in a file name": report("{}", needle="[red]results.json: not an edgedeploy", name="[red]results.json"),
    "report out is not writable": report(json.dumps(valid_results()), "--out", "{tmp}/results.json/r.md",
                                         needle="r.md: Not a directory"),
    # run: tokenizer, runner input errors and a library that is not a model
    "corrupt tokenizer.json": case("run", "{bundle}", "--prompt", "hello", needle="tokenizer.json: cannot load "
                                   "the tokenizer", files=(("bundle/tokenizer.json", '{"model": {"type": "BPE", '),)),
    "prompt ids outside the vocabulary": case("run", "{bundle}", "--prompt-file", "{tmp}/ids.json",
                                              needle="runner: token id 99999 is outside the vocabulary",
                                              files=(("ids.json", "[1, 99999]"),)),
    "prompt file not JSON": case("run", "{bundle}", "--prompt-file", "{tmp}/ids.json", needle="not valid JSON",
                                 files=(("ids.json", "[1, 2"),)),
    # devices: adb-shell (tcp:) and adbutils (adb server) failures
    "tcp device speaks HTTP": case("profile", "B", "--device", "tcp:127.0.0.1:{junk}",
                                   needle="did not complete the ADB handshake"),
    "tcp address without port": case("profile", "B", "--device", "tcp:localhost", needle="must be HOST:PORT"),
    "adb server speaks HTTP": case("profile", "B", "--adb-server", "127.0.0.1:{junk}", "--device", "emulator-5554",
                                   needle="cannot list devices on the adb server"),
    "adb server address bad": case("profile", "B", "--adb-server", "localhost", "--device", "x",
                                   needle="--adb-server must be HOST:PORT"),
    # native build: the build folder cannot be made (a file is in the way)
    "package out under a file": case("package", "--abi", "host", "--out", "{tmp}/ids.json/runner",
                                     needle="creating the build folder", files=(("ids.json", "[]"),), needs="cmake"),
}


class JunkServer:
    """A loopback TCP server that answers anything with an HTTP error: a port that is not adb."""

    REPLY = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"

    def __init__(self, reply: bytes = REPLY) -> None:
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def junk() -> Iterator[JunkServer]:
    server = JunkServer()
    yield server
    server.close()


def _prepare(c: Case, tmp: Path, request: pytest.FixtureRequest) -> list[str]:
    """Write the case's files and fill in its argv."""
    if c.needs and not shutil.which(c.needs):
        pytest.skip(f"needs {c.needs} (Debian package {c.needs})")
    subs = {"{tmp}": str(tmp)}
    if any("{bundle}" in a for a in c.argv):
        subs["{bundle}"] = str(shutil.copytree(request.getfixturevalue("host_bundle"), tmp / "bundle"))
    if any("{junk}" in a for a in c.argv):
        subs["{junk}"] = str(request.getfixturevalue("junk").port)
    for name, content in c.files:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = []
    for a in c.argv:
        for key, value in subs.items():
            a = a.replace(key, value)
        argv.append(a)
    return argv


@pytest.mark.parametrize("name", list(CASES))
def test_error_shape(name: str, capsys, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    c = CASES[name]
    argv = _prepare(c, tmp_path, request)
    rc, out, err = run_main(capsys, argv)
    assert_one_error_line(rc, out, err, c.code, c.needle, c.chatty)


def test_argument_errors_print_no_usage_block(capsys) -> None:
    """argparse's own error prints a usage block first; ours is the one line alone."""
    rc, out, err = run_main(capsys, ["profile", "B", "--runs", "0"])
    assert rc == 2 and "usage:" not in err and out == ""
    assert err.startswith("error: edgedeploy profile: argument --runs")


def test_valid_options_still_accepted(capsys) -> None:
    """The validators refuse only what they should: 0 new tokens (prefill only) and a 1-token chunk are fine."""
    assert main(["estimate", PHI2, "--context", "1", "--prefill-chunk", "1", "--json"]) in (0, 1)
    assert json.loads(capsys.readouterr().out)["estimate"]["context_window"] == 1
    from edgedeploy.cli import NON_NEGATIVE_INT, PORT, POSITIVE_NUMBER

    assert NON_NEGATIVE_INT("0") == 0 and PORT("0") == 0 and PORT("65535") == 65535
    assert POSITIVE_NUMBER("0.5") == 0.5 and POSITIVE_NUMBER("1e3") == 1000.0


# -- report: the schema check lets real shapes through ----------------------------------------------

@pytest.mark.parametrize("fmt", ["md", "junit", "json", "html"])
@pytest.mark.parametrize("verdict,code", [("PASS", 0), ("FAIL", 1)])
def test_valid_results_render(fmt: str, verdict: str, code: int, capsys, tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    data = valid_results(verdict)
    data["models"][0]["future_field"] = {"nested": [[[1]]]}  # keys no renderer reads are not checked
    path.write_text(json.dumps(data))
    rc, out, err = run_main(capsys, ["report", str(path), "--format", fmt])
    assert rc == code and err == "" and "tiny" in out  # the model's name, in every format


def test_schema_check_follows_the_schema_not_the_data() -> None:
    """A value nested far below a checked key costs nothing: the walk is as deep as the schema."""
    data = valid_results()
    deep: list = []
    for _ in range(50):
        deep = [deep]
    data["device"]["extra"] = deep
    assert find_problem(data, RESULTS) is None
    data["models"][0]["prompts"][0]["summary"]["decode_tok_s"] = None  # null stands for "no data" too
    assert find_problem(data, RESULTS) is None


def test_load_results_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(_spoiled(lambda d: d["models"][0]["runner"].pop("kind")))
    with pytest.raises(InputError, match=r"r\.json: not an edgedeploy results file: missing key 'models\[0\]\.runner"
                                         r"\.kind'"):
        load_results(path)


# -- tokenizers ---------------------------------------------------------------------------------------

def test_tokenizer_failure_while_encoding_names_file_and_prompt() -> None:
    from edgedeploy.profile.prompts import PromptSpec, tokenize_prompt

    class Broken:
        def encode(self, text: str, add_special_tokens: bool = True) -> object:
            raise Exception("normalizer exploded")  # what the tokenizers library raises: a bare Exception

    with pytest.raises(InputError, match=r"b/tokenizer.json: cannot encode prompt 'chat' \(normalizer exploded\)"):
        tokenize_prompt(PromptSpec("chat", "hi", 8), Broken(), 128, source="b/tokenizer.json")


# -- the runner: its own errors keep their exit code ------------------------------------------------

def _not_a_model_library(bundle: Path) -> None:
    """Replace model.so by a valid shared library of the same size that holds no TVM module."""
    src = bundle / "stub.c"
    src.write_text("int edgedeploy_stub(void) { return 1; }\n")
    stub = bundle / "stub.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(stub), str(src)], check=True)
    size = (bundle / "model.so").stat().st_size
    data = stub.read_bytes()
    assert len(data) <= size
    (bundle / "model.so").write_bytes(data + b"\0" * (size - len(data)))  # sizes are checked even with --no-verify
    src.unlink()
    stub.unlink()


def test_runner_runtime_failure_is_exit_3_input_failure_exit_2() -> None:
    from edgedeploy.runtime.launch import raise_for_error

    with pytest.raises(EdgeDeployError) as crash:
        raise_for_error({"error": "KV cache kernel failed", "error_kind": "runtime", "exit_code": 3})
    assert crash.value.exit_code == 3 and str(crash.value) == "runner failed: KV cache kernel failed"
    with pytest.raises(EdgeDeployError) as bad:
        raise_for_error({"error": "prompt too long", "error_kind": "input", "exit_code": 2})
    assert bad.value.exit_code == 2
    assert raise_for_error({"error": None, "token_ids": [1]}) == {"error": None, "token_ids": [1]}


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc (Debian package gcc)")
def test_runner_failure_names_the_library_not_a_python_exception(host_bundle: Path, tmp_path: Path, capsys) -> None:
    bundle = Path(shutil.copytree(host_bundle, tmp_path / "b"))
    _not_a_model_library(bundle)
    rc, out, err = run_main(capsys, ["run", str(bundle), "--prompt", "hi", "--no-verify"])
    line = assert_one_error_line(rc, out, err, 2, "model.so")
    assert "AttributeError" not in line


# -- errors from libraries and peers, wrapped where they are called -----------------------------------

def test_adb_server_with_garbled_reply(capsys) -> None:
    server = JunkServer(reply=b"OKAYzzzz")  # "OKAY", then a length that is not hex
    try:
        rc, out, err = run_main(capsys, ["profile", "B", "--adb-server", f"127.0.0.1:{server.port}",
                                         "--device", "emulator-5554"])
    finally:
        server.close()
    assert_one_error_line(rc, out, err, 2, "adb server")


def _checkpoint_with_corrupt_tokenizer(tiny_models: dict[str, Path], tmp: Path, eos: bool) -> Path:
    """The tiny Llama with a truncated tokenizer.json; without ``eos`` its tokenizer_config names no eos
    token, so the build copies the file into the bundle without parsing it."""
    folder = Path(shutil.copytree(tiny_models["llama"], tmp / "ck"))
    (folder / "tokenizer.json").write_text('{"model": ')
    if not eos:
        (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    return folder


def test_build_with_corrupt_tokenizer(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    folder = _checkpoint_with_corrupt_tokenizer(tiny_models, tmp_path, eos=True)
    rc, out, err = run_main(capsys, ["build", str(folder), "--out", str(tmp_path / "b"), "--context", "64",
                                     "--prefill-chunk", "16"])
    assert_one_error_line(rc, out, err, 2, "tokenizer.json", chatty=True)


def test_profile_with_corrupt_tokenizer(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    from edgedeploy.compile.build import build_bundle

    bundle = tmp_path / "b"
    build_bundle(_checkpoint_with_corrupt_tokenizer(tiny_models, tmp_path, eos=False), bundle, context_window=64,
                 prefill_chunk=16)
    rc, out, err = run_main(capsys, ["profile", str(bundle), "--prompts", "chat-short", "--runs", "1",
                                     "--warmup", "0", "--out", str(tmp_path / "r")])
    assert_one_error_line(rc, out, err, 2, "tokenizer.json", chatty=True)


# -- native link step: the disk filling up, and a folder that cannot hold the output ------------------

AARCH64_CC = "aarch64-linux-gnu-gcc"


@pytest.fixture
def model_tar(tmp_path: Path) -> Path:
    """A model.tar holding one small aarch64 object, as a linux-aarch64 bundle ships its library."""
    if not shutil.which(AARCH64_CC):
        pytest.skip("needs aarch64-linux-gnu-gcc (Debian package g++-aarch64-linux-gnu)")
    (tmp_path / "lib0.c").write_text("int edgedeploy_add(int x) { return x + 1; }\n")
    subprocess.run([AARCH64_CC, "-c", "-fPIC", "-o", str(tmp_path / "lib0.o"), str(tmp_path / "lib0.c")], check=True)
    tar = tmp_path / "model.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(tmp_path / "lib0.o", arcname="lib0.o")
    return tar


def _assert_build_error(e: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in text, text
    for needle in needles:
        assert needle in text, text


def test_link_file_size_limit_is_one_line(model_tar: Path, tmp_path: Path) -> None:
    """The linker hits a file size limit (RLIMIT_FSIZE, signal ignored) and fails as on a full disk."""
    from edgedeploy.runtime import native

    # A compiler wrapper that lowers the limit and execs the real one; Python ignores SIGXFSZ and exec
    # keeps it ignored, so ld sees EFBIG from write() and reports it, as it reports ENOSPC.
    wrapper = tmp_path / "g++-limited"
    wrapper.write_text(f"#!{sys.executable}\nimport os, resource, sys\n"
                       "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
                       f"os.execvp({native.AARCH64_CXX!r}, [{native.AARCH64_CXX!r}, *sys.argv[1:]])\n")
    wrapper.chmod(0o755)
    if not shutil.which(native.AARCH64_CXX):
        pytest.skip("needs aarch64-linux-gnu-g++ (Debian package g++-aarch64-linux-gnu)")
    with pytest.raises(native.NativeBuildFailed) as e:
        native.link_aarch64_library(model_tar, tmp_path / "model.so", cxx=str(wrapper))
    _assert_build_error(e, "linking model.tar into", "File too large")
    assert not (tmp_path / "model.so").exists() and not list(tmp_path.glob(".model.so.tmp*"))


def test_link_output_folder_unusable_is_one_line(model_tar: Path, tmp_path: Path) -> None:
    from edgedeploy.runtime import native

    if not shutil.which(native.AARCH64_CXX):
        pytest.skip("needs aarch64-linux-gnu-g++ (Debian package g++-aarch64-linux-gnu)")
    (tmp_path / "afile").write_text("")
    with pytest.raises(native.NativeBuildFailed) as e:
        native.link_aarch64_library(model_tar, tmp_path / "afile" / "model.so")
    _assert_build_error(e, "linking model.tar", "Not a directory")
    assert "collect2" not in str(e.value)  # the linker's own line, not the driver's summary


def test_disk_full_while_extracting_objects(model_tar: Path, tmp_path: Path, monkeypatch) -> None:
    from edgedeploy.runtime import native

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/edgedeploy-link-x/lib0.o")

    monkeypatch.setattr(tarfile.TarFile, "extractall", full)
    with pytest.raises(native.NativeBuildFailed) as e:
        native.link_aarch64_library(model_tar, tmp_path / "model.so", cxx=sys.executable)
    _assert_build_error(e, "extracting the objects of model.tar failed: No space left on device", "lib0.o")


def test_corrupt_model_tar(tmp_path: Path) -> None:
    from edgedeploy.runtime import native

    tar = tmp_path / "model.tar"
    tar.write_bytes(b"not a tar archive" * 100)
    with pytest.raises(InputError, match="model.tar: not a readable tar archive"):
        native.link_aarch64_library(tar, tmp_path / "model.so", cxx=sys.executable)


@pytest.mark.parametrize("output,expected", [
    ("/usr/bin/ld: final link failed: No space left on device\ncollect2: error: ld returned 1 exit status\n",
     "/usr/bin/ld: final link failed: No space left on device"),
    ("FAILED: main.o\nmain.cc:3:1: error: expected ';'\n1 error generated.\nninja: build stopped: subcommand failed.",
     "main.cc:3:1: error: expected ';'"),
    ("just some output\n", "just some output"),
    ("", ""),
])
def test_telling_line(output: str, expected: str) -> None:
    from edgedeploy.runtime.native import telling_line

    assert telling_line(output) == expected


# -- the real entry point ----------------------------------------------------------------------------

def _cli(*argv: str, fsize_limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m edgedeploy.cli ARGV``, optionally under RLIMIT_FSIZE (set in the child, before the CLI runs)."""
    code = ("import resource, runpy, sys\n"
            + (f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize_limit}, {fsize_limit}))\n" if fsize_limit else "")
            + f"sys.argv = ['edgedeploy', *{list(argv)!r}]\nrunpy.run_module('edgedeploy.cli', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_entry_point_argument_error() -> None:
    proc = _cli("run", "B", "--threads", "0")
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, 2, "--threads: must be an integer >= 1")


@pytest.mark.skipif(not shutil.which("cmake"), reason="needs cmake (Debian package cmake)")
def test_entry_point_native_build_hits_file_size_limit(tmp_path: Path) -> None:
    """``package`` with a 16 KiB file size limit: CMake dies of SIGXFSZ (a full disk, as far as the user
    can tell); one line naming the step, where the full output went, and no traceback."""
    proc = _cli("package", "--abi", "host", "--out", str(tmp_path / "runner"), fsize_limit=16384)
    line = assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, 2, "CMake configure failed")
    assert "file size limit exceeded" in line.lower() or "File too large" in line, line


def test_corrupt_adb_key_is_named(tmp_path: Path, capsys) -> None:
    from edgedeploy.devices.adb import AdbTcpDevice
    from edgedeploy.devices.base import DeviceError

    key = tmp_path / "adbkey"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    server = JunkServer(reply=b"")
    try:
        with pytest.raises(DeviceError, match="adbkey: not a usable adb key"):
            AdbTcpDevice(f"127.0.0.1:{server.port}", key_path=key)
    finally:
        server.close()
