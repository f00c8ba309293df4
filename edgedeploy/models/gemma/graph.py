"""Gemma (v1) graph: the Llama graph with embeddings scaled by sqrt(hidden) and ``x * (1 + w)`` RMSNorm.

transformers multiplies the embeddings by sqrt(hidden) rounded to the weights' dtype, and computes the
norm in FP32 before casting back; both are reproduced so FP32 bundles match it to the last bit pattern
that the kernels allow.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from tvm.relax.frontend import nn
from tvm.target import Target

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.models.blocks import CausalLMBase
from edgedeploy.models.llama.graph import LlamaDecoderLayer


class GemmaForCausalLM(CausalLMBase):
    """Parameter names follow Hugging Face's ``GemmaForCausalLM`` except the fused projections."""

    norm_offset = 1.0

    def __init__(self, cfg: ModelConfig, dtype: str, target: Target):
        self._setup(cfg, dtype, target, partial(LlamaDecoderLayer, norm_offset=self.norm_offset))

    def embed(self, input_ids: nn.Tensor) -> nn.Tensor:
        scale = float(np.asarray(self.cfg.hidden_size**0.5, dtype=self.dtype))
        return self.model.embed_tokens(input_ids) * scale
