"""What one architecture family declares, once: config parsing, checkpoint tensors, graph, tiny config.

Each family is a subpackage of :mod:`edgedeploy.models` whose ``__init__`` builds a :class:`Family`
(no TVM import, so ``inspect`` and ``estimate`` stay fast) and whose ``graph`` module holds the
``tvm.relax.frontend.nn`` model. The checkpoint tensors are declared as :class:`Param` lists: each
model parameter with the checkpoint tensors it is made of. The rule check's expected tensors, the
parameter count, the build's weight map and the tiny checkpoints' name translation all derive from
that one list, so a family's names are written once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

import numpy as np

from edgedeploy.checkpoint.config import ConfigFields, LayerSizes, ModelConfig

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Param:
    """One model parameter and the checkpoint tensors it is made of (several: stacked along rows)."""

    name: str
    sources: tuple[tuple[str, Shape], ...]

    @property
    def shape(self) -> Shape:
        first = self.sources[0][1]
        return (sum(s[0] for _, s in self.sources), *first[1:])


@dataclass(frozen=True)
class WeightSource:
    """Where a model parameter comes from in the checkpoint: tensors stacked along the output dim."""

    tensors: tuple[str, ...]

    def build(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """The parameter's array from the checkpoint arrays, given in ``tensors`` order."""
        if len(arrays) != len(self.tensors):
            raise ValueError(f"{self.tensors}: expected {len(self.tensors)} tensors, got {len(arrays)}")
        return arrays[0] if len(arrays) == 1 else np.concatenate(list(arrays), axis=0)


class Params:
    """Collects :class:`Param` declarations; the helpers name one checkpoint module at a time."""

    def __init__(self) -> None:
        self.items: list[Param] = []

    def add(self, name: str, *sources: tuple[str, Shape]) -> None:
        self.items.append(Param(name, tuple(sources)))

    def same(self, name: str, shape: Shape) -> None:
        """A parameter stored under the same name in the checkpoint."""
        self.add(name, (name, shape))

    def linear(self, name: str, ckpt: str, n_out: int, n_in: int, bias: bool) -> None:
        self.add(f"{name}.weight", (f"{ckpt}.weight", (n_out, n_in)))
        if bias:
            self.add(f"{name}.bias", (f"{ckpt}.bias", (n_out,)))

    def fused_linear(self, name: str, parts: Sequence[tuple[str, int]], n_in: int, bias: bool) -> None:
        """One model projection from several checkpoint ones (q|k|v, gate|up) sharing the input."""
        self.add(f"{name}.weight", *((f"{ckpt}.weight", (n, n_in)) for ckpt, n in parts))
        if bias:
            self.add(f"{name}.bias", *((f"{ckpt}.bias", (n,)) for ckpt, n in parts))

    def qkv(self, attn: str, cfg: ModelConfig, layer: int) -> None:
        """``{attn}.qkv_proj`` fused from the ``{attn}.{q,k,v}_proj`` tensors of layer ``layer``."""
        x, hd = cfg.layer(layer), cfg.head_dim
        self.fused_linear(f"{attn}.qkv_proj", [(f"{attn}.q_proj", x.num_heads * hd),
                                               (f"{attn}.k_proj", x.num_kv_heads * hd),
                                               (f"{attn}.v_proj", x.num_kv_heads * hd)], cfg.hidden_size, cfg.qkv_bias)

    def embedding_and_head(self, cfg: ModelConfig, embed: str = "model.embed_tokens") -> None:
        """The token embedding and, unless tied to it, the output head."""
        self.add("model.embed_tokens.weight", (f"{embed}.weight", (cfg.vocab_size, cfg.hidden_size)))
        if not cfg.tie_word_embeddings:
            self.linear("lm_head", "lm_head", cfg.vocab_size, cfg.hidden_size, cfg.lm_head_bias)

    def norm(self, name: str, ckpt: str, size: int, bias: bool) -> None:
        self.add(f"{name}.weight", (f"{ckpt}.weight", (size,)))
        if bias:
            self.add(f"{name}.bias", (f"{ckpt}.bias", (size,)))


#: How a family treats each field of its transformers config class (the audit ``tests/test_families.py`` checks).
READ, IGNORED = "read", "ignored"


@dataclass(frozen=True)
class Family:
    """Everything edgedeploy knows about one architecture family."""

    name: str
    #: Hugging Face class names (``architectures`` in config.json) and ``model_type`` values.
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    #: config.json -> ModelConfig; receives the fields every family shares already read (``common``).
    parse: Callable[[ConfigFields, dict[str, Any]], ModelConfig]
    #: The model parameters and their checkpoint tensors, for the sizes of ``cfg`` (per layer when pruned).
    params: Callable[[ModelConfig], list[Param]]
    #: Per-layer sizes a pruned checkpoint's tensor shapes imply for layer ``i`` (None: tensors missing).
    layer_sizes: Callable[[ModelConfig, int, Mapping[str, Shape]], LayerSizes | None]
    #: ``module:Class`` of the graph (imports TVM), constructed as ``cls(cfg, dtype, target)``.
    graph: str
    #: Every field of the transformers config class -> READ, IGNORED (with the reason) or what is refused.
    config_fields: Mapping[str, str]
    #: The transformers config of a tiny random checkpoint with ``sizes``; the numeric reference's config.
    tiny_config: Callable[[dict[str, Any], str], Any]
    #: Families without a transformers class (Qwen v1) name the family whose model is their numeric twin.
    twin: str | None = None
    #: For a twin: the checkpoint's config.json from the twin's transformers config, and back.
    config_from_twin: Callable[[Any, str], dict[str, Any]] | None = None
    twin_config: Callable[[dict[str, Any]], Any] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def model_class(self) -> type:
        module, name = self.graph.split(":")
        return getattr(import_module(module), name)


def expected_tensors(family: Family, cfg: ModelConfig) -> dict[str, Shape]:
    """Checkpoint tensor name -> shape for the model ``cfg`` describes."""
    return {name: shape for p in family.params(cfg) for name, shape in p.sources}


def weight_map(family: Family, cfg: ModelConfig) -> dict[str, WeightSource]:
    """Model parameter name -> the checkpoint tensors that make it."""
    return {p.name: WeightSource(tuple(n for n, _ in p.sources)) for p in family.params(cfg)}


def translate(params_from: list[Param], params_to: list[Param], tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Checkpoint tensors of one naming -> another, through the model parameters both declare.

    Works on numpy arrays and torch tensors alike (rows are stacked and split along dim 0).
    """
    import torch

    out: dict[str, Any] = {}
    src = {p.name: p for p in params_from}
    for p in params_to:
        q = src[p.name]
        parts = [tensors[n] for n, _ in q.sources]
        whole = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        sizes = [s[0] for _, s in p.sources]
        for (name, _), piece in zip(p.sources, torch.split(whole, sizes, dim=0), strict=True):
            out[name] = piece.contiguous()
    return out


def hf_decoder_layer_sizes(cfg: ModelConfig, i: int, shapes: Mapping[str, Shape],
                           mlp: str = "model.layers.{i}.mlp.up_proj.weight") -> LayerSizes | None:
    """Per-layer sizes from the ``model.layers.N.self_attn.{q,k}_proj`` and MLP tensors of a pruned checkpoint."""
    p = f"model.layers.{i}.self_attn"
    q, k, up = shapes.get(f"{p}.q_proj.weight"), shapes.get(f"{p}.k_proj.weight"), shapes.get(mlp.format(i=i))
    if q is None or k is None or up is None:
        return None
    return layer_sizes_from_rows(cfg, q[0], k[0], up[0])


def layer_sizes_from_rows(cfg: ModelConfig, q_rows: int, k_rows: int, mlp_rows: int) -> LayerSizes | None:
    """LayerSizes from projection row counts, or None when they are no whole number of heads."""
    hd = cfg.head_dim
    if q_rows % hd or k_rows % hd or not q_rows or not k_rows or not mlp_rows:
        return None
    nq, nkv = q_rows // hd, k_rows // hd
    if nq % nkv:
        return None
    return LayerSizes(num_heads=nq, num_kv_heads=nkv, intermediate_size=mlp_rows)


#: Fields of transformers' ``PretrainedConfig`` that every family's config.json may carry and none affects
#: the forward pass of a decoder in inference, with the reason we may ignore them.
GENERIC_FIELDS: dict[str, str] = {
    **{k: f"{IGNORED}: training or generation option of transformers, not part of the forward pass" for k in (
        "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_cache",
        "initializer_range", "attention_dropout", "chunk_size_feed_forward", "is_encoder_decoder",
        "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
        "problem_type", "tokenizer_class", "prefix", "decoder_start_token_id", "sep_token_id",
        "task_specific_params", "finetuning_task", "id2label", "label2id", "num_labels",
        "pad_token_id", "transformers_version", "model_type", "architectures", "_name_or_path",
        "output_scores", "return_dict_in_generate", "pruned_heads", "tf_legacy_loss", "use_bfloat16",
        "_attn_implementation_autoset", "_commit_hash", "auto_map", "bad_words_ids",
        "begin_suppress_tokens", "diversity_penalty", "do_sample", "early_stopping",
        "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "forced_bos_token_id",
        "forced_eos_token_id", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size",
        "num_beam_groups", "num_beams", "num_return_sequences", "remove_invalid_values",
        "repetition_penalty", "suppress_tokens", "temperature", "top_k", "top_p", "typical_p",
        "pretraining_tp", "resid_pdrop", "embd_pdrop", "attention_probs_dropout_prob",
        "hidden_dropout_prob", "hidden_dropout", "attn_dropout", "summary_type",
    )},
    "bos_token_id": f"{READ}: first token of prompts that the tokenizer asks for",
    "eos_token_id": f"{READ}: stop tokens",
    "dtype": f"{READ}: the declared dtype, shown by inspect (the build converts to --dtype)",
    "torch_dtype": f"{READ}: the declared dtype, shown by inspect (the build converts to --dtype)",
}
