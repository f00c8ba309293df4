"""The peak that counts everything: swap (VmRSS + VmSwap), DMA-BUF (fdinfo + maps), memtrack (dumpsys meminfo),
PSS (smaps_rollup). Recorded samples in the kernel's and dumpsys's own layouts, then the device-side sampler
on a real process of a virtual phone.
"""

from __future__ import annotations

import copy
from pathlib import Path

from edgedeploy.checkpoint.config import load_config
from edgedeploy.devices.profiles import load_profile
from edgedeploy.profile import memory
from edgedeploy.profile.session import _parse_samples
from edgedeploy.report.fit import make_report, to_junit, to_markdown
from edgedeploy.results import Results

from .test_error_shapes import valid_results

MIB = 2**20


def status(rss_kb: int, hwm_kb: int, swap_kb: int) -> str:
    """/proc/PID/status of an arm64 runner, as the kernel prints it (tab after the colon, kB right-aligned)."""
    return (
        "Name:\tedgedeploy-runn\nUmask:\t0077\nState:\tS (sleeping)\nTgid:\t23811\nNgid:\t0\nPid:\t23811\n"
        "PPid:\t23790\nTracerPid:\t0\nUid:\t2000\t2000\t2000\t2000\nGid:\t2000\t2000\t2000\t2000\nFDSize:\t128\n"
        "Groups:\t1004 1007 1011 1015 1028 3001 3002 3003 3006 3009 3011 \nNStgid:\t23811\nNSpid:\t23811\n"
        "NSpgid:\t23790\nNSsid:\t23790\n"
        f"VmPeak:\t{hwm_kb + 310000:8d} kB\nVmSize:\t{rss_kb + swap_kb + 300000:8d} kB\nVmLck:\t       0 kB\n"
        f"VmPin:\t       0 kB\nVmHWM:\t{hwm_kb:8d} kB\nVmRSS:\t{rss_kb:8d} kB\nRssAnon:\t{rss_kb - 21000:8d} kB\n"
        "RssFile:\t   20872 kB\nRssShmem:\t     128 kB\nVmData:\t 4311560 kB\nVmStk:\t     132 kB\n"
        "VmExe:\t     412 kB\nVmLib:\t   41760 kB\nVmPTE:\t    8652 kB\n"
        f"VmSwap:\t{swap_kb:8d} kB\nCoreDumping:\t0\nTHP_enabled:\t0\nThreads:\t9\nSigQ:\t0/44568\n"
    )


SMAPS_ROLLUP = """\
5c6c400000-7ffd3a9ba000 ---p 00000000 00:00 0                            [rollup]
Rss:             3145728 kB
Pss:             3101284 kB
Pss_Dirty:       3098112 kB
Pss_Anon:        3097600 kB
Pss_File:           3172 kB
Pss_Shmem:           512 kB
Shared_Clean:      41260 kB
Shared_Dirty:        128 kB
Private_Clean:      6228 kB
Private_Dirty:   3098112 kB
Referenced:      3145600 kB
Anonymous:       3097600 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:             921600 kB
SwapPss:          921600 kB
Locked:                0 kB
"""

# /proc/PID/fdinfo/N: the generic lines (fs/proc/fd.c), then dma_buf_show_fdinfo's size/count/exp_name/name.
FDINFO = {
    "/proc/23811/fdinfo/3": "pos:\t0\nflags:\t02100000\nmnt_id:\t24\nino:\t1313\n",  # a regular file
    "/proc/23811/fdinfo/41": ("pos:\t0\nflags:\t02100002\nmnt_id:\t11\nino:\t60373\nsize:\t268435456\ncount:\t2\n"
                              "exp_name:\tqcom,system\nname:\ttvm-opencl\n"),
    # A second fd of the same buffer (same inode): counted once.
    "/proc/23811/fdinfo/42": ("pos:\t0\nflags:\t02100002\nmnt_id:\t11\nino:\t60373\nsize:\t268435456\ncount:\t2\n"
                              "exp_name:\tqcom,system\nname:\ttvm-opencl\n"),
    "/proc/23811/fdinfo/57": ("pos:\t0\nflags:\t02100002\nmnt_id:\t11\nino:\t60391\nsize:\t67108864\ncount:\t1\n"
                              "exp_name:\tqcom,system-uncached\n"),
    "/proc/23811/fdinfo/8": "pos:\t0\nflags:\t02004002\nmnt_id:\t15\nino:\t5121\neventfd-count:                0\n",
}

