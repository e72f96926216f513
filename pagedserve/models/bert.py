"""BERT-family text encoders for embeddings: BERT (all-MiniLM, bge) and nomic-bert.

Reads like the paper (post-LN, bidirectional): token + token-type (+ absolute position)
embeddings -> LayerNorm; then N layers of ``x = LN(x + Attention(x))``,
``x = LN(x + MLP(x))``. No causal mask, no KV cache: a text is encoded in one pass.

=========== ============================== ==========================================
            bert                           nomic-bert (nomic-embed-text)
=========== ============================== ==========================================
positions   learned absolute table         rotary on q and k (halves rotated, NeoX)
MLP         down(gelu(up(x)))              down(silu(gate(x)) * up(x))   (SwiGLU)
biases      every linear layer             none on linear layers (LayerNorms have)
=========== ============================== ==========================================

A batch of texts of different lengths runs packed: the N tokens of all texts are rows of one
(N, H) tensor, so every matmul (most of the work) skips padding. Only attention pads, to
(B, heads, T, head_dim) with T the longest text, and masks the padded keys::

    packed row r of text b at position p      r = cu_seqlens[b] + p
    padded row of the same token              b * T + p        (`PackedBatch.pad_index`)

Weights come under Hugging Face BertModel names (see :func:`encoder_weight_names`); the
loaders map nomic's and llama.cpp's names onto them. nomic's SwiGLU gate, which BERT lacks,
is ``encoder.layer.N.intermediate.gate.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

EncoderArchitecture = Literal["bert", "nomic-bert"]
ENCODER_ARCHITECTURES = ("bert", "nomic-bert")
HiddenAct = Literal["gelu", "gelu_tanh", "silu"]
HIDDEN_ACTS = ("gelu", "gelu_tanh", "silu")


@dataclass(slots=True)
class EncoderConfig:
    """An encoder's shape, read from config.json or GGUF metadata."""

    architecture: EncoderArchitecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int  # positions the model was trained on
    type_vocab_size: int = 2  # token-type rows; every token is type 0 ("sentence A")
    layer_norm_eps: float = 1e-12
    hidden_act: HiddenAct = "gelu"  # bert's MLP activation; nomic-bert's SwiGLU is silu
    rope_theta: float = 1000.0  # nomic-bert's rotary base (nomic-embed-text: 1000)

    def __post_init__(self) -> None:
        if self.architecture not in ENCODER_ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ENCODER_ARCHITECTURES)}, "
                             f"got {self.architecture!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act must be one of {', '.join(HIDDEN_ACTS)}, "
                             f"got {self.hidden_act!r}")
        if self.rotary and self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary(self) -> bool:
        """Rotary positions instead of a learned table (nomic-bert)."""
        return self.architecture == "nomic-bert"

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU instead of a plain MLP (nomic-bert)."""
        return self.architecture == "nomic-bert"

    @property
    def linear_biases(self) -> bool:
        return self.architecture == "bert"


def encoder_weight_names(config: EncoderConfig) -> list[str]:
    """Every tensor an encoder of this config needs, under BertModel names."""
    names = ["embeddings.word_embeddings.weight",
             "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    if not config.rotary:
        names.append("embeddings.position_embeddings.weight")
    linears = ["attention.self.query", "attention.self.key", "attention.self.value",
               "attention.output.dense", "intermediate.dense", "output.dense"]
    norms = ["attention.output.LayerNorm", "output.LayerNorm"]
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}."
        for linear in linears:
            names.append(p + linear + ".weight")
            if config.linear_biases:
                names.append(p + linear + ".bias")
        if config.gated_mlp:
            names.append(p + "intermediate.gate.weight")
        names += [p + norm + suffix for norm in norms for suffix in (".weight", ".bias")]
    return names


@dataclass(slots=True)
class PackedBatch:
    """B texts' tokens as one packed sequence (see the module docstring)."""

    input_ids: torch.Tensor  # (N,) int64
    positions: torch.Tensor  # (N,) int64: 0 .. n_b - 1 within each text
    cu_seqlens: torch.Tensor  # (B + 1,) int64, on the CPU
    max_len: int  # T, the longest text
    pad_index: torch.Tensor | None  # (N,) int64 row of each token in (B * T); None when B == 1
    key_mask: torch.Tensor | None  # (B, 1, 1, T) bool: True on real keys; None when B == 1

    @classmethod
    def of(cls, token_ids: list[list[int]], device: torch.device | str = "cpu") -> PackedBatch:
        lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.int64)
        if len(token_ids) == 0 or int(lengths.min()) == 0:
            raise ValueError("input must hold at least one token per text")
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=cu[1:])
        n, max_len = int(cu[-1]), int(lengths.max())
        flat = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.int64)
        starts = torch.repeat_interleave(cu[:-1], lengths)  # (N,) first row of each row's text
        positions = torch.arange(n, dtype=torch.int64) - starts
        pad_index = key_mask = None
        if len(token_ids) > 1:
            text = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            pad_index = (text * max_len + positions).to(device)
            key_mask = (torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)).view(
                len(lengths), 1, 1, max_len).to(device)
        return cls(flat.to(device), positions.to(device), cu, max_len, pad_index, key_mask)

    @property
    def num_texts(self) -> int:
        return len(self.cu_seqlens) - 1


