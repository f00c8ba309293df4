"""The results history and the regression gate (issue #12): ``profile`` appends to an SQLite database,
``history`` lists and compares runs, ``check-regression`` exits 1 naming the metric that got worse.

The gate's own arithmetic is tested on results records with chosen numbers (real database, real CLI);
the acceptance test profiles real bundles on this host.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edgedeploy.cli import main
from edgedeploy.history import open_history, record
from edgedeploy.results import Results

from .test_error_shapes import assert_one_error_line, valid_results


def _results(decode: float | None = 100.0, peak: float = 100 * 2**20, model: str = "tiny", serial: str = "SER1",
             backend: str = "adb") -> Results:
    """A results record with one model whose chat-short decode median and measured peak are given."""
    data = json.loads(json.dumps(valid_results()))
    m = data["models"][0]
    m["model"] = model
    m["measured_peak_bytes"] = peak
    stat = {"median": decode, "stdev": 1.0, "min": decode, "max": decode, "n": 3} if decode is not None else {}
    m["prompts"][0]["summary"]["decode_tok_s"] = stat
    m["device"] = {"serial": serial, "backend": backend, "model": "Pixel"}
    m["bundle_sha256"] = "ab" * 32
    data["device"] = copy.deepcopy(m["device"])
    return Results.from_dict(data)


def _gate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["check-regression", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_history_records_every_metric_and_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "h.sqlite"
    _, ids = record(_results(decode=100), db)
    _, more = record(_results(decode=50, model="other", serial="SER2"), db)
    assert ids == [1] and more == [2]
    with sqlite3.connect(db) as conn:
        names = {m for (m,) in conn.execute("SELECT metric FROM metrics WHERE run_id = 1")}
        row = conn.execute("SELECT model, device_serial, bundle_sha256, profile, tool_version, record FROM runs "
                           "WHERE id = 1").fetchone()
    # Model-level figures, the estimate, the push, and every stat of every prompt's summary.
    assert {"measured_peak_bytes", "estimate.peak_bytes", "push.mb_per_s", "decode_tok_s.median",
            "decode_tok_s.stdev", "ttft_s.n", "load_s.median", "prompt_tokens"} <= names
    assert row[:4] == ("tiny", "SER1", "ab" * 32, "reference-12gb")
    assert json.loads(row[5])["prompts"][0]["name"] == "chat-short"  # the whole model result is kept
    assert main(["history", "--history", str(db), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in listed["runs"]] == [1, 2]
    assert listed["runs"][1]["prompts"]["chat-short"]["decode_tok_s.median"] == 50
    for flag, value, want in (("--model", "other", [2]), ("--device", "SER1", [1]), ("--device", "Pixel", [1, 2]),
                              ("--model", "none", [])):
        assert main(["history", "--history", str(db), flag, value, "--json"]) == 0
        assert [r["id"] for r in json.loads(capsys.readouterr().out)["runs"]] == want, (flag, value)
    assert main(["history", "--history", str(db), "--limit", "1", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)["runs"]] == [2]
    assert main(["history", "--history", str(db)]) == 0
    out = capsys.readouterr().out
    assert "SER2" in out and "50.0" in out and "100.0" in out  # device, decode tok/s, peak MiB


@pytest.mark.parametrize(("decode", "peak_mib", "rc", "named"), [
    (94.0, 100.0, 1, "decode tok/s on chat-short dropped 6.0%: 100.0 -> 94.0 (limit 5%)"),
    (96.0, 100.0, 0, None),
    (100.0, 102.5, 1, "peak memory grew 2.5%: 100.0 MiB -> 102.5 MiB (limit 2%)"),
    (100.0, 101.5, 0, None),
    (150.0, 90.0, 0, None),  # faster and smaller is never a regression
    (None, 100.0, 1, "decode tok/s on chat-short: no measurement in the candidate"),
])
def test_check_regression_thresholds(tmp_path: Path, capsys: pytest.CaptureFixture[str], decode: float | None,
                                     peak_mib: float, rc: int, named: str | None) -> None:
    db = str(tmp_path / "h.sqlite")
    record(_results(decode=100.0, peak=100 * 2**20), db)
    record(_results(decode=decode, peak=peak_mib * 2**20), db)
    got, out, err = _gate(capsys, "--baseline", "latest", "--history", db)
    assert got == rc, out + err
    if named:
        assert f"regression: tiny (run 2 vs 1): {named}" in err
    else:
        assert "regression" not in err and "ok decode tok/s on chat-short" in out
    # The same pair by ids, and `history compare`, judge alike.
    assert _gate(capsys, "--baseline", "1", "--candidate", "2", "--history", db)[0] == rc
    assert main(["history", "compare", "1", "2", "--history", db]) == rc
    capsys.readouterr()


def test_check_regression_options_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "h.sqlite")
    record(_results(decode=100.0, peak=100 * 2**20), db)
    record(_results(decode=80.0, peak=104 * 2**20), db)
    assert _gate(capsys, "--baseline", "latest", "--history", db, "--decode-drop", "25", "--memory-growth", "5")[0] == 0
    rc, out, _ = _gate(capsys, "--baseline", "latest", "--history", db, "--json", "--memory-growth", "5")
    assert rc == 1
    report = json.loads(out)
    assert report["regressions"] == ["tiny (run 2 vs 1): decode tok/s on chat-short dropped 20.0%: 100.0 -> 80.0 "
                                     "(limit 5%)"]
    assert report["pairs"][0]["baseline"] == 1 and report["pairs"][0]["candidate"] == 2


def test_latest_baseline_is_same_model_same_device_earlier_invocation(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "h.sqlite")
    record(_results(decode=100.0), db)                      # 1: the baseline
    record(_results(decode=10.0, serial="OTHER"), db)       # 2: another device: never a baseline for SER1
    record(_results(decode=10.0, model="m2"), db)           # 3: another model
    record(_results(decode=99.0), db)                       # 4: the candidate
    rc, out, _ = _gate(capsys, "--baseline", "latest", "--history", db)
    assert rc == 0 and "baseline  run 1:" in out and "candidate run 4:" in out
    # A baseline on another device is refused, not judged.
    rc, _, err = _gate(capsys, "--baseline", "2", "--history", db)
    assert rc == 2  # run 2 is another device and the newest run (4) has the same model
    assert "judged on the same device" in err
    # `history compare` shows runs on two devices without judging them.
    assert main(["history", "compare", "2", "4", "--history", db]) == 0
    assert "different devices: shown, not judged" in capsys.readouterr().out


def _two_models(decode_a: float, decode_b: float) -> Results:
    a, b = _results(decode=decode_a, model="a"), _results(decode=decode_b, model="b")
    a.models += b.models
    return a


def test_one_profile_of_two_models_is_checked_model_by_model(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "h.sqlite")
    assert record(_two_models(100.0, 100.0), db)[1] == [1, 2]  # one profile invocation, two models
    assert record(_two_models(100.0, 50.0), db)[1] == [3, 4]
    rc, out, err = _gate(capsys, "--baseline", "latest", "--history", db)
    assert rc == 1 and "candidate run 3:" in out and "candidate run 4:" in out
    assert err.strip() == "regression: b (run 4 vs 2): decode tok/s on chat-short dropped 50.0%: 100.0 -> 50.0 " \
                          "(limit 5%)"
    # An explicit baseline checks its own model of the newest run; --model narrows `latest` alike.
    assert _gate(capsys, "--baseline", "1", "--history", db)[0] == 0
    assert _gate(capsys, "--baseline", "2", "--history", db)[0] == 1
    assert _gate(capsys, "--baseline", "latest", "--model", "a", "--history", db)[0] == 0


def test_this_host_is_one_device_per_host_name(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite"
    record(_results(serial="local", backend="local"), db)
    with open_history(db) as h:
        key = h.get(1).device_key
    import socket

    assert key == f"local@{socket.gethostname()}"


def _write_garbage(path: Path) -> None:
    path.write_bytes(b"this is not an sqlite database" * 100)


def _newer(path: Path) -> None:
    record(_results(), path)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")


@pytest.mark.parametrize(("argv", "prepare", "needle"), [
    (["history"], None, "h.sqlite: no history database here"),
    (["check-regression", "--baseline", "latest"], None, "no history database here"),
    (["history"], _write_garbage, "h.sqlite: "),
    (["check-regression", "--baseline", "1"], _write_garbage, "h.sqlite: "),
    (["history"], _newer, "history database version 99; this edgedeploy reads 1"),
    (["check-regression", "--baseline", "latest"], lambda p: record(_results(), p), "no earlier run of tiny on SER1"),
    (["check-regression", "--baseline", "7"], lambda p: record(_results(), p), "no run 7 in the history"),
    (["check-regression", "--baseline", "abc"], lambda p: record(_results(), p), "a run id must be a number"),
    (["check-regression", "--baseline", "1"], lambda p: record(_results(), p), "run 1 is both the baseline"),
    (["history", "compare", "1", "0"], lambda p: record(_results(), p), "a run id must be a number"),
    (["check-regression", "--baseline", "latest", "--decode-drop", "-1"], None, "--decode-drop: must be a number"),
])
def test_history_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                     prepare, needle: str) -> None:
    db = tmp_path / "h.sqlite"
    if prepare:
        prepare(db)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main([*argv, "--history", str(db)])
    out, err = capsys.readouterr()
    assert_one_error_line(rc, out, err, 2, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # reading never creates the database


def test_env_and_option_choose_the_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EDGEDEPLOY_HISTORY", str(tmp_path / "env.sqlite"))
    record(_results())
    assert (tmp_path / "env.sqlite").is_file()
    assert main(["history", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["history"] == str(tmp_path / "env.sqlite")
    monkeypatch.delenv("EDGEDEPLOY_HISTORY")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    record(_results())
    assert (tmp_path / "home/.local/share/edgedeploy/history.sqlite").is_file()


# -- acceptance: real profiles on this host ---------------------------------------------------------

SIZES = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 4}
#: A decode-heavy prompt: 64 generated tokens, so a run's decode lasts long enough to time (chat-short's 32
#: tokens take ~70 ms on the fast build).
DECODE_PROMPT = {"name": "decode-64", "text": "Once upon a time a small model wanted to run on a phone.",
                 "max_new_tokens": 64}


@pytest.fixture(scope="module")
def fast_and_slow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two builds of one model name: 2 layers, and 16 layers (the pruning lost: ~8x the work per token)."""
    from edgedeploy.compile.build import build_bundle
    from edgedeploy.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("regression")
    out = []
    for layers in (2, 16):
        ckpt = make_tiny_checkpoint(root / f"ckpt{layers}", "llama", num_hidden_layers=layers, **SIZES)
        bundle = root / f"layers{layers}" / "model"
        build_bundle(ckpt, bundle, target="host", context_window=256, prefill_chunk=64)
        out.append(bundle)
    return out[0], out[1]