MAPS = """\
5c6c400000-5c6c467000 r--p 00000000 fd:04 1835150                        /data/local/tmp/edgedeploy/runner
7a1f000000-7a2f000000 rw-s 00000000 00:0b 60373                          /dmabuf:tvm-opencl
7a2f000000-7a2f800000 rw-s 00000000 00:0b 60399                          /dmabuf:
7a3a3c9000-7a3a3ca000 rw-p 00000000 00:00 0                              [anon:.bss]
7a3b000000-7a3b100000 rw-s 00000000 00:01 4096                           /dev/kgsl-3d0
"""

DUMPSYS = """\
Applications Memory Usage (in Kilobytes):
Uptime: 1754382 Realtime: 1754382

** MEMINFO in pid 23811 [ai.edgedeploy.harness] **
                   Pss  Private  Private  SwapPss      Rss     Heap     Heap     Heap
                 Total    Dirty    Clean    Dirty    Total     Size    Alloc     Free
                ------   ------   ------   ------   ------   ------   ------   ------
  Native Heap  3101284  3098112        0   921600  3145728  4194304  4012345   181959
  Dalvik Heap     2466     2392        0        0     8552     6436     3218     3218
        Stack       84       84        0        0       92
       Ashmem        2        0        0        0       12
    Other dev       12        0       12        0      224
     .so mmap     3172      220      940        0    41760
   EGL mtrack   131072   131072        0        0   131072
    GL mtrack   409600   409600        0        0   409600
      Unknown      512      512        0        0      612
        TOTAL  3648204  3641080      952   921600  3737256  4200740  4015563   185177

 App Summary
                       Pss(KB)                        Rss(KB)
                        ------                         ------
           Java Heap:     2392                           8552
         Native Heap:  3098112                        3145728
                Code:     1160                          41760
               Stack:       84                             92
            Graphics:   540672                         540672
       Private Other:      612
              System:   125172
             Unknown:                                      836

           TOTAL PSS:  3648204            TOTAL RSS:  3737256       TOTAL SWAP PSS:   921600
"""


def test_parsers_read_the_real_layouts() -> None:
    st = memory.parse_status(status(3145728, 3200000, 921600))
    assert st["VmRSS"] == 3145728 * 1024 and st["VmHWM"] == 3200000 * 1024 and st["VmSwap"] == 921600 * 1024
    roll = memory.parse_smaps_rollup(SMAPS_ROLLUP)
    assert roll["Pss"] == 3101284 * 1024 and roll["Swap"] == 921600 * 1024 and roll["Rss"] == 3145728 * 1024
    bufs = memory.dmabuf_fds(FDINFO)
    assert set(bufs) == {60373, 60391}  # the regular file and the eventfd are not DMA-BUFs
    assert bufs[60373] == {"size": 256 * MIB, "exp_name": "qcom,system", "fds": ["/proc/23811/fdinfo/41",
                                                                                "/proc/23811/fdinfo/42"]}
    assert memory.dmabuf_maps(MAPS) == {60373: 256 * MIB, 60399: 8 * MIB}  # /dev/kgsl-3d0 is not a DMA-BUF
    # Held by fd: 256 + 64 MiB, each once; mapped but no fd any more: 8 MiB.
    assert memory.dmabuf_bytes(FDINFO, MAPS) == (256 + 64 + 8) * MIB
    # EGL + GL mtrack = 528 MiB = the App Summary's Graphics row: never added twice.
    assert memory.memtrack_bytes(DUMPSYS) == 540672 * 1024
    assert memory.memtrack_bytes(DUMPSYS.replace("540672", "600000")) == 600000 * 1024
    assert memory.memtrack_bytes("nothing here") == 0


def test_swap_aware_peak() -> None:
    """zram took pages out of RSS after the high-water mark: VmRSS + VmSwap is the larger, and named."""
    timeline = []
    for rss, hwm, swap in [(1200000, 1200000, 0), (3000000, 3000000, 0), (2600000, 3000000, 500000),
                           (2700000, 3000000, 800000), (2400000, 3000000, 800000)]:
        st = memory.parse_status(status(rss, hwm, swap))
        timeline.append({"rss_bytes": st["VmRSS"], "hwm_bytes": st["VmHWM"], "swap_bytes": st["VmSwap"]})
    acc = memory.account(timeline, runner_hwm=3000000 * 1024)
    assert acc["cpu_source"] == "VmRSS+VmSwap" and acc["cpu_bytes"] == 3500000 * 1024
    assert acc["vmhwm_bytes"] == 3000000 * 1024 and acc["swap_bytes"] == 800000 * 1024
    assert acc["peak_bytes"] == 3500000 * 1024 and acc["gpu_source"] == "none seen"
    # Without swap, VmHWM (the runner's own, larger than any sample) is the peak.
    acc = memory.account([{**s, "swap_bytes": 0} for s in timeline], runner_hwm=3100000 * 1024)
    assert acc["cpu_source"] == "VmHWM" and acc["peak_bytes"] == 3100000 * 1024


def _script_output() -> str:
    """What the device-side sampler prints for two samples, the second with the slower sources."""
    def mem(rss: int, hwm: int, swap: int) -> str:
        st = status(rss, hwm, swap)
        rows = [ln for ln in st.splitlines() if ln.startswith(("VmHWM:", "VmRSS:", "VmSwap:"))]
        return "mem " + " ".join(" ".join(r.split()) for r in rows)  # grep | tr -s ' \n' '  '

    def prefixed(kind: str, text: str) -> str:
        return "".join(f"{kind} {line}\n" for line in text.splitlines())

    grep_h = "".join(f"{path}:{line}\n" for path, text in FDINFO.items() for line in text.splitlines()
                     if line.split(":")[0] in ("ino", "size", "exp_name"))
    dumpsys_rows = "".join(ln + "\n" for ln in DUMPSYS.splitlines()
                           if ln.lstrip().startswith(("EGL mtrack", "GL mtrack", "Graphics:")))
    rollup = "".join(ln + "\n" for ln in SMAPS_ROLLUP.splitlines() if ln.split(":")[0] in ("Rss", "Pss", "Swap",
                                                                                          "SwapPss"))
    return ("pid=23811\n" + mem(1000000, 1000000, 0) + "\n" + "extra-end\n"
            + mem(2600000, 3000000, 900000) + "\n" + prefixed("gpu", dumpsys_rows) + prefixed("fdinfo", grep_h)
            + prefixed("maps", "".join(ln + "\n" for ln in MAPS.splitlines() if " /dmabuf" in ln))
            + prefixed("rollup", rollup) + "extra-end\n" + mem(2500000, 3000000, 900000) + "\nrc=0\n")


def test_sampler_output_gives_the_whole_account() -> None:
    pid, timeline, rc = _parse_samples(_script_output())
    assert pid == 23811 and rc == 0 and len(timeline) == 3
    s = timeline[1]
    assert s["swap_bytes"] == 900000 * 1024 and s["dmabuf_bytes"] == 328 * MIB
    assert s["memtrack_bytes"] == 540672 * 1024 and s["gpu_bytes"] == 540672 * 1024
    assert s["pss_bytes"] == 3101284 * 1024
    assert timeline[0]["dmabuf_bytes"] == 0 and "pss_bytes" not in timeline[0]
    acc = memory.account(timeline, runner_hwm=0)
    # CPU: 2,600,000 + 900,000 kB resident-or-swapped beats VmHWM 3,000,000; GPU: memtrack 528 MiB beats
    # DMA-BUF 328 MiB (GL mtrack is GPU-private memory that is no DMA-BUF).
    assert acc["peak_bytes"] == 3500000 * 1024 + 540672 * 1024
    assert acc["cpu_source"] == "VmRSS+VmSwap" and acc["gpu_source"].startswith("dumpsys meminfo")
    # A device whose memtrack HAL reads 0 (seen on devices upgraded to Android 12): DMA-BUF counts instead.
    zero = _script_output().replace("131072", "0").replace("409600", "0").replace("540672", "0")
    acc = memory.account(_parse_samples(zero)[1])
    assert acc["gpu_bytes"] == 328 * MIB and acc["gpu_source"] == "DMA-BUF (fdinfo + maps)"
    line = memory.describe(acc)
    assert "VmRSS+VmSwap" in line and "DMA-BUF (fdinfo + maps)" in line and "PSS 3,028.6 MiB" in line


