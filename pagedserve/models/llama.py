"""The Llama family (Llama 2/3, SmolLM, Mistral) and Qwen2, which adds q/k/v biases.

Reads like the paper: token embeddings, N pre-norm decoder layers (RMSNorm -> grouped-query
attention with rotary positions -> residual; RMSNorm -> SwiGLU MLP -> residual), final RMSNorm,
LM head. Tokens of all requests in a step are flattened into one sequence of T tokens; attention
alone knows which request each token belongs to (through :class:`AttentionMetadata`).

Weights come in Hugging Face names and layout; q/k/v and gate/up are fused at load time so each
layer runs two large matmuls instead of five.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pagedserve.attention import AttentionMetadata, paged_attention
from pagedserve.config import ModelConfig


class RMSNorm:
    """Normalizes in float32 (the residual stream's dtype), returns the matmul dtype."""

    def __init__(self, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
        self.weight = weight.float()
        self.eps = eps
        self.out_dtype = out_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(var + self.eps) * self.weight).to(self.out_dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama 3's and linear scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind not in ("default", None):
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return inv_freq.float()


class Rotary:
    """cos/sin tables for every position, applied the Hugging Face way (rotate halves)."""

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype):
        inv_freq = rope_inv_freq(config)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (P, hd/2)
        self.cos = freqs.cos().to(dtype)
        self.sin = freqs.sin().to(dtype)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: (T, heads, hd)
        cos = self.cos[positions].unsqueeze(1)  # (T, 1, hd/2)
        sin = self.sin[positions].unsqueeze(1)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention:
    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], prefix: str):
        self.nh, self.nkv, self.hd = config.num_heads, config.num_kv_heads, config.head_dim
        p = prefix + "self_attn."
        self.qkv_weight = torch.cat(
            [w[p + "q_proj.weight"], w[p + "k_proj.weight"], w[p + "v_proj.weight"]]
        )
        self.qkv_bias = None
        if config.attention_bias or (p + "q_proj.bias") in w:
            self.qkv_bias = torch.cat(
                [w[p + "q_proj.bias"], w[p + "k_proj.bias"], w[p + "v_proj.bias"]]
            )
        self.o_weight = w[p + "o_proj.weight"]
        self.scale = self.hd**-0.5

    def __call__(self, x, positions, rotary, kv_cache, meta: AttentionMetadata):
        T = x.shape[0]
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)  # (T, (nh + 2 nkv) hd)
        q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = rotary(q.view(T, self.nh, self.hd), positions)  # (T, nh, hd)
        k = rotary(k.view(T, self.nkv, self.hd), positions)  # (T, nkv, hd)
        v = v.reshape(T, self.nkv, self.hd)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return F.linear(out.view(T, self.nh * self.hd), self.o_weight)


class MLP:
    def __init__(self, w: dict[str, torch.Tensor], prefix: str):
        p = prefix + "mlp."
        self.gate_up = torch.cat([w[p + "gate_proj.weight"], w[p + "up_proj.weight"]])
        self.down = w[p + "down_proj.weight"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


class DecoderLayer:
    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], i: int):
        prefix = f"model.layers.{i}."
        eps, dtype = config.rms_norm_eps, w[prefix + "mlp.down_proj.weight"].dtype
        self.input_norm = RMSNorm(w[prefix + "input_layernorm.weight"], eps, dtype)
        self.attn = Attention(config, w, prefix)
        self.post_attn_norm = RMSNorm(w[prefix + "post_attention_layernorm.weight"], eps, dtype)
        self.mlp = MLP(w, prefix)

    def __call__(self, x, positions, rotary, kv_cache, meta):
        # x: (T, H) float32 residual stream; the sublayers compute in the weights' dtype
        x = x + self.attn(self.input_norm(x), positions, rotary, kv_cache, meta)
        return x + self.mlp(self.post_attn_norm(x))


class LlamaForCausalLM:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype, device):
        w = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        self.config = config
        self.embed = w["model.embed_tokens.weight"]  # (V, H)
        self.lm_head = w.get("lm_head.weight", self.embed)
        if config.tie_word_embeddings:
            self.lm_head = self.embed
        self.layers = [DecoderLayer(config, w, i) for i in range(config.num_layers)]
        self.norm = RMSNorm(w["model.norm.weight"], config.rms_norm_eps, dtype)
        self.rotary = Rotary(config, config.max_position_embeddings, dtype)
        if device != "cpu":
            self.rotary.cos, self.rotary.sin = self.rotary.cos.to(device), self.rotary.sin.to(device)

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (T,) -> final hidden states (T, H)."""
        x = self.embed[input_ids].float()
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, positions, self.rotary, kv_cache, meta)
        return self.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()  # (N, V)
