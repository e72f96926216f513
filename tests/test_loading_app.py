"""The application served before the model is loaded, and readiness across several front ends."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI

from pagedserve.server.loading_app import LoadingApp


def _app() -> FastAPI:
    app = FastAPI()
    app.get("/health")(lambda: {"status": "ok"})
    app.get("/api/tags")(lambda: {"models": []})
    return app


async def _get(gate: LoadingApp, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=gate)
    async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
        return await client.get(path)


def test_loading_answers_503_with_retry_after_and_ollama_is_running():
    async def main():
        gate = LoadingApp()
        health, tags, root = [await _get(gate, p) for p in ("/health", "/api/tags", "/")]
        assert health.status_code == 503 and health.headers["retry-after"]
        assert tags.status_code == 503 and "still loading" in tags.json()["error"]  # the Ollama error shape
        assert root.status_code == 200 and root.text == "Ollama is running"
        await gate.install(_app())
        assert (await _get(gate, "/health")).status_code == 200

    asyncio.run(main())


def test_a_ready_front_end_is_not_healthy_until_every_peer_is():
    """Its requests are served, but a probe must not pass while a peer on the same port still
    answers 503: the probe's next connection may land there."""
    peers = {"ready": False}

    async def main():
        gate = LoadingApp(peers_ready=lambda: peers["ready"])
        await gate.install(_app())
        assert (await _get(gate, "/api/tags")).status_code == 200
        assert (await _get(gate, "/health")).status_code == 503
        assert (await _get(gate, "/ready")).status_code == 503
        peers["ready"] = True
        assert (await _get(gate, "/health")).status_code == 200
        peers["ready"] = False  # asked once: a peer that later goes is the supervisor's to end
        assert (await _get(gate, "/health")).status_code == 200

    asyncio.run(main())
