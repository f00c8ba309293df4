"""Parse a Hugging Face ``config.json`` into one architecture-neutral :class:`ModelConfig`.

Every later stage (rule check, estimate, model definition, runtime) reads sizes from
``ModelConfig`` only. What differs per family (which fields exist, their defaults) lives in the family's
package under :mod:`edgedeploy.models`; this module reads the fields every family shares and checks them.
A pruned checkpoint whose layers differ in width gets per-layer sizes from its tensor shapes
(:func:`edgedeploy.models.with_layer_sizes`), since config.json cannot say so.
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
class LayerSizes:
    """The sizes pruning changes per layer: query heads, KV heads, MLP width."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of a decoder-only model, independent of the checkpoint's naming.

    With per-layer sizes (``layers``, a pruned checkpoint), ``num_heads``, ``num_kv_heads`` and
    ``intermediate_size`` are the envelope every layer fits in: the KV cache and attention kernels are
    sized by it (a layer with fewer heads is padded with empty heads), the MLPs by their own width.
    """

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
    #: Per-layer sizes of a non-uniformly pruned checkpoint; empty when every layer has the sizes above.
    layers: tuple[LayerSizes, ...] = ()
    #: Tokens each position attends back to (Mistral, Qwen2 with use_sliding_window); None: the whole context.
    sliding_window: int | None = None
    #: LayerNorm over each head of q and k before RoPE (Phi's ``qk_layernorm``).
    qk_norm: bool = False

    def layer(self, i: int) -> LayerSizes:
        """The sizes of layer ``i``."""
        if self.layers:
            return self.layers[i]
        return LayerSizes(self.num_heads, self.num_kv_heads, self.intermediate_size)

    @property
    def usable_context(self) -> int:
        """Longest context a bundle may hold: attention past a sliding window is not built, so it caps it."""
        return min(self.context_length, self.sliding_window or self.context_length)

    @property
    def kv_bytes_per_token(self) -> int:
        """FP16 bytes that one token adds to the KV cache over all layers (K and V), padding included."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    @property
    def kv_padding_bytes_per_token(self) -> int:
        """FP16 bytes per token of the KV cache that pad pruned layers up to ``num_kv_heads`` (0 when uniform)."""
        real = sum(self.layer(i).num_kv_heads for i in range(self.num_layers))
        return 2 * (self.num_layers * self.num_kv_heads - real) * self.head_dim * 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["layers"] = [asdict(x) for x in self.layers]
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
        d["layers"] = _layer_list(d.get("layers") or (), source)
        cfg = cls(**d)
        check_model_config(cfg, source)
        return cfg


def _layer_list(layers: Any, source: str) -> tuple[LayerSizes, ...]:
    """``layers`` of a serialised config: a list of objects with the three per-layer sizes."""
    if not isinstance(layers, (list, tuple)) or len(layers) > SIZE_LIMITS["num_layers"]:
        raise InputError(f"{source}: field 'layers' must be a list of per-layer sizes, got {layers!r:.60}")
    out = []
    for x in layers:
        if isinstance(x, LayerSizes):
            out.append(x)
            continue
        if not isinstance(x, dict):
            raise InputError(f"{source}: each of 'layers' must be an object, got {x!r:.60}")
        check_field_names(LayerSizes, x, f"{source}: layers")
        out.append(LayerSizes(**x))
    return tuple(out)


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
    from edgedeploy.models import family_of_architecture

    if not isinstance(cfg.architecture, str) or family_of_architecture(cfg.architecture) != cfg.family:
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
    for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "lm_head_bias", "qk_norm"):
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
    if cfg.sliding_window is not None and not (_is_int(cfg.sliding_window) and
                                               1 <= cfg.sliding_window <= SIZE_LIMITS["context_length"]):
        raise InputError(f"{source}: sliding_window must be an integer in 1..{SIZE_LIMITS['context_length']}, "
                         f"got {cfg.sliding_window!r:.60}")
    _check_layers(cfg, source)
    if cfg.rotary_dim > cfg.head_dim or cfg.rotary_dim % 2:
        # Rotate-half RoPE pairs dimension i with i + rotary_dim/2, inside one head.
        raise InputError(f"{source}: the rotary dims ({cfg.rotary_dim}) must be even and at most the head dim "
                         f"({cfg.head_dim})")


def _check_layers(cfg: ModelConfig, source: str) -> None:
    """Per-layer sizes: one per layer, each within the envelope and with whole KV groups."""
    if not cfg.layers:
        return
    if len(cfg.layers) != cfg.num_layers:
        raise InputError(f"{source}: {len(cfg.layers)} per-layer sizes for {cfg.num_layers} layers")
    group = cfg.num_heads // cfg.num_kv_heads
    for i, x in enumerate(cfg.layers):
        for name, limit in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                            ("intermediate_size", cfg.intermediate_size)):
            value = getattr(x, name)
            if not _is_int(value) or not 1 <= value <= limit:
                raise InputError(f"{source}: layer {i} {name} must be an integer in 1..{limit}, got {value!r:.60}")
        if x.num_heads % x.num_kv_heads or x.num_heads // x.num_kv_heads > group:
            raise InputError(f"{source}: layer {i} has {x.num_heads} query heads for {x.num_kv_heads} KV heads; "
                             f"each KV head may serve at most {group}")


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
        from edgedeploy.checkpoint.folder import missing_config_message

        raise InputError(missing_config_message(model_dir))
    model_file(model_dir, "config.json", str(model_dir))
    raw = read_json_object(path, "config.json")
    return parse_config(raw, source=str(path)), raw


