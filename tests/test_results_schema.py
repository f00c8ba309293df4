"""Typed results (issue #12): the records check a results file on load, keep what they do not know, write
the same JSON back; and the challenge CSV export (``report --format challenge-csv``)."""

from __future__ import annotations

import copy
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgedeploy.cli import main
from edgedeploy.errors import InputError
from edgedeploy.report.challenge import to_challenge_csv
from edgedeploy.results import ModelResult, Record, Results, Run, SchemaError, Summary, load_results

from .test_error_shapes import valid_results


def _stat(median: float, n: int = 3) -> dict:
    return {"median": median, "stdev": 0.0, "min": median, "max": median, "n": n}


def test_round_trip_keeps_the_file_and_unknown_keys() -> None:
    data = valid_results()
    data["future_top"] = {"a": [1, 2]}
    data["models"][0]["future_model"] = 7
    data["models"][0]["prompts"][0]["runs"][0]["thermal"] = {"zone0_c": [41.5, 43.0]}
    data["models"][0]["prompts"][0]["summary"]["energy_j"] = _stat(2.5)
    results = Results.from_dict(copy.deepcopy(data))
    run = results.models[0].prompts[0].runs[0]
    assert isinstance(run, Run) and run.peak_rss_bytes == 90_000_000 and run.extra == {"thermal": {"zone0_c": [41.5,
                                                                                                            43.0]}}
    # A stat a newer producer added is found by name, typed, without a field for it.
    assert results.models[0].prompts[0].summary.stats()["energy_j"].median == 2.5
    out = results.to_dict()
    # Everything comes back; only optional keys that were null are left out ({} stats: "no data").
    data["models"][0]["prompts"][0].pop("clipped_from")
    data["models"][0]["prompts"][0]["summary"].pop("decode_tok_s")
    data["models"][0]["runner"].pop("elf_machine")
    for run in data["models"][0]["prompts"][0]["warmup"] + data["models"][0]["prompts"][0]["runs"]:
        run.setdefault("timeline", [])  # lists are always written
    assert json.loads(json.dumps(out)) == {**data, "models": [{**data["models"][0], "harness": "shell"}]}
    assert list(out)[:3] == ["schema_version", "kind", "created"]


@pytest.mark.parametrize(("spoil", "message"), [
    (lambda d: d.pop("models"), "missing key 'models'"),
    (lambda d: d["models"][0]["prompts"][0]["runs"][0].update(decode_tok_s="fast"),
     "'models[0].prompts[0].runs[0].decode_tok_s' must be a number or null, got a string"),
    (lambda d: d["models"][0]["prompts"][0]["runs"][0].update(token_ids=[1, "2"]),
     "'models[0].prompts[0].runs[0].token_ids[1]' must be an integer, got a string"),
    (lambda d: d["models"][0]["prompts"][0].update(prompt_tokens=True),
     "'models[0].prompts[0].prompt_tokens' must be an integer, got a boolean"),
    (lambda d: d["models"][0]["prompts"][0]["summary"].update(ttft_s={"median": 1}),
     "missing key 'models[0].prompts[0].summary.ttft_s.stdev'"),
    (lambda d: d["models"][0].update(device=[]), "'models[0].device' must be an object, got a list"),
    (lambda d: d.update(verdict="MAYBE"), "'verdict' must be PASS or FAIL, got 'MAYBE'"),
    (lambda d: d["models"][0]["prompts"][0]["runs"][0].update(killed={"lmkd": {"pid": "x"}}),
     "'models[0].prompts[0].runs[0].killed.lmkd.pid' must be an integer or null, got a string"),
])
def test_validation_names_the_key(spoil, message: str) -> None:
    data = json.loads(json.dumps(valid_results()))  # its warm-up and measured runs are one shared dict
    spoil(data)
    with pytest.raises(SchemaError) as e:
        Results.from_dict(data)
    assert str(e.value) == message


def test_empty_stat_is_no_data_and_a_record_rejects_unsupported_types() -> None:
    assert Summary.from_dict({"decode_tok_s": {}}).decode_tok_s is None

    @dataclass(kw_only=True)
    class Bad(Record):
        when: complex = 0j

    with pytest.raises(TypeError, match="unsupported field type"):
        Bad.from_dict({})


def test_load_results_refuses_newer_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**valid_results(), "schema_version": 2}))
    with pytest.raises(InputError, match=r"r\.json: results file has schema_version 2"):
        load_results(path)
    path.write_text(json.dumps({**valid_results(), "models": [{"model": 1}]}))
    with pytest.raises(InputError, match=r"not an edgedeploy results file: missing key 'models\[0\]\.manifest'"):
        load_results(path)


def test_report_json_keeps_unknown_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = valid_results()
    data["models"][0]["prompts"][0]["runs"][0]["memory_sources"] = {"swap_bytes": 4096}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    assert main(["report", str(path), "--format", "json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["models"][0]["prompts"][0]["runs"][0]["memory_sources"] == {"swap_bytes": 4096}


# -- the challenge CSV --------------------------------------------------------------------------------

def _challenge_results() -> dict:
    data = valid_results()
    model = data["models"][0]
    long = copy.deepcopy(model["prompts"][0])
    long.update(name="long-2k", prompt_tokens=2048, summary={"ttft_s": _stat(0.25), "prefill_tok_s": _stat(8192.0)})
    model["prompts"].append(long)
    model["measured_peak_bytes"] = 3 * 2**30 + 2**19  # 3072.5 MiB
    clipped = copy.deepcopy(model)
    clipped["model"] = "=HYPERLINK(1)"
    clipped["prompts"][1]["prompt_tokens"] = 96
    clipped["prompts"][1]["clipped_from"] = 2048
    killed = copy.deepcopy(model)
    killed["model"] = "killed, model"
    killed["prompts"][1]["runs"].append({"error": "killed at 1 MiB (exit 137)", "killed": {"killed_at_bytes": 1}})
    data["models"] = [model, clipped, killed]
    return data


def test_challenge_csv_columns_and_definitions() -> None:
    rows = list(csv.reader(io.StringIO(to_challenge_csv(Results.from_dict(_challenge_results())))))
    assert rows[0] == ["model", "Throughput", "Memory-Usage"]
    # Throughput: 1 / median TTFT of the ~2k-token prompt = 4 forward passes per second; memory in MiB.
    assert rows[1] == ["tiny", "4.0000", "3072.5"]
    # long-2k clipped to 96 tokens is not the challenge's setting; a formula-like name is defused.
    assert rows[2] == ["'=HYPERLINK(1)", "", "3072.5"]
    # A model killed for memory has no completed peak; a comma in a name is quoted by the CSV.
    assert rows[3] == ["killed, model", "4.0000", ""]


def test_report_challenge_csv_from_a_real_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bundle whose window holds the 2,048-token prompt: profile writes challenge.csv, report renders it."""
    from edgedeploy.compile.build import build_bundle
    from edgedeploy.tiny import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "ckpt", "llama", max_position_embeddings=4096)
    bundle = tmp_path / "long-window"
    build_bundle(checkpoint, bundle, target="host", context_window=2304, prefill_chunk=512)
    out = tmp_path / "r"
    rc = main(["profile", str(bundle), "--prompts", "long-2k", "--runs", "2", "--warmup", "0", "--out", str(out),
               "--no-history"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    results = load_results(out / "results.json")
    model: ModelResult = results.models[0]
    prompt = model.prompts[0]
    assert prompt.name == "long-2k" and prompt.prompt_tokens >= 2000 and not prompt.clipped_from
    assert prompt.summary.ttft_s is not None
    expected = [model.model, f"{1 / prompt.summary.ttft_s.median:.4f}", f"{model.measured_peak_bytes / 2**20:.1f}"]
    assert main(["report", str(out / "results.json"), "--format", "challenge-csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows == [["model", "Throughput", "Memory-Usage"], expected]
    assert (out / "challenge.csv").read_text() == "model,Throughput,Memory-Usage\n" + ",".join(expected) + "\n"
    assert float(expected[1]) > 0 and float(expected[2]) > 10
