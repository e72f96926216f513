"""The offline benchmark's peer: transformers' batched ``generate`` on the same prompts.

For random-weight shapes (``dummy:NAME``) the transformers model is built around the very
tensors the engine was given (on the meta device, then ``load_state_dict(assign=True)``): no
copy, no second set of weights on the GPU, and both sides compute with identical weights. For
model files it loads the files itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pagedserve.bench.offline import OfflineResult
from pagedserve.config import ModelConfig


def hf_config(config: ModelConfig):
    """The transformers config of a shape (legacy rope kwargs: transformers 4 and 5 read them)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )
    if config.architecture == "qwen2":
        if config.head_dim * config.num_heads != config.hidden_size:
            raise ValueError("a Qwen2 shape needs head_dim x num_heads == hidden_size")
        return Qwen2Config(**common)
    return LlamaConfig(**common, head_dim=config.head_dim, attention_bias=config.attention_bias)


@torch.no_grad()
def transformers_on(config: ModelConfig, weights: dict[str, torch.Tensor]):
    """A transformers model whose parameters *are* `weights` (Hugging Face names)."""
    from transformers import AutoModelForCausalLM

    device = next(iter(weights.values())).device
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(config))
    model.load_state_dict(weights, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # non-persistent buffers (rotary inverse frequencies) were made on the meta device
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            with torch.device(device):
                setattr(parent, name.rpartition(".")[2], type(module)(model.config))
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"weights do not cover {meta[0]!r} (and {len(meta) - 1} more)")
    return model.eval()


def load_transformers(model_path: Path, dtype: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    if model_path.is_file():
        model = AutoModelForCausalLM.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype)
    return model.to(device).eval()


@torch.no_grad()
def run_generate(model, prompts: list[list[int]], output_len: int, dtype: str,
                 label: str = "transformers") -> OfflineResult:
    """One batched ``generate`` call over every prompt (equal lengths, no padding)."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=output_len,
              min_new_tokens=output_len)
    model.generate(ids[:1, :8], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    _sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    _sync(device)
    duration = time.perf_counter() - start
    generated = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return OfflineResult(label, len(prompts), len(prompts[0]), output_len, dtype, duration,
                         generated, device.type)


def run_transformers(model_path: Path, prompts: list[list[int]], output_len: int,
                     dtype: str, label: str = "transformers", device: str = "cpu"
                     ) -> OfflineResult:
    return run_generate(load_transformers(model_path, dtype, device), prompts, output_len,
                        dtype, label)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
