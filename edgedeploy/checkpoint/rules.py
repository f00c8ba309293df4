"""The challenge's rule check: FP16/FP32 weights only, no quantization, tensors match the config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.checkpoint.safetensors_index import TensorInfo
from edgedeploy.models import checkpoint_tensors

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"

#: Tensor-name endings that GPTQ/AWQ/bitsandbytes/Marlin checkpoints use for packed weights.
_QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".SCB", ".weight_format", ".absmax",
                   ".quant_map", ".quant_state", ".nested_absmax", ".weight_scale", ".input_scale", ".zeros")
_ALLOWED = {"F16", "F32"}
_CONVERTIBLE = {"BF16", "F64"}
#: Shown in a finding; the rest are counted so a huge failing checkpoint gives a readable message.
_NAMES_SHOWN = 5


@dataclass
class Finding:
    """One line of the rule check: a status and a message naming the offending tensors."""

    status: str
    message: str
    tensors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "tensors": self.tensors}


@dataclass
class RuleReport:
    """All findings; the overall status is the worst of them."""

    findings: list[Finding]

    @property
    def status(self) -> str:
        statuses = {f.status for f in self.findings}
        return FAIL if FAIL in statuses else WARN if WARN in statuses else PASS

    @property
    def passed(self) -> bool:
        return self.status != FAIL

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "findings": [f.to_dict() for f in self.findings]}


#: Longest tensor name shown in a finding; real names are well under 100 characters.
_NAME_CHARS = 120


def _shown(name: str) -> str:
    """A tensor name fit for a one-line message: as is when printable and short, else quoted and cut.

    Names come from safetensors headers, so a hostile one may hold line breaks or control characters.
    """
    if name.isprintable() and name.strip() == name and 0 < len(name) <= _NAME_CHARS:
        return name
    return f"{name!r:.{_NAME_CHARS}}"


def _names(names: list[str]) -> str:
    shown = ", ".join(_shown(n) for n in names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def check_rules(cfg: ModelConfig, raw_config: dict[str, Any], tensors: dict[str, TensorInfo]) -> RuleReport:
    """Check a checkpoint against the rules; ``tensors`` may be empty for a config-only folder."""
    findings: list[Finding] = []
    qcfg = raw_config.get("quantization_config")
    if qcfg:
        method = qcfg.get("quant_method", "unknown") if isinstance(qcfg, dict) else "unknown"
        method = method if isinstance(method, str) else "unknown"
        findings.append(Finding(FAIL, f"config.json has a quantization_config (quant_method={_shown(method)}): "
                                      "quantized models are not allowed"))
    if not tensors:
        findings.append(Finding(WARN, "no weights (config only): the rule check covers config.json alone"))
        return RuleReport(findings)

    packed = sorted(n for n in tensors if n.endswith(_QUANT_SUFFIXES))
    integer = sorted(n for n, t in tensors.items() if t.dtype not in _ALLOWED | _CONVERTIBLE and n not in packed)
    if packed:
        findings.append(Finding(FAIL, f"quantized (packed) tensors: {_names(packed)}", packed))
    if integer:
        kinds = sorted({tensors[n].dtype for n in integer})
        findings.append(Finding(FAIL, f"{'/'.join(kinds)} tensors are not FP16/FP32 (quantized weights?): "
                                      f"{_names(integer)}", integer))
    convertible = sorted(n for n, t in tensors.items() if t.dtype in _CONVERTIBLE)
    if convertible:
        kinds = "/".join(sorted({tensors[n].dtype for n in convertible}))
        findings.append(Finding(WARN, f"{len(convertible)} {kinds} tensors are not FP16/FP32; the build converts "
                                      "them to FP16", convertible))
    findings.extend(_layout_findings(cfg, tensors, quantized=bool(packed or integer or qcfg)))
    if cfg.layers:
        findings.append(Finding(PASS, _pruned_summary(cfg)))
    if not any(f.status != PASS for f in findings):
        dtypes = "/".join(sorted({t.dtype for t in tensors.values()}))
        findings.append(Finding(PASS, f"all {len(tensors)} tensors are {dtypes}; no quantization"))
    return RuleReport(findings)


def _pruned_summary(cfg: ModelConfig) -> str:
    """One line on a checkpoint pruned per layer: the size ranges and what the KV-cache padding costs."""
    def span(values: list[int]) -> str:
        return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"

    layers = [cfg.layer(i) for i in range(cfg.num_layers)]
    padded = cfg.kv_padding_bytes_per_token
    return (f"pruned per layer (sizes from the tensor shapes, not config.json): MLP width "
            f"{span([x.intermediate_size for x in layers])}, query heads {span([x.num_heads for x in layers])}, "
            f"KV heads {span([x.num_kv_heads for x in layers])}; the KV cache holds {cfg.num_kv_heads} KV heads in "
            f"every layer ({padded:,} bytes/token of padding, FP16)")


def _layout_findings(cfg: ModelConfig, tensors: dict[str, TensorInfo], quantized: bool) -> list[Finding]:
    expected = checkpoint_tensors(cfg)
    out: list[Finding] = []
    missing = [n for n in expected if n not in tensors]
    # A quantized checkpoint misses its float weights by construction; saying so again is noise.
    if missing and not quantized:
        out.append(Finding(FAIL, f"{len(missing)} tensors that config.json implies are missing: {_names(missing)}",
                           missing))
    wrong = [n for n, shape in expected.items() if n in tensors and tensors[n].shape != shape]
    if wrong:
        detail = "; ".join(f"{_shown(n)} is {list(tensors[n].shape)}, config implies {list(expected[n])}"
                           for n in wrong[:_NAMES_SHOWN])
        out.append(Finding(FAIL, f"{len(wrong)} tensors do not match config.json's sizes: {detail}", wrong))
    extra = sorted(n for n in tensors if n not in expected and not n.endswith(_QUANT_SUFFIXES))
    if extra and not quantized:
        out.append(Finding(WARN, f"{len(extra)} tensors the build does not use: {_names(extra)}", extra))
    return out
