"""LangChain's OllamaEmbeddings and OpenAIEmbeddings (what RAG pipelines use) against a real
`pagedserve serve` process serving a generative model (a tiny Llama): its embeddings are the
model's final hidden states, the last token's, pooled by the engine core between its steps.

The reference is transformers' LlamaModel on the same weights and token ids.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
import torch.nn.functional as F
from embedding_models import TEXTS
from langchain_ollama import OllamaEmbeddings
from langchain_openai import OpenAIEmbeddings
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "tiny"
ARGS = ["--served-model-name", MODEL, "--dtype", "float32", "--kv-cache-memory", "8MiB",
        "--max-model-len", "512"]


@pytest.fixture(scope="module")
def server(tiny_llama_tokenized_dir):
    with ServerProcess(str(tiny_llama_tokenized_dir), ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def reference(tiny_llama_tokenized_dir):
    """The unit embeddings of TEXTS: transformers' last hidden state of each text's last token
    (the tokenizer adds no BOS: tokenizer_config says add_bos_token false)."""
    from tokenizers import Tokenizer
    from transformers import AutoModel

    tokenizer = Tokenizer.from_file(str(tiny_llama_tokenized_dir / "tokenizer.json"))
    model = AutoModel.from_pretrained(tiny_llama_tokenized_dir, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for text in TEXTS:
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            rows.append(model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1])
    return F.normalize(torch.stack(rows), dim=1)


def _assert_close(got: list[list[float]], expected: torch.Tensor) -> None:
    cosine = F.cosine_similarity(torch.tensor(got), expected, dim=1)
    assert cosine.min() >= 0.999, cosine


def test_ollama_embeddings_match_the_decoders_hidden_states(server, reference):
    embeddings = OllamaEmbeddings(model=MODEL, base_url=server.url)
    _assert_close(embeddings.embed_documents(TEXTS), reference)
    _assert_close([embeddings.embed_query(TEXTS[4])], reference[4:5])


def test_openai_embeddings_match_the_decoders_hidden_states(server, reference):
    # check_embedding_ctx_length=False: send the texts, not tiktoken's ids for OpenAI's models
    embeddings = OpenAIEmbeddings(model=MODEL, base_url=f"{server.url}/v1", api_key="unused",
                                  check_embedding_ctx_length=False, max_retries=0)
    _assert_close(embeddings.embed_documents(TEXTS), reference)
    _assert_close([embeddings.embed_query(TEXTS[9])], reference[9:10])


def _counter(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == f"pagedserve:{name}")


def test_concurrent_queries_are_batched_while_the_model_generates(server, reference):
    """64 queries at once share the core's batches, between the steps of a generation that
    streams meanwhile; the generation is unharmed."""
    embeddings = OllamaEmbeddings(model=MODEL, base_url=server.url)

    async def generate() -> list[str]:
        body = {"model": MODEL, "prompt": "Once upon a time", "raw": True,
                "options": {"num_predict": 48, "temperature": 0, "ignore_eos": True}}
        pieces = []
        async with httpx.AsyncClient(timeout=120) as client, \
                client.stream("POST", f"{server.url}/api/generate", json=body) as response:
            async for line in response.aiter_lines():
                pieces.append(json.loads(line))
        return pieces

    async def main():
        stream = asyncio.create_task(generate())
        await asyncio.sleep(0.2)  # the generation has started
        vectors = await asyncio.gather(*(embeddings.aembed_query(TEXTS[i % 16])
                                         for i in range(64)))
        return vectors, await stream

    requests, batches = (_counter(server, n) for n in ("embedding_requests_total",
                                                        "embedding_batches_total"))
    vectors, pieces = asyncio.run(main())
    _assert_close(vectors, reference[[i % 16 for i in range(64)]])
    assert _counter(server, "embedding_requests_total") - requests == 64
    assert _counter(server, "embedding_batches_total") - batches <= 32
    assert pieces[-1]["done"] and pieces[-1]["eval_count"] == 48


def test_a_generative_model_shows_completion(server):
    """It embeds too, but Ollama lists a generative model for what it generates (and, here,
    the tools any model takes), not for embedding."""
    shown = httpx.post(f"{server.url}/api/show", json={"model": MODEL}).json()
    assert shown["capabilities"] == ["completion", "tools"]
