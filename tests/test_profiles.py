"""Device profiles: every shipped profile loads; a wrong field names the file, the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgedeploy.devices.profiles import list_profiles, load_profile
from edgedeploy.errors import InputError


def test_shipped_profiles_load() -> None:
    names = {p.name for p in list_profiles()}
    assert {"reference-12gb", "host"} <= names
    assert len(names) >= 5
    ref = load_profile("reference-12gb")
    assert ref.hard_limit_mb == 12288 and ref.budget_mb < ref.hard_limit_mb
    assert ref.memory_bandwidth_gbps == 76.8 and ref.abi == "arm64-v8a"


def test_host_profile_is_measured() -> None:
    import psutil

    host = load_profile("host")
    assert host.ram_mb == pytest.approx(psutil.virtual_memory().total / 2**20)
    assert 0.5 < host.memory_bandwidth_gbps < 1000
    assert host.compute_gflops > 0


@pytest.mark.parametrize(("line", "needle"), [
    ('memory_bandwidth_gbps = "fast"', "'memory_bandwidth_gbps' must be a positive number"),
    ("usable_budget_mb = -5", "'usable_budget_mb' must be a positive number"),
    ('gpu_backend = "vulkan"', "'gpu_backend' must be one of opencl, none"),
    ("bandwidth_efficiency = 1.5", "at most 1"),
    ("colour = 3", "unknown field 'colour'"),
])
def test_bad_field_is_named(tmp_path: Path, line: str, needle: str) -> None:
    src = (Path(load_profile("reference-12gb").source)).read_text()
    key = line.split(" = ")[0]
    lines = [x for x in src.splitlines() if not x.startswith(key + " ")]
    bad = tmp_path / "bad.toml"
    lines.insert(1, line)
    bad.write_text("\n".join(lines))
    with pytest.raises(InputError) as e:
        load_profile(bad)
    assert str(bad) in str(e.value) and needle in str(e.value)


def test_missing_field_and_unknown_name(tmp_path: Path) -> None:
    bad = tmp_path / "short.toml"
    bad.write_text('name = "x"\n')
    with pytest.raises(InputError, match="missing field 'description'"):
        load_profile(bad)
    with pytest.raises(InputError, match="unknown device profile 'nokia-3310'"):
        load_profile("nokia-3310")