def _architecture(raw: dict[str, Any], source: str) -> str:
    """The Hugging Face class name config.json names (``architectures``, else ``model_type``)."""
    from edgedeploy.models import FAMILIES, family_of_architecture, family_of_model_type

    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise InputError(f"{source}: field 'architectures' must be a list of class names, got {archs!r:.60}")
    if archs:
        name = archs[0]
    else:
        model_type = raw.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise InputError(f"{source}: field 'model_type' must be a string, got {model_type!r:.60}")
        family = family_of_model_type(model_type or "")
        if family is None:
            raise InputError(f"{source}: no 'architectures' list and no known 'model_type'")
        name = FAMILIES[family].architectures[0]
    if family_of_architecture(name) is None:
        supported = ", ".join(a for f in FAMILIES.values() for a in f.architectures)
        raise InputError(f"{source}: unsupported architecture {name!r:.80} (supported: {supported})")
    return name


class ConfigFields:
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
        """A positive integer at most ``limit`` (not a bool, not 2.0); ``default`` as is when absent."""
        name, value = self._find(names, default)
        if not name:
            return value
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

    def refuse(self, name: str, unless: Any, why: str) -> None:
        """:class:`InputError` naming ``name`` when config.json sets it to anything but ``unless`` (or null).

        For options the graphs do not implement: building anyway would give wrong tokens silently.
        """
        value = self.raw.get(name)
        if value is not None and value != unless:
            raise InputError(f"{self.source}: {self.arch} with {name} = {value!r:.60} is not supported: {why}")

    def head_dim(self, name: str | None, hidden: int, heads: int) -> int:
        """The head dim config.json gives in ``name``, else hidden / heads, which must then divide exactly."""
        if name is not None and self.raw.get(name) is not None:
            return self.size(name, limit=SIZE_LIMITS["head_dim"])
        if hidden % heads:
            raise InputError(f"{self.source}: hidden_size ({hidden}) is not a multiple of num_attention_heads "
                             f"({heads}) and there is no {name!r} to give the head dim")
        return hidden // heads

    def kv_heads(self, heads: int) -> int:
        """``num_key_value_heads`` (default: ``heads``, multi-head attention), which must divide ``heads``."""
        kv = self.size("num_key_value_heads", default=heads, limit=SIZE_LIMITS["num_kv_heads"])
        if heads % kv:
            raise InputError(f"{self.source}: num_attention_heads ({heads}) is not a multiple of "
                             f"num_key_value_heads ({kv})")
        return kv

    def rotary_dim(self, head_dim: int, factor: float, name: str) -> int:
        """Rotated dims of a head for a partial-rotary ``factor``: even, at least 2 (rotate-half works on pairs)."""
        dims = int(head_dim * factor)
        if dims < 2 or dims % 2:
            raise InputError(f"{self.source}: field {name!r} ({factor:g}) of head dim {head_dim} gives {dims} "
                             "rotary dims; they must be an even number of at least 2")
        return dims

    def rope(self) -> tuple[ConfigFields, dict[str, Any] | None]:
        """(fields of transformers 5 ``rope_parameters``, scaling) from old top-level keys or ``rope_parameters``."""
        params = self.raw.get("rope_parameters")
        if params is not None and not isinstance(params, dict):
            raise self.error("rope_parameters", "an object", params)
        p = ConfigFields(params or {}, self.source, self.arch, prefix="rope_parameters.")
        scaling = self.raw.get("rope_scaling") or None
        if scaling is not None:
            _check_rope_scaling(scaling, "rope_scaling", self.source)
        rope_type = p.text("rope_type", default=None)
        if scaling is None and rope_type not in (None, "default"):
            _check_rope_scaling(params, "rope_parameters", self.source)
            scaling = dict(params or {})
        return p, scaling

    def rope_theta(self, default: float = 10000.0) -> float:
        """``rope_theta`` at the top level (transformers 4) or inside ``rope_parameters`` (transformers 5)."""
        theta = self.number("rope_theta", default=None)
        return theta if theta is not None else self.rope()[0].number("rope_theta", default=default)


def parse_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Map a raw Hugging Face config dict onto :class:`ModelConfig`, checking every field it reads.

    The fields every family shares are read here; the family's own ``parse`` reads the rest.
    """
    from edgedeploy.models import FAMILIES, family_of_architecture

    arch = _architecture(raw, source)
    family = family_of_architecture(arch)
    assert family is not None  # _architecture checked it
    f = ConfigFields(raw, source, arch)
    lim = SIZE_LIMITS
    hidden = f.size("hidden_size", limit=lim["hidden_size"])
    heads = f.size("num_attention_heads", limit=lim["num_heads"])
    # transformers 5 writes ``dtype``, older versions ``torch_dtype``; both may be present and must be strings.
    declared = [f.text(name, default=None) for name in ("torch_dtype", "dtype")]
    bos = f.token_ids("bos_token_id", many=False)
    common = dict(architecture=arch, family=family, declared_dtype=next((d for d in declared if d), None),
                  bos_token_id=bos[0] if bos else None, eos_token_ids=f.token_ids("eos_token_id", many=True),
                  rope_scaling=f.rope()[1],
                  num_layers=f.size("num_hidden_layers", limit=lim["num_layers"]),
                  vocab_size=f.size("vocab_size", limit=lim["vocab_size"]),
                  hidden_size=hidden, num_heads=heads,
                  tie_word_embeddings=f.flag("tie_word_embeddings", default=False))
    cfg = FAMILIES[family].parse(f, common)
    check_model_config(cfg, source)
    return cfg
