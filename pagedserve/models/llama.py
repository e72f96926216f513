"""The Llama family (Llama 2/3, SmolLM, Mistral) and Qwen2, which adds q/k/v biases.

Reads like the paper: token embeddings, N pre-norm decoder layers (RMSNorm -> grouped-query
attention with rotary positions -> residual; RMSNorm -> SwiGLU MLP -> residual), final RMSNorm,
LM head. Tokens of all requests in a step are flattened into one sequence of T tokens; attention
alone knows which request each token belongs to (through :class:`AttentionMetadata`).

Weights come in Hugging Face names and layout; q/k/v and gate/up are fused at load time so each
layer runs two large matmuls instead of five.

Under tensor parallelism (``tp``, a :class:`~pagedserve.parallel.distributed.TensorParallelGroup`) the
weights are this rank's shard (:mod:`pagedserve.parallel.tensor_shard`) and the config its local shapes:
o_proj and down_proj become :class:`RowParallel` (their partial outputs summed over the ranks),
the embedding looks up only its vocabulary rows (the others are zeros, summed in), and the LM
head's logits are gathered across the ranks. Without ``tp`` none of this runs.
"""

from __future__ import annotations

import logging
import math

import torch

from pagedserve.config import ModelConfig
from pagedserve.models.decoder_layers import DecoderLayers, NativeLayers, TorchLayers
from pagedserve.models.linear_kernels import (
    CpuTiles,
    Dense,
    TorchInt4,
    TorchInt8,
    pack_low_bit,
)
from pagedserve.ops import attention as torch_attention
from pagedserve.ops.attention import AttentionMetadata
from pagedserve.ops.backends import select_ops
from pagedserve.ops.cpu_kernels import Decoder, Kernels, LayerWeights
from pagedserve.ops.fused_ops import DecoderOps

logger = logging.getLogger(__name__)

SMALL_STEP_TOKENS = 8  # decode-only steps of at most this many tokens read torch's low-bit kernels


