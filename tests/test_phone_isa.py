"""Phone builds target the phone's real ISA, and their matmul kernels use vector FP16 arithmetic.

The ISA (LLVM ``mcpu``/``mattr``) comes from the device profile, or a default of ARMv8.2-A with FP16
arithmetic and dot product. The FP16 build of the tiny Llama for ``android`` is disassembled with
binutils' ``aarch64-linux-gnu-objdump``; the decode GEMVs and prefill GEMMs (the fused matmul
PrimFuncs, ``<name>_compute_`` in ``lib0.o``, their unnamed parallel bodies right after them) must
multiply-accumulate in vector registers: FP16 lanes widened with ``fcvtl``/``fcvtl2`` into
``fmla .4s`` (what LLVM emits for the FP32 accumulation of the schedules), ``fmlal``/``fmlal2``, or
native ``fmla .8h``. No scalar FMA, no scalar FP16->FP32 conversion (the old ``+neon``-only target
widened the residual of every ``*_add`` GEMV one element at a time), no soft-float calls, and no SVE
anywhere (Snapdragon 8 Gen 3 phones do not expose it: SIGILL).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.compile.targets import (
    DEFAULT_AARCH64_MATTR,
    DEFAULT_ISA,
    CpuIsa,
    get_target,
    isa_from_profile,
    make_isa,
)
from edgedeploy.devices.profiles import list_profiles, load_profile
from edgedeploy.errors import InputError

OBJDUMP = "aarch64-linux-gnu-objdump"
CONTEXT, CHUNK = 128, 32
PHONE_TARGETS = ("android", "android-opencl", "linux-aarch64")


def _llvm_target(spec_target: dict) -> dict:
    return spec_target["host"] if spec_target["kind"] == "opencl" else spec_target


# -- the ISA: profiles, default, errors (no compile) ----------------------------------------------------------------

def test_default_isa_is_armv82_with_fp16_and_dotprod() -> None:
    for name in PHONE_TARGETS:
        spec = get_target(name)
        t = _llvm_target(spec.target)
        assert "mcpu" not in t and t["mattr"] == [*DEFAULT_AARCH64_MATTR, "-sve"], name
        assert spec.isa == DEFAULT_ISA
    assert {"+v8.2a", "+fullfp16", "+dotprod", "+neon"} <= set(DEFAULT_AARCH64_MATTR)
    assert get_target("host").isa is None


def test_phone_profiles_name_their_cpu() -> None:
    phones = [p for p in list_profiles() if p.kind == "android"]
    names = {p.name for p in phones}
    assert {"reference-12gb", "galaxy-s24-ultra-12gb", "oneplus-12-12gb", "pixel-8-pro-12gb"} <= names
    for p in phones:
        isa = isa_from_profile(p)
        assert isa.mcpu and isa.source == f"profile {p.name}", p.name
        for name in PHONE_TARGETS:
            spec = get_target(name, isa)
            t = _llvm_target(spec.target)
            assert t["mcpu"] == p.mcpu and t["mattr"][: len(p.mattr)] == list(p.mattr), (p.name, name)
            assert "-sve" in t["mattr"], (p.name, name)
            assert spec.isa.to_dict() == {"mcpu": p.mcpu, "mattr": t["mattr"], "source": f"profile {p.name}"}
    ref = isa_from_profile("reference-12gb")  # a Snapdragon 8 Gen 3 class phone: Cortex-X4 + A720 + A520
    assert ref.mcpu == "cortex-a720" and {"+fullfp16", "+fp16fml", "+dotprod", "-sve"} <= set(ref.mattr)
    assert isa_from_profile("pixel-8-pro-12gb").mcpu == "cortex-a715"  # Tensor G3: Cortex-X3 + A715 + A510


def test_profile_without_cpu_gets_the_default(tmp_path: Path) -> None:
    src = Path(load_profile("reference-12gb").source).read_text()
    plain = tmp_path / "plain.toml"
    plain.write_text("\n".join(x for x in src.splitlines() if not x.startswith(("mcpu ", "mattr "))))
    p = load_profile(plain)
    assert p.mcpu is None and p.mattr is None
    isa = isa_from_profile(p)
    assert (isa.mcpu, isa.mattr) == (None, DEFAULT_AARCH64_MATTR)
    assert get_target("android", isa).target["mattr"] == [*DEFAULT_AARCH64_MATTR, "-sve"]


@pytest.mark.parametrize(("lines", "needle"), [
    (['mcpu = ""'], "field 'mcpu' must be an LLVM CPU name"),
    (['mcpu = "cortex-a720"', 'mattr = "+fullfp16"'], "field 'mattr' must be a list of LLVM features"),
    (['mcpu = "cortex-a720"', 'mattr = ["fullfp16"]'], "field 'mattr' must be a list of LLVM features"),
])
def test_bad_cpu_field_is_named(tmp_path: Path, lines: list[str], needle: str) -> None:
    src = Path(load_profile("reference-12gb").source).read_text()
    bad = tmp_path / "bad.toml"
    kept = [x for x in src.splitlines() if not x.startswith(("mcpu ", "mattr "))]
    bad.write_text("\n".join(kept[:1] + lines + kept[1:]))
    with pytest.raises(InputError) as e:
        load_profile(bad)
    assert str(bad) in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize(("isa", "needle"), [
    (make_isa("cortex-x9000", source="p.toml"), "does not know the CPU 'cortex-x9000'"),
    (make_isa(None, ["+v8.2a", "+fullfp16", "+dotprod", "+fp16x"], source="p.toml"),
     "does not know the feature '+fp16x'"),
    (make_isa("cortex-a53", source="p.toml"), "lacks v8.2a, fullfp16, dotprod"),
    (make_isa(None, ["+neon"], source="p.toml"), "lacks v8.2a, fullfp16, dotprod"),
])
def test_isa_llvm_cannot_honour_is_refused(isa: CpuIsa, needle: str) -> None:
    # TVM itself only logs these and falls back to a generic CPU or drops the feature.
    with pytest.raises(InputError, match=re.escape(needle)) as e:
        get_target("android", isa)
    assert str(e.value).startswith("p.toml: ")


# -- the disassembly ------------------------------------------------------------------------------------------------

_SVE = re.compile(r"\b[zp]\d+\.[bhsdq]\b|\bp\d+/[zm]\b|^(ptrue|whilelo|whilelt|rdvl|cnt[bhwd]|inc[bhwd]|dec[bhwd])$")


def _objdump() -> str:
    tool = shutil.which(OBJDUMP)
    if tool is None:
        pytest.skip(f"{OBJDUMP} is missing: install Debian's binutils-aarch64-linux-gnu")
    return tool


def disassemble(obj: Path) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """Instructions per symbol (an unnamed parallel body counts to the symbol before it) and the call targets."""
    out = subprocess.run([_objdump(), "-dr", "--no-show-raw-insn", str(obj)], capture_output=True, text=True,
                         check=True).stdout
    funcs: dict[str, list[tuple[str, str]]] = {}
    calls: list[str] = []
    cur: list[tuple[str, str]] | None = None
    for line in out.splitlines():
        if m := re.match(r"^[0-9a-f]+ <([^>]+)>:$", line):
            cur = funcs.setdefault(m.group(1), [])
        elif m := re.match(r"^\s+[0-9a-f]+:\s+R_AARCH64_(?:CALL26|JUMP26)\s+(\S+)", line):
            calls.append(m.group(1))
        elif (m := re.match(r"^\s+[0-9a-f]+:\s+([a-z][a-z0-9.]*)\s*(.*)$", line)) and cur is not None:
            cur.append((m.group(1), m.group(2).split("//")[0].strip()))
    return funcs, calls


def instruction_mix(insns: list[tuple[str, str]]) -> Counter:
    """Counts of what matters for an FP16 matmul with FP32 accumulation."""
    c: Counter = Counter()
    for op, args in insns:
        vec = re.search(r"\bv\d+\.(\d+[bhsd])\b", args)
        lanes = vec.group(1) if vec else None
        if op == "fmla" and lanes:
            c[f"fmla.{lanes}"] += 1
        elif op in ("fmlal", "fmlal2"):
            c["fmlal"] += 1
        elif op in ("fcvtl", "fcvtl2"):
            c["fcvtl"] += 1
        elif op == "fcvt" and re.match(r"[sd]\d+, h\d+$", args):
            c["scalar fcvt from h"] += 1
        elif op == "fcvt" and re.match(r"h\d+, [sd]\d+$", args):
            c["scalar fcvt to h"] += 1
        elif op in ("fmadd", "fmsub", "fnmadd", "fnmsub") or (op == "fmla" and not lanes):
            c["scalar fma"] += 1
        if op in ("ldr", "str", "ldp", "stp", "ldur", "stur") and re.match(r"q\d+.*\[sp", args):
            c["vector spill"] += 1  # a q register to or from the stack: the tile does not fit the registers
        if _SVE.search(args) or _SVE.match(op):
            c["sve"] += 1
    c["vector mac"] = c["fmla.4s"] + c["fmla.8h"] + c["fmla.4h"] + c["fmlal"]
    return c


def matmul_kinds(cfg: ModelConfig) -> dict[str, str]:
    """Each fused matmul PrimFunc of the FP16 build, ``gemv`` (decode: one activation row) or ``gemm`` (prefill)."""
    import tvm
    from tvm import relax, tirx
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from edgedeploy.compile.library import build_ir_module

    mod, _, _ = build_ir_module(cfg, "float16", "android", CONTEXT, CHUNK)
    target = get_target("android").tvm_target()
    with target:  # what edgedeploy.compile.pipeline runs before it schedules the matmuls
        mod = tvm.transform.Sequential([relax.transform.FuseTransposeMatmul(), *cpu.library_dispatch_passes(target),
                                        *cpu.legalize_passes(target)])(mod)
    kinds = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and "matmul" in gv.name_hint:
            activation = func.params[0]
            static = all(isinstance(d, tirx.IntImm) for d in activation.shape)
            kinds[gv.name_hint] = "gemv" if static else "gemm"
    return kinds


@pytest.fixture(scope="module")
def phone_objects(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``lib0.o`` of the tiny Llama built for android in FP16: default ISA (``edgedeploy build``) and reference-12gb."""
    from edgedeploy.bundle import read_manifest
    from edgedeploy.checkpoint.intake import open_checkpoint
    from edgedeploy.compile.build import build_bundle
    from edgedeploy.compile.library import compile_model_library

    _objdump()
    root = tmp_path_factory.mktemp("phone-isa")
    build_bundle(tiny_models["llama"], root / "default", target="android", context_window=CONTEXT,
                 prefill_chunk=CHUNK)
    assert read_manifest(root / "default").target == "android"
    cfg = open_checkpoint(tiny_models["llama"]).config
    compile_model_library(cfg, "float16", "android", CONTEXT, CHUNK, root / "ref" / "model.tar",
                          isa=isa_from_profile("reference-12gb"))
    objects = {}
    for which, tar in (("default", root / "default" / "model.tar"), ("reference-12gb", root / "ref" / "model.tar")):
        with tarfile.open(tar) as tf:
            assert {m.name for m in tf.getmembers()} >= {"lib0.o", "devc.o"}, tar
            objects[which] = root / f"{which}-lib0.o"
            objects[which].write_bytes(tf.extractfile("lib0.o").read())
    return objects


@pytest.fixture(scope="module")
def kinds(tiny_models: dict[str, Path]) -> dict[str, str]:
    from edgedeploy.checkpoint.intake import open_checkpoint

    return matmul_kinds(open_checkpoint(tiny_models["llama"]).config)


def check_matmul_kernels(obj: Path, kinds: dict[str, str]) -> dict[str, Counter]:
    """Assert the FP16 bar on every matmul kernel of ``obj``; return each one's instruction mix."""
    funcs, calls = disassemble(obj)
    assert set(kinds.values()) == {"gemv", "gemm"}, kinds
    mixes = {}
    for name, kind in sorted(kinds.items()):
        insns = funcs.get(f"{name}_compute_")
        assert insns, f"{name}_compute_ not in {obj.name} (symbols: {sorted(funcs)[:8]}...)"
        mix = mixes[name] = instruction_mix(insns)
        where = f"{kind} {name}: {dict(mix)}"
        # The reduction runs in vector registers on FP16 data: widened by fcvtl into fmla .4s, or fmlal, or .8h.
        assert mix["vector mac"] >= 8, where
        assert mix["fcvtl"] or mix["fmlal"] or mix["fmla.8h"] or mix["fmla.4h"], where
        # Not a scalar loop, no element-by-element widening, no FP16->FP32 soft-float helpers.
        assert mix["scalar fma"] == 0, where
        assert mix["scalar fcvt from h"] == 0, where
        # Narrowing to FP16 one element at a time is the epilogue's store of an output, never the reduction.
        assert mix["scalar fcvt to h"] * 8 <= mix["vector mac"], where
        if kind == "gemm":
            # The prefill tile lives in registers: one sized for AVX-512 spilled half its loop on NEON.
            assert mix["vector spill"] * 8 <= mix["vector mac"], where
    soft = sorted({c for c in calls if re.search(r"extendhf|truncsfhf|__gnu_[hf]2", c)})
    assert not soft, f"soft-float FP16 conversions called: {soft}"
    sve = {n: m for n in funcs if (m := instruction_mix(funcs[n])["sve"])}
    assert not sve, f"SVE instructions (SIGILL on Snapdragon 8 Gen 3): {sve}"
    return mixes


@pytest.mark.parametrize("which", ["default", "reference-12gb"])
def test_matmul_kernels_use_vector_fp16(phone_objects: dict[str, Path], kinds: dict[str, str], which: str) -> None:
    mixes = check_matmul_kernels(phone_objects[which], kinds)
    assert sum(m["fmla.4s"] + m["fmlal"] for m in mixes.values()) > 0


def test_build_with_profile_records_the_cpu(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from edgedeploy.bundle import read_manifest
    from edgedeploy.cli import main

    _objdump()
    out = tmp_path / "b"
    assert main(["build", str(tiny_models["llama"]), "--profile", "reference-12gb", "--out", str(out),
                 "--context", str(CONTEXT), "--prefill-chunk", str(CHUNK)]) == 0
    m = read_manifest(out)
    assert m.target == "android"  # the profile's target when --target is not given
    assert m.target_cpu["mcpu"] == "cortex-a720" and "+fp16fml" in m.target_cpu["mattr"]
