"""Parse a Hugging Face ``config.json`` into one architecture-neutral :class:`ModelConfig`.

Every later stage (rule check, estimate, model definition, runtime) reads sizes from
``ModelConfig`` only, so a pruned checkpoint works as long as its config.json tells the truth.
Every field is type- and range-checked here, before any table is sized from it: a hostile or
mistyped config.json (``"num_hidden_layers": 1e12``, ``"rope_theta": "abc"``) is an
:class:`InputError` naming the field, never a traceback or an unbounded allocation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.checkpoint.folder import model_file
from edgedeploy.errors import InputError
from edgedeploy.fileio import check_field_names, read_json_object

#: Hugging Face class name -> architecture family (one module per family in ``edgedeploy.models``).
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "PhiForCausalLM": "phi",
    "QWenLMHeadModel": "qwen",
}
#: ``model_type`` -> class name, for Qwen v1 and hand-written configs that carry no ``architectures``.
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi": "PhiForCausalLM",
                  "qwen": "QWenLMHeadModel"}

#: Upper bound of every size (ModelConfig field -> largest accepted value). Generous on purpose, 4-16x the
#: largest released dense models (Llama-3.1-405B: 126 layers, hidden 16384, MLP 53248, 128 heads; Gemma:
#: vocab 262144, head dim 256; Llama 4 Scout: 10M-token context), so a real model always passes, while a
#: typo or a hostile value (10**12 layers) fails before a per-layer table or an estimate is sized from it.
SIZE_LIMITS: dict[str, int] = {
    "num_layers": 1024,
    "hidden_size": 65536,
    "num_heads": 1024,
    "num_kv_heads": 1024,
    "head_dim": 4096,
    "intermediate_size": 2**18,
    "vocab_size": 2**22,
    "context_length": 2**24,
    "rotary_dim": 4096,
}
#: Token ids (bos/eos) index the vocabulary, so they share its bound.
MAX_TOKEN_ID = SIZE_LIMITS["vocab_size"] - 1

#: RoPE scalings the models implement (``edgedeploy.models._common``) and the numbers each one reads.
_ROPE_SCALING_NUMBERS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
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
    def from_dict(cls, d: Any, source: str = "model config") -> ModelConfig:
        """The inverse of :meth:`to_dict` (a bundle's or a results file's ``config``), every field checked."""
        if not isinstance(d, dict):
            raise InputError(f"{source}: the model config must be an object, got {d!r:.60}")
        check_field_names(cls, d, source)
        d = dict(d)
        eos = d.get("eos_token_ids") or ()
        if not isinstance(eos, (list, tuple)):
            raise InputError(f"{source}: field 'eos_token_ids' must be a list, got {eos!r:.60}")
        d["eos_token_ids"] = tuple(eos)
        cfg = cls(**d)
        check_model_config(cfg, source)
        return cfg


def _is_int(value: object) -> bool:
    """A JSON integer: Python's bool is an int, but ``true`` is no size."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite JSON number (Python's json reads ``NaN`` and ``Infinity``; no size or rate is either)."""
    return (isinstance(value, float) and math.isfinite(value)) or _is_int(value)


def check_model_config(cfg: ModelConfig, source: str) -> None:
    """Every field of ``cfg`` in type and range, and the sizes consistent; :class:`InputError` naming the field.

    :func:`parse_config` checks the raw fields as it reads them (so errors name config.json's keys);
    this check covers what is derived (head dim, rotary dims) and configs that come from elsewhere.
    """
    if not isinstance(cfg.architecture, str) or ARCHITECTURES.get(cfg.architecture) != cfg.family:
        raise InputError(f"{source}: architecture {cfg.architecture!r:.60} / family {cfg.family!r:.60} "
                         "is not a supported pair")
    for name, limit in SIZE_LIMITS.items():
        value = getattr(cfg, name)
        if not _is_int(value) or not 1 <= value <= limit:
            raise InputError(f"{source}: {name} must be an integer in 1..{limit}, got {value!r:.60}")
    for name in ("norm_eps", "rope_theta"):
        value = getattr(cfg, name)
        if not _is_number(value) or value <= 0:
            raise InputError(f"{source}: {name} must be a positive number, got {value!r:.60}")
    for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "lm_head_bias"):
        if not isinstance(getattr(cfg, name), bool):
            raise InputError(f"{source}: {name} must be true/false, got {getattr(cfg, name)!r:.60}")
    if cfg.norm not in ("rms", "layer"):
        raise InputError(f"{source}: norm must be 'rms' or 'layer', got {cfg.norm!r:.60}")
    for name in ("hidden_act", "declared_dtype"):
        value = getattr(cfg, name)
        if not isinstance(value, str) and not (name == "declared_dtype" and value is None):
            raise InputError(f"{source}: {name} must be a string, got {value!r:.60}")
    for tid in ((cfg.bos_token_id,) if cfg.bos_token_id is not None else ()) + tuple(cfg.eos_token_ids):
        if not _is_int(tid) or not 0 <= tid <= MAX_TOKEN_ID:
            raise InputError(f"{source}: token ids must be integers in 0..{MAX_TOKEN_ID}, got {tid!r:.60}")
    if cfg.rope_scaling is not None:
        _check_rope_scaling(cfg.rope_scaling, "rope_scaling", source)
    if cfg.num_heads % cfg.num_kv_heads:
        raise InputError(f"{source}: num_attention_heads ({cfg.num_heads}) is not a multiple of "
                         f"num_key_value_heads ({cfg.num_kv_heads})")
    if cfg.rotary_dim > cfg.head_dim or cfg.rotary_dim % 2:
        # Rotate-half RoPE pairs dimension i with i + rotary_dim/2, inside one head.
        raise InputError(f"{source}: the rotary dims ({cfg.rotary_dim}) must be even and at most the head dim "
                         f"({cfg.head_dim})")


def _check_rope_scaling(scaling: object, name: str, source: str) -> None:
    """A RoPE scaling object: a string kind and, for the kinds we build, the positive numbers they read."""
    if not isinstance(scaling, dict):
        raise InputError(f"{source}: field {name!r} must be an object, got {scaling!r:.60}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind is not None and not isinstance(kind, str):
        raise InputError(f"{source}: field '{name}.rope_type' must be a string, got {kind!r:.60}")
    needed = _ROPE_SCALING_NUMBERS.get(kind or "", ())
    for key in sorted({k for ks in _ROPE_SCALING_NUMBERS.values() for k in ks}):
        value = scaling.get(key)
        if value is None and key not in needed:
            continue
        if not _is_number(value) or value <= 0:
            raise InputError(f"{source}: field '{name}.{key}' must be a positive number, got {value!r:.60}")


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
    model_file(model_dir, "config.json", str(model_dir))
    raw = read_json_object(path, "config.json")
    return parse_config(raw, source=str(path)), raw


def _architecture(raw: dict[str, Any], source: str) -> str:
    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise InputError(f"{source}: field 'architectures' must be a list of class names, got {archs!r:.60}")
    if archs:
        name = archs[0]
    else:
        model_type = raw.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise InputError(f"{source}: field 'model_type' must be a string, got {model_type!r:.60}")
        found = _BY_MODEL_TYPE.get(model_type or "")
        if found is None:
            raise InputError(f"{source}: no 'architectures' list and no known 'model_type'")
        name = found
    if name not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise InputError(f"{source}: unsupported architecture {name!r:.80} (supported: {supported})")
    return name


class _Fields:
    """Reads typed fields from the raw dict; every error names the field (``prefix`` for nested objects)."""

    def __init__(self, raw: dict[str, Any], source: str, arch: str, prefix: str = ""):
        self.raw, self.source, self.arch, self.prefix = raw, source, arch, prefix

    def _find(self, names: tuple[str, ...], default: Any) -> tuple[str, Any]:
        """(name, value) of the first of ``names`` present and not null; ``default`` (or an error) if none is."""
        for name in names:
            if self.raw.get(name) is not None:
                return self.prefix + name, self.raw[name]
        if default is ...:
            raise InputError(f"{self.source}: {self.arch} config lacks required field {self.prefix + names[0]!r}")
        return "", default

    def error(self, name: str, wants: str, value: Any) -> InputError:
        """The error for field ``name`` holding ``value`` where it should hold ``wants``."""
        return InputError(f"{self.source}: field {name!r} must be {wants}, got {value!r:.60}")

    def size(self, *names: str, limit: int, default: Any = ...) -> int:
        """A positive integer at most ``limit`` (not a bool, not 2.0)."""
        name, value = self._find(names, default)
        if not _is_int(value) or not 1 <= value <= limit:
            raise self.error(name, f"an integer in 1..{limit}", value)
        return value

    def number(self, *names: str, default: Any = ..., at_most: float = math.inf) -> Any:
        """A finite number in (0, ``at_most``] as a float; the default is returned as is (it may be None)."""
        name, value = self._find(names, default)
        if not name:
            return value
        if not _is_number(value) or not 0 < value <= at_most:
            raise self.error(name, "a positive number" + (f" at most {at_most:g}" if at_most < math.inf else ""),
                            value)
        return float(value)

    def flag(self, *names: str, default: bool) -> bool:
        name, value = self._find(names, default)
        if not isinstance(value, bool):
            raise self.error(name, "true/false", value)
        return value

    def text(self, *names: str, default: Any) -> Any:
        """A string, or ``default`` when the field is absent or null."""
        name, value = self._find(names, default)
        if name and not isinstance(value, str):
            raise self.error(name, "a string", value)
        return value

    def token_ids(self, name: str, many: bool) -> tuple[int, ...]:
        """A token id, or with ``many`` also a list of them (``eos_token_id`` may be either); empty when absent."""
        found, value = self._find((name,), None)
        values = value if many and isinstance(value, list) else [] if value is None else [value]
        if not all(_is_int(v) and 0 <= v <= MAX_TOKEN_ID for v in values):
            wants = f"a token id (integer in 0..{MAX_TOKEN_ID})" + (" or a list of them" if many else "")
            raise self.error(found, wants, value)
        return tuple(values)


def _rope(raw: dict[str, Any], f: _Fields) -> tuple[_Fields, dict[str, Any] | None]:
    """(fields of transformers 5 ``rope_parameters``, scaling) from old top-level keys or ``rope_parameters``."""
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise f.error("rope_parameters", "an object", params)
    p = _Fields(params or {}, f.source, f.arch, prefix="rope_parameters.")
    scaling = raw.get("rope_scaling") or None
    if scaling is not None:
        _check_rope_scaling(scaling, "rope_scaling", f.source)
    rope_type = p.text("rope_type", default=None)
    if scaling is None and rope_type not in (None, "default"):
        _check_rope_scaling(params, "rope_parameters", f.source)
        scaling = dict(params or {})
    return p, scaling


def _rotary_dim(head_dim: int, factor: float, name: str, source: str) -> int:
    """Rotated dims of a head for a partial-rotary ``factor``: even, at least 2 (rotate-half works on pairs)."""
    dims = int(head_dim * factor)
    if dims < 2 or dims % 2:
        raise InputError(f"{source}: field {name!r} ({factor:g}) of head dim {head_dim} gives {dims} rotary dims; "
                         "they must be an even number of at least 2")
    return dims


def _head_dim(f: _Fields, name: str, hidden: int, heads: int) -> int:
    """The head dim config.json gives, else hidden / heads, which must then divide exactly."""
    if f.raw.get(name) is not None:
        return f.size(name, limit=SIZE_LIMITS["head_dim"])
    if hidden % heads:
        raise InputError(f"{f.source}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
                         f"and there is no {name!r} to give the head dim")
    return hidden // heads


def parse_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Map a raw Hugging Face config dict onto :class:`ModelConfig`, checking every field it reads."""
    arch = _architecture(raw, source)
    family = ARCHITECTURES[arch]
    f = _Fields(raw, source, arch)
    lim = SIZE_LIMITS
    hidden = f.size("hidden_size", limit=lim["hidden_size"])
    heads = f.size("num_attention_heads", limit=lim["num_heads"])
    rope, scaling = _rope(raw, f)
    # transformers 5 writes ``dtype``, older versions ``torch_dtype``; both may be present and must be strings.
    declared = [f.text(name, default=None) for name in ("torch_dtype", "dtype")]
    bos = f.token_ids("bos_token_id", many=False)
    common = dict(architecture=arch, family=family, declared_dtype=next((d for d in declared if d), None),
                  bos_token_id=bos[0] if bos else None, eos_token_ids=f.token_ids("eos_token_id", many=True),
                  rope_scaling=scaling,
                  num_layers=f.size("num_hidden_layers", limit=lim["num_layers"]),
                  vocab_size=f.size("vocab_size", limit=lim["vocab_size"]),
                  tie_word_embeddings=f.flag("tie_word_embeddings", default=False))

    if family == "qwen":
        head_dim = _head_dim(f, "kv_channels", hidden, heads)
        pct = f.number("rotary_pct", default=1.0, at_most=1.0)
        # Qwen v1's intermediate_size covers w1 and w2 together, so its bound is twice ours.
        inter = f.size("intermediate_size", limit=2 * lim["intermediate_size"])
        if inter % 2:
            raise InputError(f"{source}: Qwen v1 intermediate_size must be even (w1 and w2 each take half)")
        cfg = ModelConfig(
            **common, hidden_size=hidden, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
            intermediate_size=inter // 2,
            context_length=f.size("seq_length", "max_position_embeddings", default=2048,
                                  limit=lim["context_length"]),
            norm="rms", norm_eps=f.number("layer_norm_epsilon", default=1e-6), hidden_act="silu",
            rope_theta=f.number("rotary_emb_base", default=10000.0),
            rotary_dim=_rotary_dim(head_dim, pct, "rotary_pct", source), qkv_bias=True, o_bias=False,
            mlp_bias=False, lm_head_bias=False,
        )
        check_model_config(cfg, source)
        return cfg

    kv_heads = f.size("num_key_value_heads", default=heads, limit=lim["num_kv_heads"])
    head_dim = _head_dim(f, "head_dim", hidden, heads)
    if heads % kv_heads:
        raise InputError(f"{source}: num_attention_heads ({heads}) is not a multiple of "
                         f"num_key_value_heads ({kv_heads})")
    theta = f.number("rope_theta", default=None)
    base = dict(
        **common, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=f.size("intermediate_size", limit=lim["intermediate_size"]),
        context_length=f.size("max_position_embeddings", default=2048, limit=lim["context_length"]),
        rope_theta=theta if theta is not None else rope.number("rope_theta", default=10000.0),
    )
    if family == "phi":
        factor = f.number("partial_rotary_factor", default=None, at_most=1.0)
        name = "partial_rotary_factor"
        if factor is None:
            factor, name = rope.number("partial_rotary_factor", default=0.5, at_most=1.0), f"{rope.prefix}{name}"
        cfg = ModelConfig(
            **base, norm="layer", norm_eps=f.number("layer_norm_eps", default=1e-5),
            hidden_act=f.text("hidden_act", default="gelu_new"),
            rotary_dim=_rotary_dim(head_dim, factor, name, source),
            qkv_bias=True, o_bias=True, mlp_bias=True, lm_head_bias=True,
        )
    else:
        attention_bias = f.flag("attention_bias", default=False)
        mlp_bias = f.flag("mlp_bias", default=False)
        cfg = ModelConfig(
            **base, norm="rms", norm_eps=f.number("rms_norm_eps", default=1e-6),
            hidden_act=f.text("hidden_act", default="silu"), rotary_dim=head_dim,
            qkv_bias=family == "qwen2" or attention_bias, o_bias=family == "llama" and attention_bias,
            mlp_bias=family == "llama" and mlp_bias, lm_head_bias=False,
        )
    check_model_config(cfg, source)
    return cfg