def test_fit_verdict_counts_swap_and_gpu() -> None:
    """VmHWM alone is under the budget; with swap and DMA-BUF the run is over it: FAIL, sources named."""
    profile = load_profile("reference-12gb")  # budget 8192 MiB
    data = copy.deepcopy(valid_results())
    acc = memory.account([{"rss_bytes": 7000 * MIB, "hwm_bytes": 7900 * MIB, "swap_bytes": 1000 * MIB,
                           "dmabuf_bytes": 300 * MIB}], runner_hwm=7900 * MIB)
    assert acc["peak_bytes"] == 8300 * MIB
    model = data["models"][0]
    for run in model["prompts"][0]["warmup"] + model["prompts"][0]["runs"]:
        run.update(peak_rss_bytes=7900 * MIB, gpu_peak_bytes=acc["gpu_bytes"], memory=acc)
    cfg, _ = load_config(Path(__file__).parent / "data/reference_configs/phi-2")
    model["manifest"]["config"] = cfg.to_dict()
    model["manifest"].update(parameters=2_779_683_840, context_window=2048, prefill_chunk=512,
                             rules={"status": "PASS", "findings": []})
    results = make_report(Results.from_dict(data), profile)
    m = results.models[0]
    assert m.measured_peak_bytes == 8300 * MIB and m.verdict == "FAIL"
    fit = next(c for c in m.checks if c.name == "memory-fit")
    assert fit.status == "FAIL" and "over the budget" in fit.message
    # The prediction and its error are in every report, JUnit included.
    assert "predicted" in fit.message and "error" in fit.message and "not calibrated" in fit.message
    md = to_markdown(results)
    assert "| peak accounting | 8,000.0 MiB CPU (VmRSS+VmSwap; VmSwap up to 1,000.0 MiB) + 300.0 MiB GPU" in md
    assert "| prediction error | " in md and "runtime base: profile reference-12gb" in md
    assert "predicted" in to_junit(results)
    # Files from before the account existed still evaluate (VmHWM + GPU).
    old = copy.deepcopy(data)
    for run in old["models"][0]["prompts"][0]["warmup"] + old["models"][0]["prompts"][0]["runs"]:
        run.pop("memory", None)
    assert make_report(Results.from_dict(old), profile).models[0].measured_peak_bytes == 8200 * MIB


def test_profile_on_a_virtual_phone_records_the_account(host_bundle: Path, tmp_path: Path,
                                                         monkeypatch, capsys) -> None:
    """The sampler on a real runner process: VmSwap and smaps_rollup read, no GPU, the account in every report."""
    import json

    from edgedeploy.cli import main

    from .test_virtual_phone import Phone

    monkeypatch.setenv("EDGEDEPLOY_HISTORY", str(tmp_path / "history.sqlite"))
    phone = Phone(tmp_path / "sandbox", "--budget-mb", "1000")
    try:
        out = tmp_path / "report"
        rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out", str(out),
                   "--prompts", "chat-short", "--runs", "1", "--warmup", "0", "--json"])
        capsys.readouterr()
    finally:
        phone.stop()
    assert rc == 0
    model = json.loads((out / "results.json").read_text())["models"][0]
    run = model["prompts"][0]["runs"][0]
    acc = run["memory"]
    assert acc["cpu_source"] == "VmHWM" and acc["swap_bytes"] == 0 and acc["gpu_source"] == "none seen"
    assert acc["vmhwm_bytes"] == run["peak_rss_bytes"] and acc["peak_bytes"] == model["measured_peak_bytes"]
    assert 0 < acc["pss_bytes"] <= acc["vmhwm_bytes"]  # smaps_rollup of the live runner
    assert all("swap_bytes" in s for s in run["timeline"])
    fit = next(c for c in model["checks"] if c["name"] == "memory-fit")
    assert "predicted" in fit["message"] and "error" in fit["message"]
    for name in ("report.md", "report.html"):
        text = (out / name).read_text()
        assert "peak accounting" in text and "CPU (VmHWM)" in text and "PSS" in text
    assert "predicted" in (out / "report.junit.xml").read_text()