class Linear:
    """``y = x W^T + b``, through one kernel (:mod:`pagedserve.models.linear_kernels`): dense
    until :meth:`pack_low_bit` gives it a low-bit copy of W for small steps (decode-only steps
    of at most ``SMALL_STEP_TOKENS`` tokens; for the LM head, that many sampling rows).

    Prompt tokens take the dense weights in a bf16 model (see :func:`low_bit_step`), so that the
    few tokens a prefix-cache hit leaves to compute round as they did within the whole prompt;
    in a float32 model the CPU kernels serve every step, since a row's result there does not
    depend on the other rows.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight  # (out, in)
        self.bias = bias
        self.kernel: Dense = Dense(weight, bias)

    def pack_low_bit(self, bits: int, kernels: Kernels | None = None) -> None:
        """Read a `bits`-bit copy (4 or 8) on small steps from now on: in the tiles of
        `kernels` (the CPU kernels) where given and the shape fits them, else in torch's
        layouts; unchanged where no copy fits."""
        kernel = pack_low_bit(self.weight, self.bias, bits, kernels)
        if kernel is not None:
            self.kernel = kernel

    def drop_low_bit(self) -> None:
        self.kernel = Dense(self.weight, self.bias)

    # the low-bit copies by layout, None where the kernel holds another (the native decoder
    # reads the Q4_1 tiles; tests look at which one a matmul holds)
    @property
    def _q4(self) -> torch.Tensor | None:
        k = self.kernel
        return k.tiles if isinstance(k, CpuTiles) and k.bits == 4 else None

    @property
    def _q8(self) -> torch.Tensor | None:
        k = self.kernel
        return k.tiles if isinstance(k, CpuTiles) and k.bits == 8 else None

    @property
    def _int4(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        k = self.kernel
        return (k.packed, k.scales_zeros) if isinstance(k, TorchInt4) else None

    @property
    def _int8(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        k = self.kernel
        return (k.q, k.scale) if isinstance(k, TorchInt8) else None

    def __call__(self, x: torch.Tensor, small_step: bool | None = None) -> torch.Tensor:
        if small_step is None:  # the LM head: only the rows that sample
            small_step = x.shape[0] <= SMALL_STEP_TOKENS
        return self.kernel(x, small_step)


class RowParallel:
    """A matmul over this rank's share of the input features: its output is a partial sum,
    completed by one all-reduce over the ranks."""

    def __init__(self, linear: Linear, tp) -> None:
        if linear.bias is not None:
            raise ValueError("a row-parallel matmul with a bias would add it once per rank")
        self.linear, self.tp = linear, tp

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def __call__(self, x: torch.Tensor, small_step: bool | None = None) -> torch.Tensor:
        return self.tp.all_reduce(self.linear(x, small_step))


def low_bit_step(meta: AttentionMetadata, num_tokens: int) -> bool:
    """Whether a step reads the low-bit weights: decodes only, at most SMALL_STEP_TOKENS."""
    return meta.num_prefills == 0 and num_tokens <= SMALL_STEP_TOKENS


class RMSNorm:
    """Adds the previous sublayer's output to the float32 residual stream and normalizes the
    sum in float32: returns (the new stream, the normed rows in the matmul dtype)."""

    def __init__(self, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
                 ops: DecoderOps):
        self.weight = weight.float()
        self.eps = eps
        self.out_dtype = out_dtype
        self.add_rms_norm = ops.add_rms_norm

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.add_rms_norm(x, residual, self.weight, self.eps, self.out_dtype)


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
    """cos/sin tables for every position, applied the Hugging Face way (rotate halves) by
    :func:`~pagedserve.ops.fused_ops.rotary_qkv`."""

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype):
        inv_freq = rope_inv_freq(config)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (P, hd/2)
        self.cos = freqs.cos().to(dtype)
        self.sin = freqs.sin().to(dtype)

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for a step's positions, (T, 1, hd/2) each: gathered once for all layers."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


class Attention:
    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], prefix: str,
                 paged_attention, ops: DecoderOps):
        self.paged_attention = paged_attention  # the backend chosen at start-up
        self.rotary_qkv = ops.rotary_qkv
        self.nh, self.nkv, self.hd = config.num_heads, config.num_kv_heads, config.head_dim
        p = prefix + "self_attn."
        qkv_bias = None
        if config.attention_bias or (p + "q_proj.bias") in w:
            qkv_bias = torch.cat([w[p + "q_proj.bias"], w[p + "k_proj.bias"], w[p + "v_proj.bias"]])
        self.qkv = Linear(
            torch.cat([w[p + "q_proj.weight"], w[p + "k_proj.weight"], w[p + "v_proj.weight"]]),
            qkv_bias,
        )
        self.o = Linear(w[p + "o_proj.weight"])
        self.scale = self.hd**-0.5

    def __call__(self, x, rope, kv_cache, meta: AttentionMetadata, small_step: bool = False):
        T = x.shape[0]
        qkv = self.qkv(x, small_step)  # (T, (nh + 2 nkv) hd)
        # q (T, nh, hd), k and v (T, nkv, hd); q and k rotated
        q, k, v = self.rotary_qkv(qkv, *rope, self.nh, self.nkv, self.hd)
        out = self.paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o(out.view(T, self.nh * self.hd), small_step)


class MLP:
    def __init__(self, w: dict[str, torch.Tensor], prefix: str, ops: DecoderOps):
        p = prefix + "mlp."
        self.gate_up = Linear(torch.cat([w[p + "gate_proj.weight"], w[p + "up_proj.weight"]]))
        self.down = Linear(w[p + "down_proj.weight"])
        self.silu_mul = ops.silu_mul

    def __call__(self, x: torch.Tensor, small_step: bool = False) -> torch.Tensor:
        return self.down(self.silu_mul(self.gate_up(x, small_step)), small_step)


class DecoderLayer:
    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], i: int, paged_attention,
                 ops: DecoderOps):
        prefix = f"model.layers.{i}."
        eps, dtype = config.rms_norm_eps, w[prefix + "mlp.down_proj.weight"].dtype
        self.input_norm = RMSNorm(w[prefix + "input_layernorm.weight"], eps, dtype, ops)
        self.attn = Attention(config, w, prefix, paged_attention, ops)
        self.post_attn_norm = RMSNorm(w[prefix + "post_attention_layernorm.weight"], eps, dtype,
                                      ops)
        self.mlp = MLP(w, prefix, ops)

    def __call__(self, x, residual, rope, kv_cache, meta):
        """x: (T, H) float32 residual stream, still without `residual`, the output of the
        previous layer's MLP (None before the first layer); the sublayers compute in the
        weights' dtype. Returns the same pair for the next layer: each norm adds the residual
        it is handed, so an add and a norm are one fused op."""
        small = low_bit_step(meta, x.shape[0])
        x, h = self.input_norm(x, residual)
        x, h = self.post_attn_norm(x, self.attn(h, rope, kv_cache, meta, small))
        return x, self.mlp(h, small)


class LlamaForCausalLM:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype, device,
                 low_bit_small_steps: bool = False, attention=torch_attention.paged_attention,
                 consume_weights: bool = False, fused_ops: bool = False,
                 kernels: Kernels | None = None, tp=None, native_decoder: bool = True):
        """`consume_weights`: the caller hands `weights` over; it is emptied, so that each
        layer's unfused q/k/v and gate/up tensors are freed once the fused copies exist.
        `kernels`: the low-bit copies are for these CPU kernels (see :meth:`use_kernels`).
        `native_decoder`: whether a float32 model on those kernels runs its layers in one
        native call (False where the execution plan says it cannot: a KV cache it cannot read).
        `fused_ops`: the norms, residual adds, rotary and SwiGLU as Triton kernels, as the
        execution plan resolved it (True on CPU runs them under the Triton interpreter: tests).
        `tp`: the tensor-parallel group whose rank's shard `weights` and `config` are (the
        module docstring); the CPU kernels are not used then."""
        w = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        if consume_weights:
            weights.clear()
        self.config = config
        self.ops = select_ops(fused_ops)
        self.embed = w["model.embed_tokens.weight"]  # (V, H)
        head = self.embed if config.tie_word_embeddings else w.get("lm_head.weight", self.embed)
        self.lm_head = Linear(head)
        self.layers = []
        for i in range(config.num_layers):
            self.layers.append(DecoderLayer(config, w, i, attention, self.ops))
            prefix = f"model.layers.{i}."
            for name in [n for n in w if n.startswith(prefix)]:
                del w[name]
        self.tp = tp
        if tp is not None:
            for layer in self.layers:
                layer.attn.o = RowParallel(layer.attn.o, tp)
                layer.mlp.down = RowParallel(layer.mlp.down, tp)
            self.vocab_start = tp.shard.vocab(config.vocab_size)[0]
        self.norm = RMSNorm(w["model.norm.weight"], config.rms_norm_eps, dtype, self.ops)
        self.rotary = Rotary(config, config.max_position_embeddings, dtype)
        if device != "cpu":
            self.rotary.cos, self.rotary.sin = self.rotary.cos.to(device), self.rotary.sin.to(device)
        self.dtype = dtype
        self.kernels: Kernels | None = None
        # how the layers run for a step: op by op until use_kernels builds the native decoder
        self._per_op = TorchLayers(self.layers, self.rotary)
        self.decoder_layers: DecoderLayers = self._per_op
        self._native_allowed = native_decoder
        if tp is not None and (low_bit_small_steps or kernels is not None):
            raise ValueError("tensor_parallel_size > 1 runs the torch path: no low-bit copies, "
                             "no CPU kernels")
        if low_bit_small_steps and kernels is not None:
            self.use_kernels(kernels)
        elif low_bit_small_steps:
            self._pack_low_bit(None)

    def use_kernels(self, kernels: Kernels) -> None:
        """Read the low-bit weights with these CPU kernels from now on (at start-up, or when a
        background build brought them: between two steps), and in a float32 model run every
        step's layers in one native call."""
        self._pack_low_bit(kernels)
        self.kernels = kernels
        if self.dtype == torch.float32 and self._native_allowed:
            decoder = self._build_native_decoder()
            self.decoder_layers = (self._per_op if decoder is None
                                   else NativeLayers(decoder, self._per_op))

    def _pack_low_bit(self, kernels: Kernels | None) -> None:
        try:
            for layer in self.layers:
                for linear in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down):
                    linear.pack_low_bit(4, kernels)
            self.lm_head.pack_low_bit(8, kernels)
        except (RuntimeError, AttributeError) as exc:  # kernels missing in this torch build
            logger.warning("low-bit weights for small steps unavailable (%s); using dense", exc)
            for layer in self.layers:
                for linear in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down):
                    linear.drop_low_bit()
            self.lm_head.drop_low_bit()

    def native_weights(self, num_layers: int | None = None) -> list[LayerWeights] | None:
        """The first `num_layers` layers (all by default) as the native decoder takes them, or
        None unless each of their matmuls holds Q4_1 tiles."""
        weights = []
        for layer in self.layers[:num_layers]:
            linears = (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down)
            if any(linear._q4 is None for linear in linears):
                return None
            bias = layer.attn.qkv.bias
            weights.append(LayerWeights(
                input_norm=layer.input_norm.weight, qkv=layer.attn.qkv._q4,
                qkv_bias=None if bias is None else bias.float().contiguous(),
                o=layer.attn.o._q4, post_norm=layer.post_attn_norm.weight,
                gate_up=layer.mlp.gate_up._q4, down=layer.mlp.down._q4))
        return weights

    def _build_native_decoder(self) -> Decoder | None:
        """Every layer of a step in one native call, when each matmul holds Q4_1 tiles (a
        float32 model: the decoder computes in float32 around them)."""
        weights = self.native_weights()
        if weights is None:
            return None
        c = self.config
        return self.kernels.decoder(weights, self.rotary.cos, self.rotary.sin, c.num_heads,
                                    c.num_kv_heads, c.head_dim, c.rms_norm_eps)

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (T,) -> final hidden states (T, H)."""
        if self.tp is None:
            x = self.embed[input_ids].float()  # a new tensor, updated in place
        else:
            x = self._embed_shard(input_ids)
        x, residual = self.decoder_layers(x, positions, kv_caches, meta)
        return self.norm(x, residual)[1]

    def _embed_shard(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: this rank's rows [vocab_start, vocab_start + n) are looked
        up, the other tokens are zeros here and summed in from the rank that holds them."""
        local = input_ids.long() - self.vocab_start
        outside = (local < 0) | (local >= self.embed.shape[0])
        x = self.embed[local.clamp(0, self.embed.shape[0] - 1)].float()  # (T, H)
        x[outside] = 0.0
        return self.tp.all_reduce(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()  # (N, V), or (N, V/world) of this rank's rows
        if self.tp is not None:
            logits = self.tp.gather_vocab(logits, self.config.vocab_size)
        return logits

    def weight_bytes(self) -> int:
        """Bytes of the weights this process holds (a tied LM head counted once)."""
        tensors = {id(self.embed): self.embed, id(self.lm_head.weight): self.lm_head.weight}
        for layer in self.layers:
            for t in (layer.attn.qkv.weight, layer.attn.qkv.bias, layer.attn.o.weight,
                      layer.mlp.gate_up.weight, layer.mlp.down.weight, layer.input_norm.weight,
                      layer.post_attn_norm.weight):
                if t is not None:
                    tensors[id(t)] = t
        tensors[id(self.norm.weight)] = self.norm.weight
        return sum(t.numel() * t.element_size() for t in tensors.values())
