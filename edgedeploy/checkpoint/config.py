"""Parse a Hugging Face ``config.json`` into one architecture-neutral :class:`ModelConfig`.

Every later stage (rule check, estimate, model definition, runtime) reads sizes from
``ModelConfig`` only, so a pruned checkpoint works as long as its config.json tells the truth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.errors import InputError
from edgedeploy.fileio import read_json_object

#: Hugging Face class name -> architecture family (one module per family in ``edgedeploy.models``).
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "PhiForCausalLM": "phi",
    "QWenLMHeadModel": "qwen",
}


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of a decoder-only model, independent of the checkpoint's naming."""

    architecture: str
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    #: Width of one MLP branch (Qwen v1 stores twice this in its config; we halve it).
    intermediate_size: int
    vocab_size: int
    context_length: int
    tie_word_embeddings: bool
    norm: str  # "rms" or "layer"
    norm_eps: float
    hidden_act: str
    rope_theta: float
    #: Number of leading dims of each head that are rotated (Phi-2: 32 of 80).
    rotary_dim: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    lm_head_bias: bool
    rope_scaling: dict[str, Any] | None = None
    #: dtype that config.json declares (``torch_dtype``/``dtype``); informational only.
    declared_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def kv_bytes_per_token(self) -> int:
        """FP16 bytes that one token adds to the KV cache over all layers (K and V)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)


def load_config(model_dir: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read ``model_dir/config.json``; return the parsed config and the raw dict.

    Raises :class:`InputError` (exit code 2) for every way the folder or file can be wrong.
    """
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise InputError(f"{model_dir}: no such folder")
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: is a file, expected a model folder")
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(f"{model_dir}: no config.json (is this a Hugging Face model folder?)")
    raw = read_json_object(path, "config.json")
    return parse_config(raw, source=str(path)), raw


def _architecture(raw: dict[str, Any], source: str) -> str:
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs:
        name = archs[0]
    else:
        # Qwen v1 and some hand-written configs only carry model_type.
        by_type = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi": "PhiForCausalLM",
                   "qwen": "QWenLMHeadModel"}
        name = by_type.get(str(raw.get("model_type", "")))
        if name is None:
            raise InputError(f"{source}: no 'architectures' list and no known 'model_type'")
    if name not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise InputError(f"{source}: unsupported architecture {name!r} (supported: {supported})")
    return name


class _Fields:
    """Reads typed fields from the raw dict and names the missing one in the error."""

    def __init__(self, raw: dict[str, Any], source: str, arch: str):
        self.raw, self.source, self.arch = raw, source, arch

    def get(self, *names: str, default: Any = ..., kind: type = int) -> Any:
        for name in names:
            if name in self.raw and self.raw[name] is not None:
                value = self.raw[name]
                if kind is bool:
                    if not isinstance(value, bool):
                        raise InputError(f"{self.source}: field {name!r} must be true/false, got {value!r}")
                    return value
                if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                    raise InputError(f"{self.source}: field {name!r} must be a positive integer, got {value!r}")
                if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise InputError(f"{self.source}: field {name!r} must be a number, got {value!r}")
                return kind(value)
        if default is ...:
            raise InputError(f"{self.source}: {self.arch} config lacks required field {names[0]!r}")
        return default


def _rope(raw: dict[str, Any]) -> tuple[float | None, float | None, dict[str, Any] | None]:
    """(theta, partial_rotary_factor, scaling) from old top-level keys or transformers 5 ``rope_parameters``."""
    params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    theta = raw.get("rope_theta", params.get("rope_theta"))
    partial = raw.get("partial_rotary_factor", params.get("partial_rotary_factor"))
    scaling = raw.get("rope_scaling") or None
    rope_type = params.get("rope_type")
    if scaling is None and rope_type not in (None, "default"):
        scaling = dict(params)
    return theta, partial, scaling


def _eos(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if isinstance(eos, int):
        return (eos,)
    if isinstance(eos, list):
        return tuple(int(e) for e in eos if isinstance(e, int))
    return ()


def parse_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Map a raw Hugging Face config dict onto :class:`ModelConfig`."""
    arch = _architecture(raw, source)
    family = ARCHITECTURES[arch]
    f = _Fields(raw, source, arch)
    theta, partial, scaling = _rope(raw)
    dtype = raw.get("torch_dtype") or raw.get("dtype")
    common = dict(architecture=arch, family=family, declared_dtype=str(dtype) if dtype else None,
                  bos_token_id=raw.get("bos_token_id") if isinstance(raw.get("bos_token_id"), int) else None,
                  eos_token_ids=_eos(raw), rope_scaling=scaling)

    if family == "qwen":
        hidden = f.get("hidden_size")
        heads = f.get("num_attention_heads")
        head_dim = f.get("kv_channels", default=hidden // heads)
        pct = f.get("rotary_pct", default=1.0, kind=float)
        inter = f.get("intermediate_size")
        if inter % 2:
            raise InputError(f"{source}: Qwen v1 intermediate_size must be even (w1 and w2 each take half)")
        return ModelConfig(
            **common, num_layers=f.get("num_hidden_layers"), hidden_size=hidden, num_heads=heads,
            num_kv_heads=heads, head_dim=head_dim, intermediate_size=inter // 2,
            vocab_size=f.get("vocab_size"),
            context_length=f.get("seq_length", "max_position_embeddings", default=2048),
            tie_word_embeddings=f.get("tie_word_embeddings", default=False, kind=bool),
            norm="rms", norm_eps=f.get("layer_norm_epsilon", default=1e-6, kind=float), hidden_act="silu",
            rope_theta=f.get("rotary_emb_base", default=10000.0, kind=float),
            rotary_dim=int(head_dim * pct), qkv_bias=True, o_bias=False, mlp_bias=False, lm_head_bias=False,
        )

    hidden = f.get("hidden_size")
    heads = f.get("num_attention_heads")
    kv_heads = f.get("num_key_value_heads", default=heads)
    head_dim = f.get("head_dim", default=hidden // heads)
    if heads % kv_heads:
        raise InputError(f"{source}: num_attention_heads ({heads}) is not a multiple of "
                         f"num_key_value_heads ({kv_heads})")
    base = dict(
        **common, num_layers=f.get("num_hidden_layers"), hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=f.get("intermediate_size"),
        vocab_size=f.get("vocab_size"), context_length=f.get("max_position_embeddings", default=2048),
        rope_theta=float(theta) if theta is not None else 10000.0,
    )
    if family == "phi":
        factor = float(partial) if partial is not None else 0.5
        return ModelConfig(
            **base, tie_word_embeddings=f.get("tie_word_embeddings", default=False, kind=bool), norm="layer",
            norm_eps=f.get("layer_norm_eps", default=1e-5, kind=float),
            hidden_act=str(raw.get("hidden_act", "gelu_new")), rotary_dim=int(head_dim * factor),
            qkv_bias=True, o_bias=True, mlp_bias=True, lm_head_bias=True,
        )
    attention_bias = family == "qwen2" or f.get("attention_bias", default=False, kind=bool)
    return ModelConfig(
        **base, tie_word_embeddings=f.get("tie_word_embeddings", default=False, kind=bool), norm="rms",
        norm_eps=f.get("rms_norm_eps", default=1e-6, kind=float), hidden_act=str(raw.get("hidden_act", "silu")),
        rotary_dim=head_dim, qkv_bias=attention_bias,
        o_bias=family == "llama" and f.get("attention_bias", default=False, kind=bool),
        mlp_bias=family == "llama" and f.get("mlp_bias", default=False, kind=bool), lm_head_bias=False,
    )
