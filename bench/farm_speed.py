"""Wall time of a farm run on three virtual phones against the same jobs one after another.

Usage: ``python bench/farm_speed.py [--models 2] [--runs 2] [--warmup 1] [--prompts chat-short] [--threads 1]
[--repeat 1] [--json]``. Makes ``--models`` tiny Llama checkpoints (different seeds), builds host bundles of
them, starts three virtual phones on 127.0.0.1 (one profile), and times ``edgedeploy farm run`` over all
(model, phone) pairs twice with the same jobs: with ``--parallel 1`` (one job at a time: the jobs one after
another) and with one job per phone at once (the farm's default). Prints both wall times (the whole
``farm run`` process, best of ``--repeat``) and parallel ÷ sequential; the issue's target is ≤ 0.5.
Everything (checkpoints, bundles, sandboxes, reports) lives in a temporary folder; the phones are stopped
by pid at the end.

On a host the phones are processes of this machine, so every runner and the host-side parity run share
its CPUs: the ratio also says how many cores the runs had (``--threads 1`` keeps each runner to one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _farm(inventory: Path, bundles: list[Path], out: Path, extra: list[str]) -> tuple[float, dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgedeploy.cli", "farm", "run", "--inventory", str(inventory),
                           *map(str, bundles), "--out", str(out), "--json", "--no-history", *extra],
                          env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"farm run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", nargs="+", default=["chat-short"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from edgedeploy.compile.build import build_bundle
    from edgedeploy.devices.virtual_phone_process import VirtualPhoneProcess
    from edgedeploy.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="edgedeploy-farm-bench-") as tmp:
        root = Path(tmp)
        bundles = []
        for i in range(args.models):
            ckpt = make_tiny_checkpoint(root / "hf" / f"tiny-{i}", "llama", dtype="float16", seed=i)
            bundles.append(root / f"tiny-{i}")
            build_bundle(ckpt, bundles[-1], target="host", context_window=128, prefill_chunk=32)
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        phones = [VirtualPhoneProcess(root / f"phone-{n}", "--budget-mb", "3000", env=env) for n in range(3)]
        try:
            for p in phones:
                p.start()
            inventory = root / "farm.toml"
            inventory.write_text("".join(f'[[device]]\naddress = "tcp:127.0.0.1:{p.port}"\n'
                                         'profile = "reference-12gb"\n\n' for p in phones))
            common = ["--runs", str(args.runs), "--warmup", str(args.warmup), "--threads", str(args.threads),
                      "--prompts", *args.prompts]
            seq, par = [], []
            for r in range(args.repeat):
                seq.append(_farm(inventory, bundles, root / f"seq{r}", [*common, "--parallel", "1"]))
                par.append(_farm(inventory, bundles, root / f"par{r}", common))
        finally:
            for p in phones:
                p.stop()
    s_wall, s_res = min(seq, key=lambda x: x[0])
    p_wall, p_res = min(par, key=lambda x: x[0])
    jobs = len(s_res["pairs"])
    ratio = p_wall / s_wall
    out = {"jobs": jobs, "phones": 3, "cpus": os.cpu_count(), "sequential_s": round(s_wall, 2),
           "parallel_s": round(p_wall, 2), "ratio": round(ratio, 3),
           "sequential_farm_wall_s": s_res["wall_s"], "parallel_farm_wall_s": p_res["wall_s"],
           "farm_ratio": round(p_res["wall_s"] / s_res["wall_s"], 3), "options": common}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{jobs} jobs ({args.models} models x 3 phones), {os.cpu_count()} CPUs, {' '.join(common)}")
    print(f"one after another (--parallel 1): {s_wall:7.1f} s   (farm's own wall {s_res['wall_s']:.1f} s)")
    print(f"3 phones in parallel:             {p_wall:7.1f} s   (farm's own wall {p_res['wall_s']:.1f} s)")
    print(f"parallel / sequential:            {ratio:7.2f}x  (farm's own walls: {out['farm_ratio']:.2f}x; "
          "target <= 0.5)")


if __name__ == "__main__":
    main()