class _LayerNorm:
    """LayerNorm computed in float32 on the float32 residual stream."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        self.weight, self.bias, self.eps = weight.float(), bias.float(), eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, hd) rotated by position, halves paired (i, i + hd/2); cos, sin (N, 1, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch,
               scale: float) -> torch.Tensor:
    """q, k, v (N, heads, hd) packed -> (N, heads, hd): each text attends to itself only."""
    n, nh, hd = q.shape
    if batch.pad_index is None:  # one text: nothing to pad or mask
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0), scale=scale)  # (1, nh, N, hd)
        return out.squeeze(0).transpose(0, 1)
    b, t = batch.num_texts, batch.max_len

    def padded(x: torch.Tensor) -> torch.Tensor:  # (N, nh, hd) -> (B, nh, T, hd)
        out = x.new_zeros(b * t, nh, hd)
        out.index_copy_(0, batch.pad_index, x)
        return out.view(b, t, nh, hd).transpose(1, 2)

    # padded query rows attend too (every text has a real key) and are dropped below
    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v),
                                         attn_mask=batch.key_mask, scale=scale)
    return out.transpose(1, 2).reshape(b * t, nh, hd).index_select(0, batch.pad_index)


class EncoderLayer:
    def __init__(self, config: EncoderConfig, w: dict[str, torch.Tensor], i: int,
                 dtype: torch.dtype):
        p = f"encoder.layer.{i}."
        self.nh, self.hd, self.dtype = config.num_heads, config.head_dim, dtype
        self.act, self.gated = config.hidden_act, config.gated_mlp
        eps = config.layer_norm_eps

        def bias(name: str) -> torch.Tensor | None:
            return w.get(p + name + ".bias")

        qkv = ["attention.self.query", "attention.self.key", "attention.self.value"]
        self.qkv_w = torch.cat([w[p + name + ".weight"] for name in qkv])  # (3H, H)
        biases = [bias(name) for name in qkv]
        self.qkv_b = torch.cat(biases) if all(b is not None for b in biases) else None
        self.o_w, self.o_b = w[p + "attention.output.dense.weight"], bias("attention.output.dense")
        self.attn_norm = _LayerNorm(w[p + "attention.output.LayerNorm.weight"],
                                    w[p + "attention.output.LayerNorm.bias"], eps)
        up = w[p + "intermediate.dense.weight"]
        # SwiGLU: gate and up in one matmul, gate rows first
        self.up_w = torch.cat([w[p + "intermediate.gate.weight"], up]) if self.gated else up
        self.up_b = bias("intermediate.dense")
        self.down_w, self.down_b = w[p + "output.dense.weight"], bias("output.dense")
        self.out_norm = _LayerNorm(w[p + "output.LayerNorm.weight"],
                                   w[p + "output.LayerNorm.bias"], eps)
        self.scale = self.hd ** -0.5

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        up = F.linear(h, self.up_w, self.up_b)
        if self.gated:
            gate, up = up.chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, self.down_w, self.down_b)
        act = F.gelu(up, approximate="tanh" if self.act == "gelu_tanh" else "none")
        return F.linear(act, self.down_w, self.down_b)

    def __call__(self, x: torch.Tensor, batch: PackedBatch,
                 rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x: (N, H) float32 residual stream -> the same after this layer."""
        n = x.shape[0]
        h = x.to(self.dtype)
        q, k, v = F.linear(h, self.qkv_w, self.qkv_b).view(n, 3, self.nh, self.hd).unbind(1)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        attn = _attention(q, k, v, batch, self.scale).reshape(n, self.nh * self.hd)
        x = self.attn_norm(x + F.linear(attn, self.o_w, self.o_b).float())
        return self.out_norm(x + self._mlp(x.to(self.dtype)).float())


class BertEncoder:
    """The encoder over packed batches; weights in `dtype` on `device`, norms in float32."""

    def __init__(self, config: EncoderConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        missing = [n for n in encoder_weight_names(config) if n not in weights]
        if missing:
            raise ValueError(f"weights: missing {missing[0]!r}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        w = {name: t.to(device=device, dtype=dtype) for name, t in weights.items()}
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.word = w["embeddings.word_embeddings.weight"]  # (V, H)
        types = w.get("embeddings.token_type_embeddings.weight")
        # every token is type 0: one row added to all
        self.type0 = None if types is None else types[0].float()
        self.positions = None if config.rotary else w["embeddings.position_embeddings.weight"]
        self.embed_norm = _LayerNorm(w["embeddings.LayerNorm.weight"],
                                     w["embeddings.LayerNorm.bias"], config.layer_norm_eps)
        self.layers = [EncoderLayer(config, w, i, dtype) for i in range(config.num_layers)]
        self.cos = self.sin = None
        if config.rotary:
            hd = config.head_dim
            inv_freq = 1.0 / (config.rope_theta ** (
                torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            t = torch.arange(config.max_position_embeddings, dtype=torch.float64)
            freqs = torch.outer(t, inv_freq)  # (P, hd/2)
            self.cos = freqs.cos().to(device=device, dtype=dtype)
            self.sin = freqs.sin().to(device=device, dtype=dtype)

    @torch.inference_mode()
    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Final hidden states (N, H) float32, packed as `batch`."""
        if batch.max_len > self.config.max_position_embeddings:
            raise ValueError(f"input: a text of {batch.max_len} tokens is longer than the "
                             f"model's {self.config.max_position_embeddings} positions")
        x = self.word[batch.input_ids].float()
        if self.type0 is not None:
            x += self.type0
        if self.positions is not None:
            x += self.positions[batch.positions].float()
        x = self.embed_norm(x)
        rope = None
        if self.cos is not None:
            rope = (self.cos[batch.positions].unsqueeze(1), self.sin[batch.positions].unsqueeze(1))
        for layer in self.layers:
            x = layer(x, batch, rope)
        return x
