"""/api/embed and /api/embeddings of a real `pagedserve serve` process serving an embedding-only
GGUF (a tiny BERT as llama.cpp's converter writes it), driven by the official `ollama` client.

The reference is sentence-transformers on the directory the GGUF was written from.
"""

from __future__ import annotations

import httpx
import ollama
import pytest
import torch
import torch.nn.functional as F
from embedding_models import TEXTS, save_bert_dir, write_encoder_gguf

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "all-minilm"
ARGS = ["--served-model-name", MODEL, "--dtype", "float32"]
LONG = "the vectors of documents answer a search " * 40  # 280 tokens: past the 128 positions


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_bert_dir(tmp_path_factory.mktemp("all-minilm") / "model")


@pytest.fixture(scope="module")
def st(model_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = 128  # the GGUF's context: its position table, as llama.cpp reads
    return model


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    gguf = write_encoder_gguf(model_dir, tmp_path_factory.mktemp("gguf") / "minilm.gguf",
                              "bert")
    with ServerProcess(str(gguf), ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60)


def _assert_close(got, expected: torch.Tensor) -> None:
    cosine = F.cosine_similarity(torch.tensor(got), expected, dim=1)
    assert cosine.min() >= 0.999, cosine


def test_embed_a_batch_matches_sentence_transformers(client, st):
    reply = client.embed(model=MODEL, input=TEXTS)
    assert reply.model == MODEL and len(reply.embeddings) == 16
    _assert_close(reply.embeddings, torch.from_numpy(st.encode(TEXTS)))
    norms = torch.tensor(reply.embeddings).norm(dim=1)
    assert torch.allclose(norms, torch.ones(16), atol=1e-5)  # Ollama normalizes
    tokens = sum(len(st.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert reply.prompt_eval_count == tokens
    assert reply.total_duration >= reply.load_duration >= 0


def test_embed_one_text_dimensions_and_truncation(client, st):
    one = client.embed(model=MODEL, input=TEXTS[3])
    _assert_close(one.embeddings, torch.from_numpy(st.encode(TEXTS[3:4])))
    cut = client.embed(model=MODEL, input=TEXTS[:2], dimensions=8)
    expected = F.normalize(torch.from_numpy(st.encode(TEXTS[:2]))[:, :8], dim=1)
    _assert_close(cut.embeddings, expected)
    assert [len(v) for v in cut.embeddings] == [8, 8]
    # too long: cut to the context, keeping [CLS] and [SEP] (truncate defaults to true)
    long = client.embed(model=MODEL, input=[LONG, "short"])
    _assert_close(long.embeddings, torch.from_numpy(st.encode([LONG, "short"])))
    long_tokens, short_tokens = (len(st.tokenizer(t)["input_ids"]) for t in (LONG, "short"))
    assert long.prompt_eval_count == 128 + short_tokens
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model=MODEL, input=["short", LONG], truncate=False)
    assert refused.value.status_code == 400
    assert refused.value.error.startswith(
        f"input[1] has {long_tokens} tokens, more than the model's 128")


def test_legacy_embeddings_are_not_normalized(client, st):
    from sentence_transformers import SentenceTransformer

    # the pooled vector as it is, as Ollama's older route sends the runner's
    pooled_only = SentenceTransformer(modules=[st[0], st[1]], device="cpu")
    reply = client.embeddings(model=MODEL, prompt=TEXTS[7])
    expected = torch.from_numpy(pooled_only.encode(TEXTS[7:8]))
    assert torch.allclose(torch.tensor([reply.embedding]), expected, atol=1e-4)
    assert abs(expected.norm() - 1) > 0.1  # not unit length: the test tells the two apart


def test_no_input_loads_the_model(client):
    assert client.embed(model=MODEL, input=[]).embeddings == []
    assert client.embed(model=MODEL, input="").embeddings == []
    assert client.embeddings(model=MODEL, prompt="").embedding == []


@pytest.mark.parametrize(("body", "words"), [
    ({"input": ["a", 5]}, "input"),
    ({"input": "a", "dimensions": 0}, "dimensions must be an integer from 1 to 64"),
    ({"input": "a", "dimensions": 65}, "dimensions must be an integer from 1 to 64"),
    ({"input": "a", "truncate": "maybe"}, "truncate"),
    ({"input": {"text": "a"}}, "input"),
])
def test_bad_input_is_a_400_naming_the_field(server, body, words):
    response = httpx.post(f"{server.url}/api/embed", json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(words), response.json()


def test_unknown_model_is_a_404(client):
    with pytest.raises(ollama.ResponseError) as missing:
        client.embed(model="nomic-embed-text", input="a")
    assert missing.value.status_code == 404


def test_the_model_embeds_and_does_not_generate(client):
    shown = client.show(MODEL)
    assert shown.capabilities == ["embedding"]
    assert (shown.details.family, shown.details.format) == ("bert", "gguf")
    with pytest.raises(ollama.ResponseError) as generate:
        client.generate(model=MODEL, prompt="hi")
    assert (generate.value.status_code, generate.value.error) == (
        400, f'"{MODEL}" does not support generate')
    with pytest.raises(ollama.ResponseError) as chat:
        client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert (chat.value.status_code, chat.value.error) == (400, f'"{MODEL}" does not support chat')
    assert [m.model for m in client.ps().models] == [MODEL]
    assert client.list().models[0].model == MODEL
