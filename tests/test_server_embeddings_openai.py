"""/v1/embeddings of a real `pagedserve serve` process serving an embedding-only model (a tiny
BERT from a sentence-transformers directory), driven by the official `openai` client.

The reference is sentence-transformers on the same weights; the server's vectors must point the
same way (cosine >= 0.999). Concurrent requests must share the engine core's batches, which
/metrics counts.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F
from embedding_models import TEXTS, save_bert_dir
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "minilm"
KEY = "s3cret"
MAX_INPUTS = 32
ARGS = ["--served-model-name", MODEL, "--dtype", "float32", "--api-key", KEY,
        "--max-embedding-inputs", str(MAX_INPUTS)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_bert_dir(tmp_path_factory.mktemp("minilm") / "model")


@pytest.fixture(scope="module")
def reference(model_dir):
    """(token ids of TEXTS, sentence-transformers' unit embeddings of TEXTS)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu")
    ids = [st.tokenizer(t, truncation=True, max_length=st.max_seq_length)["input_ids"]
           for t in TEXTS]
    return ids, torch.from_numpy(st.encode(TEXTS, convert_to_numpy=True))


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerProcess(str(model_dir), ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _matrix(reply) -> torch.Tensor:
    assert [d.index for d in reply.data] == list(range(len(reply.data)))
    return torch.tensor([d.embedding for d in reply.data])


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    cosine = F.cosine_similarity(got, expected, dim=1)
    assert cosine.min() >= 0.999, cosine


def test_a_batch_matches_sentence_transformers(client, reference):
    reply = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert reply.object == "list" and reply.model == MODEL
    got = _matrix(reply)
    assert got.shape == (16, 64)
    _assert_close(got, reference[1])
    assert torch.allclose(got.norm(dim=1), torch.ones(16), atol=1e-5)  # unit, as OpenAI's
    tokens = sum(len(ids) for ids in reference[0])
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (tokens, tokens)


def test_base64_is_the_same_float32_vectors(client):
    floats = _matrix(client.embeddings.create(model=MODEL, input=TEXTS[:3],
                                              encoding_format="float"))
    # the client asks for base64 when not told, and decodes it
    decoded = _matrix(client.embeddings.create(model=MODEL, input=TEXTS[:3]))
    assert torch.equal(decoded, floats)
    raw = httpx.post(f"{client.base_url}embeddings", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": MODEL, "input": TEXTS[0], "encoding_format": "base64"})
    import base64

    value = raw.json()["data"][0]["embedding"]
    assert torch.equal(torch.frombuffer(bytearray(base64.b64decode(value)),
                                        dtype=torch.float32), floats[0])


def test_one_text_dimensions_and_token_ids(client, reference):
    ids, expected = reference
    one = _matrix(client.embeddings.create(model=MODEL, input=TEXTS[2]))
    _assert_close(one, expected[2:3])
    # Matryoshka: the first 16 components, unit length again
    cut = _matrix(client.embeddings.create(model=MODEL, input=TEXTS[:4], dimensions=16))
    _assert_close(cut, F.normalize(expected[:4, :16], dim=1))
    assert torch.allclose(cut.norm(dim=1), torch.ones(4), atol=1e-5)
    # token ids as they are: one list, or a list of lists
    single = _matrix(client.embeddings.create(model=MODEL, input=ids[5]))
    _assert_close(single, expected[5:6])
    several = client.embeddings.create(model=MODEL, input=ids[:3])
    _assert_close(_matrix(several), expected[:3])
    assert several.usage.prompt_tokens == sum(len(x) for x in ids[:3])


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": []}, "input", "input must not be empty"),
    ({"input": ""}, "input", "input[0] must not be an empty string"),
    ({"input": ["a", ""]}, "input", "input[1] must not be an empty string"),
    ({"input": [[5], []]}, "input", "input[1] must not be an empty list"),
    ({"input": ["x"] * (MAX_INPUTS + 1)}, "input", "--max-embedding-inputs"),
    ({"input": "a", "dimensions": 0}, "dimensions", "from 1 to 64"),
    ({"input": "a", "dimensions": 65}, "dimensions", "from 1 to 64"),
    ({"input": "word " * 100}, "input", "more than the model's 96"),
    ({"input": [[2, 5, 3], [2, 999999, 3]]}, "input", "outside the vocabulary"),
    ({"input": [2, 5.5, 3]}, "input", "input"),
    ({"input": [[2, 5], "text"]}, "input", "input"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format", "encoding_format"),
    ({}, "input", "input"),
])
def test_bad_input_is_a_400_naming_the_field(server, body, param, words):
    response = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, **body},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_unknown_model_and_missing_key(server, client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="a")
    for path, body in (("/v1/embeddings", {"input": "a"}), ("/api/embed", {"input": "a"}),
                       ("/api/embeddings", {"prompt": "a"})):
        assert httpx.post(server.url + path, json={"model": MODEL, **body}).status_code == 401


def test_the_model_does_not_generate_but_is_listed(client):
    with pytest.raises(openai.BadRequestError, match="does not support Chat Completions API"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="does not support Completions API"):
        client.completions.create(model=MODEL, prompt="hi")
    [listed] = client.models.list().data
    assert listed.id == MODEL and listed.model_extra["max_model_len"] == 96


def _counters(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {s.name.removeprefix("pagedserve:"): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("pagedserve:embedding_")}


def test_concurrent_requests_share_batches(server, reference):
    async def run(concurrency: int, total: int) -> float:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY,
                                      max_retries=0, timeout=120) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one(i: int):
                async with gate:
                    return await client.embeddings.create(model=MODEL, input=TEXTS[i % 16])

            start = time.perf_counter()
            replies = await asyncio.gather(*(one(i) for i in range(total)))
            elapsed = time.perf_counter() - start
        for i, reply in enumerate(replies):  # every answer its own text's
            _assert_close(_matrix(reply), reference[1][i % 16:i % 16 + 1])
        return elapsed

    before = _counters(server)
    alone = asyncio.run(run(1, 16))
    middle = _counters(server)
    together = asyncio.run(run(64, 64))
    after = _counters(server)
    assert middle["embedding_requests_total"] - before["embedding_requests_total"] == 16
    assert middle["embedding_batches_total"] - before["embedding_batches_total"] == 16
    requests = after["embedding_requests_total"] - middle["embedding_requests_total"]
    batches = after["embedding_batches_total"] - middle["embedding_batches_total"]
    # how many share a batch depends on how fast the client sends against how fast the core
    # steps (2 batches on a quiet machine, 56 once with both on one busy core): some must
    assert requests == 64 and batches < requests, (requests, batches)
    print(f"\nembedding requests: one at a time {16 / alone:.0f} req/s, 64 at once "
          f"{64 / together:.0f} req/s in {batches:.0f} batches")
