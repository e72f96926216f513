"""The request bodies of the embedding routes, both APIs', as pydantic models.

Only types are checked here; what depends on the model (inputs too long, ``dimensions`` beyond
the model's) is the front end's input processor's, and the number of inputs the server's limit.

    Ollama  /api/embed        input: a text or a list of texts; truncate, dimensions
    Ollama  /api/embeddings   prompt: one text (the older route)
    OpenAI  /v1/embeddings    input: a text, texts, token ids, or lists of token ids;
                              encoding_format float | base64, dimensions
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from pagedserve.server.ollama_protocol import Options


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OllamaEmbedRequest(_Body):
    model: str | None = None
    input: str | list[str] | None = None  # nothing, "" or []: Ollama's "load the model" call
    truncate: bool = True  # cut inputs to the context; false: 400 for one too long
    dimensions: int | None = None
    options: Options | None = None  # accepted; the served model's context applies
    keep_alive: str | int | float | None = None  # accepted: the model stays loaded


class OllamaEmbeddingsRequest(_Body):
    model: str | None = None
    prompt: str | None = None  # nothing or "": Ollama's "load the model" call
    options: Options | None = None
    keep_alive: str | int | float | None = None


class EmbeddingRequest(_Body):
    """OpenAI's ``POST /v1/embeddings``."""

    model: str | None = None
    # empty texts and lists are refused by the route, with a message naming which
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