#: Measured on this repository's 2-CPU host while other jobs shared it (1 thread, medians of 3 runs of
#: 128 generated tokens): the 2-layer build 309, 328, 191, 170, 443, 426 tok/s in eight minutes, so a rerun
#: may measure half the baseline's speed; the 16-layer build 25-42 tok/s at the same time (75% below the
#: slowest 2-layer figure). 50% lets a rerun through unless the host's load swings more than 2x between
#: two profiles, which the test allows for by rerunning up to RERUNS times; the slow build stays over it.
DECODE_DROP = "50"
RERUNS = 3


def test_check_regression_rerun_passes_and_slower_build_fails(fast_and_slow: tuple[Path, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    fast, slow = fast_and_slow
    db = str(tmp_path / "h.sqlite")
    prompt = tmp_path / "decode-64.json"
    prompt.write_text(json.dumps(DECODE_PROMPT))
    profile = ["--prompts", str(prompt), "--runs", "3", "--warmup", "1", "--threads", "1", "--history", db]
    gate = ["--history", db, "--decode-drop", DECODE_DROP]

    def run(bundle: Path) -> int:
        assert main(["profile", str(bundle), *profile, "--out", str(tmp_path / "r")]) == 0
        with open_history(db) as h:
            return h.runs()[-1].id

    baseline = run(fast)
    # A rerun of the same build passes: decode within the noise, peak memory within the default 2%.
    tries = []
    for _ in range(RERUNS):
        rc, out, err = _gate(capsys, "--baseline", str(baseline), "--candidate", str(run(fast)), *gate)
        tries.append(out + err)
        if rc == 0:
            break
    assert rc == 0, "every rerun tripped the gate:\n" + "\n".join(tries)
    # The slower build fails it, naming the metrics; against the newest earlier run (latest) and the first.
    candidate = run(slow)
    for base in ("latest", str(baseline)):
        rc, out, err = _gate(capsys, "--baseline", base, *gate)
        assert rc == 1, out + err
        assert f"regression: model (run {candidate} vs " in err
        assert "decode tok/s on decode-64 dropped" in err, out + err
        assert "peak memory grew" in err
    # The history tells the builds apart by their bundle.json's sha256.
    with open_history(db) as h:
        runs = h.runs()
    assert runs[0].bundle_sha256 == runs[-2].bundle_sha256 != runs[-1].bundle_sha256
    assert all(r.threads == 1 and r.model == "model" for r in runs)


def test_profile_appends_with_git_commit_unless_no_history(host_bundle: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "h.sqlite"
    repo = tmp_path / "repo"  # profile runs in a git checkout: its commit is recorded
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(repo)
    argv = ["profile", str(host_bundle), "--prompts", "chat-short", "--runs", "1", "--warmup", "0",
            "--history", str(db), "--out", str(tmp_path / "r")]
    assert main([*argv, "--no-history"]) == 0
    assert not db.exists() and "history:" not in capsys.readouterr().err
    assert main(argv) == 0
    assert db.is_file()
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["git_commit"] == head
    with open_history(db) as h:
        run = h.get(1)
    assert run.git_commit == head and run.verdict == "PASS"
    assert run.bundle_sha256 == results["models"][0]["bundle_sha256"] == hashlib.sha256(
        (host_bundle / "bundle.json").read_bytes()).hexdigest()
    assert run.metric("decode_tok_s.median", "chat-short") == \
        results["models"][0]["prompts"][0]["summary"]["decode_tok_s"]["median"]


def test_concurrent_appends_from_two_processes(tmp_path: Path) -> None:
    """Two profile (or farm) processes sharing one database: every append lands, ids never collide."""
    db = tmp_path / "h.sqlite"
    script = ("import sys; from edgedeploy.history import record; from tests.test_history import _results\n"
              "for i in range(15): record(_results(model=sys.argv[1]), sys.argv[2])\n")
    root = Path(__file__).parent.parent
    procs = [subprocess.Popen([sys.executable, "-c", script, name, str(db)], cwd=root) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with open_history(db) as h:
        runs = h.runs()
    assert len(runs) == 30 and len({r.id for r in runs}) == 30
    assert sorted(r.model for r in runs) == ["a"] * 15 + ["b"] * 15
    assert all(r.metric("decode_tok_s.median", "chat-short") == 100.0 for r in runs)
