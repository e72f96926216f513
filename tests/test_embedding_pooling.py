"""Pooling, the Embedder's batching policy, and decoder (Llama) embeddings against transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.loader import load_model
from pagedserve.models.llama import LlamaForCausalLM
from pagedserve.models.pooling import check_pooling, finish, pool
from pagedserve.worker.decoder_pooling import pooled_hidden_states, prompt_hidden_states
from pagedserve.worker.embedder import Embedder, EmbeddingSpec

# three texts packed: rows [0, 2) [2, 5) [5, 6)
HIDDEN = torch.tensor([[1.0, 0.0], [3.0, 2.0],
                       [0.0, 1.0], [0.0, 3.0], [6.0, 2.0],
                       [4.0, 4.0]])
CU = torch.tensor([0, 2, 5, 6])


def test_pool_exact():
    assert torch.equal(pool(HIDDEN, CU, "cls"), torch.tensor([[1.0, 0.0], [0.0, 1.0],
                                                              [4.0, 4.0]]))
    assert torch.equal(pool(HIDDEN, CU, "last"), torch.tensor([[3.0, 2.0], [6.0, 2.0],
                                                               [4.0, 4.0]]))
    assert torch.equal(pool(HIDDEN, CU, "mean"), torch.tensor([[2.0, 1.0], [2.0, 2.0],
                                                               [4.0, 4.0]]))
    assert pool(HIDDEN.bfloat16(), CU, "mean").dtype == torch.float32


def test_finish_cuts_then_normalizes():
    x = torch.tensor([[3.0, 4.0, 12.0]])
    assert torch.allclose(finish(x, normalize=True), x / 13)
    assert torch.allclose(finish(x, normalize=True, dimensions=2), torch.tensor([[0.6, 0.8]]))
    assert torch.equal(finish(x, normalize=False, dimensions=1), torch.tensor([[3.0]]))
    with pytest.raises(ValueError, match="^dimensions must be an integer from 1 to 3"):
        finish(x, normalize=True, dimensions=4)
    with pytest.raises(ValueError, match="^pooling must be one of mean, cls, last"):
        check_pooling("max")


class _RecordingModel:
    """A PooledModel whose vector for a text is (its first id, its length), recording the
    groups it is called with."""

    def __init__(self):
        self.calls: list[list[list[int]]] = []

    def pooled(self, token_ids, pooling):
        self.calls.append(token_ids)
        return torch.tensor([[float(ids[0]), float(len(ids))] for ids in token_ids])


def _recording_embedder(budget: int) -> tuple[Embedder, _RecordingModel]:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    from pagedserve.tokenizer import Tokenizer

    model = _RecordingModel()
    tokenizer = Tokenizer(Backend(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    spec = EmbeddingSpec("bert", 2, 64, 64, "mean", True)
    return Embedder(model, tokenizer, spec, vocab_size=100, max_batch_tokens=budget), model


def test_groups_sorted_by_length_under_the_budget_and_rows_in_input_order():
    embedder, model = _recording_embedder(budget=12)
    texts = [[10] * 3, [11] * 6, [12] * 2, [13] * 5, [14] * 6, [15] * 1]
    out = embedder.embed(texts, normalize=False)
    # longest first: 6, 6 (2 x 6 = 12 fits), then 5, 3 (2 x 5 = 10; a third would be 15),
    # then 2, 1
    assert [[ids[0] for ids in call] for call in model.calls] == [[11, 14], [13, 10], [12, 15]]
    assert out.tolist() == [[float(t[0]), float(len(t))] for t in texts]


def test_one_text_longer_than_the_budget_runs_alone():
    embedder, model = _recording_embedder(budget=4)
    embedder.embed([[1] * 10, [2] * 3, [3] * 1])
    assert [len(call) for call in model.calls] == [1, 1, 1]


# ---------------------------------------------------------------------------------------------
# Decoders: final hidden states of a prompt, as transformers computes them


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    return LlamaForCausalLM(loaded.config, loaded.weights, torch.float32, "cpu")


@pytest.fixture(scope="module")
def hf_llama(tiny_llama_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


PROMPTS = [[1, 5, 9, 200, 7], [1], [1] + list(range(20, 60)), [1, 2, 3] * 6]


def _reference(hf_llama, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():  # last_hidden_state: after the final norm
        return hf_llama(input_ids=torch.tensor([prompt])).last_hidden_state[0]


def test_decoder_hidden_states_equal_transformers(llama, hf_llama):
    hidden, cu = prompt_hidden_states(llama, PROMPTS)
    assert cu.tolist() == [0, 5, 6, 47, 65]
    for i, prompt in enumerate(PROMPTS):
        expected = _reference(hf_llama, prompt)
        assert torch.allclose(hidden[cu[i]: cu[i + 1]], expected, atol=1e-4), i


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_pooled_equals_transformers(llama, hf_llama, pooling):
    got = pooled_hidden_states(llama, PROMPTS, pooling)
    expected = torch.stack([_reference(hf_llama, p)[-1] if pooling == "last"
                            else _reference(hf_llama, p).mean(0) for p in PROMPTS])
    assert F.cosine_similarity(got, expected).min() > 0.9999
    assert torch.allclose(got, expected, atol=1e-4)


def test_decoder_embedder_from_gguf(tiny_llama_gguf, hf_llama):
    """A GGUF decoder through the Embedder: BOS first (as the file says), last-token pooling,
    unit length; the same vectors transformers' hidden states give."""
    embedder = Embedder.from_path(tiny_llama_gguf)
    assert (embedder.pooling, embedder.dimensions, embedder.max_tokens) == ("last", 64, 512)
    ids = embedder.tokenize(["hello world", "the cat sat on the mat"])
    assert all(x[0] == 1 for x in ids)  # BOS
    got = embedder.embed(ids)
    expected = F.normalize(torch.stack([_reference(hf_llama, x)[-1] for x in ids]), dim=1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got, embedder.embed(ids[:1] + ids[1:]), atol=1e-6)


def test_decoder_pooling_through_the_native_decoder(tiny_llama_dir, llama):
    """The engine's CPU model (int4 copies, every layer in one native call) embeds too: the
    same vectors within int4 rounding."""
    from pagedserve.ops import cpu_kernels

    try:
        kernels = cpu_kernels.load()
    except cpu_kernels.KernelUnavailable as exc:
        pytest.skip(f"CPU kernels unavailable: {exc}")
    loaded = load_model(tiny_llama_dir)
    native = LlamaForCausalLM(loaded.config, loaded.weights, torch.float32, "cpu",
                              low_bit_small_steps=True, kernels=kernels)
    assert native.decoder_layers.name == "native"
    got = pooled_hidden_states(native, PROMPTS)
    assert F.cosine_similarity(got, pooled_hidden_states(llama, PROMPTS)).min() > 0.99
