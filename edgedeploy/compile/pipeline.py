"""Relax lowering pipelines per target kind."""

from __future__ import annotations

import tvm
from tvm import relax


def _cpu_passes(target: tvm.target.Target) -> list:
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from edgedeploy.compile.schedules import mark_noalias, schedule_cpu_matmuls

    return (cpu.library_dispatch_passes(target) + cpu.legalize_passes(target) + [schedule_cpu_matmuls]
            + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target) + [mark_noalias])


def _gpu_passes(target: tvm.target.Target) -> list:
    from tvm.relax.backend import gpu_generic
    from tvm.s_tir import dlight as dl

    # Every GPU kernel needs thread bindings; dlight's generic GPU rules give each op a valid schedule.
    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
        dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                dl.gpu.Fallback()),
    ] + gpu_generic.dataflow_lower_passes(target) + gpu_generic.finalize_passes(target)


def get_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """The pass pipeline for ``target``: CPU generic for llvm, dlight-scheduled GPU otherwise."""

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        # nn.Linear emits matmul(x, permute_dims(W)); fusing the transpose avoids materialising W^T.
        passes = [relax.transform.FuseTransposeMatmul()]
        passes += _cpu_passes(target) if target.kind.name == "llvm" else _gpu_passes(target)
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline
