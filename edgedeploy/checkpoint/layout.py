"""The tensors each architecture family stores in its Hugging Face checkpoint, derived from config.

One table serves three jobs: counting parameters from config.json alone (``estimate`` on a
"what if I prune to X" config), checking that a checkpoint holds what its config promises, and
telling the compiler which checkpoint tensor feeds which model parameter.
"""

from __future__ import annotations

from edgedeploy.checkpoint.config import ModelConfig

Shape = tuple[int, ...]


def _linear(out: dict[str, Shape], name: str, n_out: int, n_in: int, bias: bool) -> None:
    out[f"{name}.weight"] = (n_out, n_in)
    if bias:
        out[f"{name}.bias"] = (n_out,)


def _norm(out: dict[str, Shape], name: str, size: int, bias: bool) -> None:
    out[f"{name}.weight"] = (size,)
    if bias:
        out[f"{name}.bias"] = (size,)


def _qwen_v1(cfg: ModelConfig) -> dict[str, Shape]:
    h, proj = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    t: dict[str, Shape] = {"transformer.wte.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"transformer.h.{i}"
        _norm(t, f"{p}.ln_1", h, False)
        _linear(t, f"{p}.attn.c_attn", 3 * proj, h, True)
        _linear(t, f"{p}.attn.c_proj", h, proj, False)
        _norm(t, f"{p}.ln_2", h, False)
        _linear(t, f"{p}.mlp.w1", cfg.intermediate_size, h, False)
        _linear(t, f"{p}.mlp.w2", cfg.intermediate_size, h, False)
        _linear(t, f"{p}.mlp.c_proj", h, cfg.intermediate_size, False)
    _norm(t, "transformer.ln_f", h, False)
    if not cfg.tie_word_embeddings:
        _linear(t, "lm_head", cfg.vocab_size, h, False)
    return t


def _hf_decoder(cfg: ModelConfig) -> dict[str, Shape]:
    """Llama, Qwen2 and Phi share ``model.layers.N.self_attn.{q,k,v}_proj`` naming."""
    h, hd = cfg.hidden_size, cfg.head_dim
    phi = cfg.family == "phi"
    t: dict[str, Shape] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        _norm(t, f"{p}.input_layernorm", h, phi)
        _linear(t, f"{p}.self_attn.q_proj", cfg.num_heads * hd, h, cfg.qkv_bias)
        _linear(t, f"{p}.self_attn.k_proj", cfg.num_kv_heads * hd, h, cfg.qkv_bias)
        _linear(t, f"{p}.self_attn.v_proj", cfg.num_kv_heads * hd, h, cfg.qkv_bias)
        if phi:
            _linear(t, f"{p}.self_attn.dense", h, cfg.num_heads * hd, cfg.o_bias)
            _linear(t, f"{p}.mlp.fc1", cfg.intermediate_size, h, cfg.mlp_bias)
            _linear(t, f"{p}.mlp.fc2", h, cfg.intermediate_size, cfg.mlp_bias)
        else:
            _linear(t, f"{p}.self_attn.o_proj", h, cfg.num_heads * hd, cfg.o_bias)
            _norm(t, f"{p}.post_attention_layernorm", h, False)
            _linear(t, f"{p}.mlp.gate_proj", cfg.intermediate_size, h, cfg.mlp_bias)
            _linear(t, f"{p}.mlp.up_proj", cfg.intermediate_size, h, cfg.mlp_bias)
            _linear(t, f"{p}.mlp.down_proj", h, cfg.intermediate_size, cfg.mlp_bias)
    _norm(t, "model.final_layernorm" if phi else "model.norm", h, phi)
    if not cfg.tie_word_embeddings:
        _linear(t, "lm_head", cfg.vocab_size, h, cfg.lm_head_bias)
    return t


def expected_tensors(cfg: ModelConfig) -> dict[str, Shape]:
    """Checkpoint tensor name -> shape, in checkpoint naming, for the model ``cfg`` describes."""
    return _qwen_v1(cfg) if cfg.family == "qwen" else _hf_decoder(cfg)


def parameter_count(cfg: ModelConfig) -> int:
    """Exact number of parameters a checkpoint of this config holds (tied head counted once)."""
    total = 0
    for shape in expected_tensors(cfg).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total
