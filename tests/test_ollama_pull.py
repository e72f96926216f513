"""Pulling from an Ollama registry (a small one this test runs on 127.0.0.1, tests/
registry_server.py) into pagedserve's store: names, progress objects, resume after a cut
connection, digest checks, offline errors; then `/api/pull`, `/api/delete` and `/api/copy` of a
server wired as `pagedserve serve` wires it (in a thread: it starts in a second), driven by the
official `ollama` client."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import ollama
import pytest
from registry_server import Registry
from server_thread import ServerThread

from pagedserve.cli import main as cli_main
from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.hub import registry
from pagedserve.hub.registry_client import (
    PullError,
    PullEvent,
    RegistryRef,
    pull_from_registry,
)
from pagedserve.hub.store import (
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    BlobStore,
    ModelIntegrityError,
    ModelName,
)

PARAMS = {"temperature": 0.2, "num_predict": 5, "stop": ["</s>"]}
SYSTEM = "Answer briefly."
TEMPLATE = "{{ .Prompt }}"
LICENSE = "MIT"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
LAYER_STATUS = re.compile(r"^pulling [0-9a-f]{12}$")


@pytest.fixture(scope="module")
def gguf(tiny_llama_gguf: Path) -> bytes:
    return tiny_llama_gguf.read_bytes()


def _serve_model(reg: Registry, name: str, gguf: bytes) -> dict:
    return reg.add_model(name, [
        (MEDIA_MODEL, gguf),
        (MEDIA_TEMPLATE, TEMPLATE.encode()),
        (MEDIA_PARAMS, json.dumps(PARAMS).encode()),
        (MEDIA_SYSTEM, SYSTEM.encode()),
        (MEDIA_LICENSE, LICENSE.encode()),
    ])


@pytest.fixture
def reg(gguf: bytes, monkeypatch: pytest.MonkeyPatch):
    with Registry() as reg:
        manifest = _serve_model(reg, "library/tinyllama:latest", gguf)
        reg.model_digest = manifest["layers"][0]["digest"]
        monkeypatch.setenv("PAGEDSERVE_REGISTRY", reg.url)
        yield reg


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BlobStore:
    monkeypatch.setenv("PAGEDSERVE_HOME", str(tmp_path / "home"))
    return BlobStore(tmp_path / "home" / "models")


def _pull(name: str, store: BlobStore, **kwargs) -> tuple[ModelName, list[PullEvent]]:
    events: list[PullEvent] = []
    pulled = pull_from_registry(RegistryRef.parse(name), store, on_event=events.append, **kwargs)
    return pulled, events


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nobody listens once it is closed


def _installed(store: BlobStore) -> tuple[list[ModelName], list[str]]:
    blobs = sorted(p.name for p in store.blobs_dir.glob("*")) if store.blobs_dir.is_dir() else []
    return list(store.names()), blobs


# ---------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("ref, url, local", [
    ("tinyllama", "{r}/v2/library/tinyllama/manifests/latest", "tinyllama:latest"),
    ("tinyllama:q4", "{r}/v2/library/tinyllama/manifests/q4", "tinyllama:q4"),
    ("library/tinyllama", "{r}/v2/library/tinyllama/manifests/latest", "tinyllama:latest"),
    ("someone/tiny:v1", "{r}/v2/someone/tiny/manifests/v1", "someone/tiny:v1"),
    ("{h}/library/tinyllama", "{r}/v2/library/tinyllama/manifests/latest", "tinyllama:latest"),
    ("hf.co/org/repo:Q4_K_M", "https://hf.co/v2/org/repo/manifests/Q4_K_M",
     "hf.co/org/repo:Q4_K_M"),
    ("localhost:5000/ns/m", "https://localhost:5000/v2/ns/m/manifests/latest",
     "localhost:5000/ns/m:latest"),
])
def test_names_map_to_the_registry_as_ollama_maps_them(ref, url, local, monkeypatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_REGISTRY", "http://127.0.0.1:5005")
    target = RegistryRef.parse(ref.format(h="127.0.0.1:5005"))
    assert target.manifest_url == url.format(r="http://127.0.0.1:5005")
    assert str(target.local) == local


def test_the_default_registry_and_insecure(monkeypatch) -> None:
    monkeypatch.delenv("PAGEDSERVE_REGISTRY", raising=False)
    assert RegistryRef.parse("x").base_url == "https://registry.ollama.ai"
    assert RegistryRef.parse("x", insecure=True).base_url == "http://registry.ollama.ai"
    assert RegistryRef.parse("h.io:81/a/b", insecure=True).base_url == "http://h.io:81"
    monkeypatch.setenv("PAGEDSERVE_REGISTRY", "mirror.example:8443")  # a host: https
    assert RegistryRef.parse("x").base_url == "https://mirror.example:8443"
    for bad in ("a/b/c/d", "x y", "h:1/a"):
        with pytest.raises(ValueError, match="^model must be"):
            RegistryRef.parse(bad)


# ---------------------------------------------------------------------------------------------
# Pulling into a store


def test_pull_lands_every_layer_and_the_model_loads(reg, store, gguf) -> None:
    pulled, events = _pull("tinyllama", store)
    assert pulled == ModelName(("tinyllama",), "latest")
    statuses = [e.status for e in events]
    layers = json.loads(reg.manifests[("library", "tinyllama", "latest")])
    digests = [layer["digest"] for layer in layers["layers"]] + [layers["config"]["digest"]]
    # Ollama's sequence: the manifest, each blob (layers, then config) until complete, the end
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    per_blob = [e for e in events if e.digest]
    assert all(LAYER_STATUS.match(e.status) and e.status[8:] == e.digest[7:19]
               for e in per_blob)
    assert list(dict.fromkeys(e.digest for e in per_blob)) == digests
    last = {e.digest: e for e in per_blob}
    assert all(last[d].completed == last[d].total == s for d, s in
               zip(digests, [*(x["size"] for x in layers["layers"]), layers["config"]["size"]],
                   strict=True))
    assert events[0].to_json() == {"status": "pulling manifest"}
    assert set(per_blob[-1].to_json()) == {"status", "digest", "total", "completed"}

    resolved = registry.resolve("tinyllama")
    assert (resolved.source, resolved.name) == ("pagedserve", "tinyllama:latest")
    assert resolved.path.read_bytes() == gguf
    assert (resolved.system, resolved.template) == (SYSTEM, TEMPLATE)
    assert resolved.sampling_defaults == {"temperature": 0.2, "max_tokens": 5, "stop": ["</s>"]}
    from pagedserve.loader import load_model

    assert load_model(resolved.path).weights  # a real GGUF: it loads

    # a second pull finds every blob in the store: no download
    before = len(reg.hits)
    _, again = _pull("library/tinyllama", store)
    assert len(reg.hits) == before and again[-1].status == "success"


def test_a_cut_connection_resumes_where_it_stopped(reg, store, gguf) -> None:
    cut = len(gguf) // 3
    reg.cut_after[reg.model_digest] = cut
    _pull("tinyllama", store)
    hits = reg.blob_hits(reg.model_digest)
    assert [(h.start, h.status, h.sent) for h in hits] == [(0, 200, cut),
                                                            (cut, 206, len(gguf) - cut)]
    assert registry.resolve("tinyllama").path.read_bytes() == gguf


def test_a_failed_pull_installs_nothing_and_the_next_one_resumes(reg, store, gguf) -> None:
    cut = len(gguf) // 2
    reg.cut_after[reg.model_digest] = cut
    reg.down_after_cut = True  # every retry is a 503: the pull gives up
    with pytest.raises(PullError, match=f"registry {reg.host} answered 503") as failed:
        _pull("tinyllama", store)
    assert failed.value.status == 502
    partial = store.partial_path(reg.model_digest)
    assert _installed(store) == ([], [partial.name])  # no manifest, no blob: the partial only
    assert partial.stat().st_size == cut

    reg.down = reg.down_after_cut = False
    _, events = _pull("tinyllama", store)
    resumed = reg.blob_hits(reg.model_digest)[-1]
    assert (resumed.start, resumed.status, resumed.sent) == (cut, 206, len(gguf) - cut)
    first = next(e for e in events if e.digest == reg.model_digest)
    assert first.completed == cut  # progress starts from what was on disk
    assert registry.resolve("tinyllama").path.read_bytes() == gguf
    assert not partial.exists()


def test_a_registry_that_ignores_ranges_sends_the_blob_again(reg, store, gguf) -> None:
    partial = store.partial_path(reg.model_digest)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(gguf[:1000])
    reg.ignore_range = True
    _pull("tinyllama", store)
    assert registry.resolve("tinyllama").path.read_bytes() == gguf


def test_a_wrong_digest_is_refused_and_installs_nothing(reg, store) -> None:
    reg.corrupt.add(reg.model_digest)
    with pytest.raises(ModelIntegrityError, match=f"blob {reg.model_digest} of .* is corrupt"):
        _pull("tinyllama", store)
    assert _installed(store)[0] == []
    assert not store.blob_path(reg.model_digest).exists()
    assert not store.partial_path(reg.model_digest).exists()  # deleted: not resumed from


def test_an_unknown_model_is_a_404(reg, store) -> None:
    with pytest.raises(PullError, match=f"model nothere:latest not found in the registry "
                       f"{reg.host}") as missing:
        _pull("nothere", store)
    assert missing.value.status == 404


def test_a_model_without_a_gguf_layer_is_refused_before_downloading(reg, store) -> None:
    reg.add_model("library/mlx:latest", [("application/vnd.ollama.image.tensor", b"t" * 99)])
    with pytest.raises(PullError, match="has no GGUF model layer") as refused:
        _pull("mlx", store)
    assert refused.value.status == 400 and reg.hits == []


def test_two_pulls_of_one_model_at_once_download_it_once(reg, store, gguf) -> None:
    reg.rate = len(gguf) / 0.5  # half a second of download: the pulls overlap
    results: list = []

    def pull() -> None:
        results.append(_pull("tinyllama", store)[0])

    pullers = [threading.Thread(target=pull) for _ in range(2)]
    for puller in pullers:
        puller.start()
    for puller in pullers:
        puller.join(30)
    assert results == [ModelName(("tinyllama",), "latest")] * 2
    assert sum(hit.sent for hit in reg.blob_hits(reg.model_digest)) == len(gguf)
    assert registry.resolve("tinyllama").path.read_bytes() == gguf
    assert not store.partial_path(reg.model_digest).exists()


def test_an_unreachable_registry_is_one_clear_line(store, monkeypatch) -> None:
    port = _closed_port()
    monkeypatch.setenv("PAGEDSERVE_REGISTRY", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(PullError) as offline:
        _pull("tinyllama", store)
    assert time.monotonic() - started < 5
    message = str(offline.value)
    assert message.startswith(f"cannot reach the registry 127.0.0.1:{port} ")
    assert "\n" not in message and "PAGEDSERVE_REGISTRY" in message
    assert offline.value.status == 502


def test_the_cli_pulls_from_the_registry_and_copies(reg, store, gguf, capsys) -> None:
    assert cli_main(["pull", "tinyllama"]) == 0
    assert "pulled tinyllama as tinyllama:latest (sha256 verified)" in capsys.readouterr().out
    assert cli_main(["cp", "tinyllama", "mine:v2"]) == 0
    assert capsys.readouterr().out == "copied 'tinyllama' to 'mine:v2'\n"
    assert cli_main(["list", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["tinyllama:latest"]["source"] == listed["mine:v2"]["source"] == "pagedserve"
    assert listed["mine:v2"]["size"] == listed["tinyllama:latest"]["size"] > len(gguf)
    assert cli_main(["rm", "tinyllama"]) == 0  # the copy keeps the blobs
    assert registry.resolve("mine:v2").path.read_bytes() == gguf
    assert cli_main(["cp", "gone", "x"]) == 1
    assert "'gone' is not in pagedserve's store" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The server's /api/pull, /api/delete, /api/copy


@pytest.fixture(scope="module")
def server_registry(gguf):
    with Registry() as reg:
        manifest = _serve_model(reg, "library/tinyllama:latest", gguf)
        reg.model_digest = manifest["layers"][0]["digest"]
        _serve_model(reg, "library/slow:latest", gguf + b"slow")
        _serve_model(reg, "library/bad:latest", gguf + b"bad")
        yield reg


@pytest.fixture(scope="module")
def server(tiny_llama_gguf, server_registry, tmp_path_factory):
    home = tmp_path_factory.mktemp("pull-home")
    engine = Engine.from_model(tiny_llama_gguf, EngineConfig(
        dtype="float32", kv_cache_memory=4 << 20, max_model_len=64))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PAGEDSERVE_HOME", str(home))
        env.setenv("PAGEDSERVE_REGISTRY", server_registry.url)
        with ServerThread(engine, name="tiny") as thread:
            thread.home = home
            yield thread


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60)


@pytest.mark.slow
def test_the_ollama_client_pulls_lists_copies_and_deletes(client, server, server_registry,
                                                          monkeypatch, capsys) -> None:
    parts = list(client.pull("tinyllama", stream=True))
    assert parts[0].status == "pulling manifest"
    assert [p.status for p in parts[-3:]] == ["verifying sha256 digest", "writing manifest",
                                              "success"]
    layer_parts = [p for p in parts if p.digest]
    assert layer_parts and all(LAYER_STATUS.match(p.status) and p.total for p in layer_parts)
    assert client.pull("library/tinyllama").status == "success"  # not streamed: the last one
    assert client.pull("tiny").status == "success"  # the served model: nothing to fetch

    assert [m.model for m in client.list().models] == ["tiny", "tinyllama:latest"]
    pulled = client.list().models[1]
    assert pulled.details.format == "gguf" and pulled.size > 0
    assert re.fullmatch(r"[0-9a-f]{64}", pulled.digest)
    monkeypatch.setenv("PAGEDSERVE_HOME", str(server.home))
    assert cli_main(["list"]) == 0  # `pagedserve list` reads the same store
    assert "tinyllama:latest   pagedserve" in capsys.readouterr().out

    assert client.copy("tinyllama", "tl-copy:v1").status == "success"
    assert "tl-copy:v1" in [m.model for m in client.list().models]
    assert client.delete("tl-copy:v1").status == "success"
    with pytest.raises(ollama.ResponseError, match="not found") as gone:
        client.delete("tl-copy:v1")
    assert gone.value.status_code == 404
    with pytest.raises(ollama.ResponseError, match="is the model this server serves") as served:
        client.delete("tiny")
    assert served.value.status_code == 409
    with pytest.raises(ollama.ResponseError) as missing:
        client.copy("nothing", "x")
    assert missing.value.status_code == 404
    assert client.delete("tinyllama").status == "success"
    assert [m.model for m in client.list().models] == ["tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False])
def test_pull_errors_have_ollamas_shape_and_status(client, server, stream) -> None:
    with pytest.raises(ollama.ResponseError, match="not found in the registry") as missing:
        result = client.pull("nothere", stream=stream)
        list(result) if stream else None
    assert missing.value.status_code == 404  # decided before the stream starts
    closed = f"127.0.0.1:{_closed_port()}/library/x"
    with pytest.raises(ollama.ResponseError, match="cannot reach the registry") as offline:
        result = client.pull(closed, insecure=True, stream=stream)
        list(result) if stream else None
    assert offline.value.status_code == 502
    with pytest.raises(ollama.ResponseError, match="model must be") as bad:
        result = client.pull("a b", stream=stream)
        list(result) if stream else None
    assert bad.value.status_code == 400


@pytest.mark.slow
def test_a_wrong_digest_through_the_server(server, server_registry) -> None:
    bad = json.loads(server_registry.manifests[("library", "bad", "latest")])
    server_registry.corrupt.add(bad["layers"][0]["digest"])
    answer = httpx.post(f"{server.url}/api/pull", json={"model": "bad"}, timeout=60)
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert answer.status_code == 200 and lines[0] == {"status": "pulling manifest"}
    assert "is corrupt" in lines[-1]["error"] and "nothing was installed" in lines[-1]["error"]
    answer = httpx.post(f"{server.url}/api/pull", json={"model": "bad", "stream": False},
                        timeout=60)
    assert answer.status_code == 502 and "is corrupt" in answer.json()["error"]
    assert "bad:latest" not in [m["name"] for m in
                                httpx.get(f"{server.url}/api/tags").json()["models"]]


@pytest.mark.slow
def test_the_served_model_answers_while_a_pull_runs(client, server, server_registry) -> None:
    slow = json.loads(server_registry.manifests[("library", "slow", "latest")])
    server_registry.rate = slow["layers"][0]["size"] / 3.0  # three seconds of download
    progress: list = []
    puller = threading.Thread(target=lambda: progress.extend(client.pull("slow", stream=True)))
    try:
        puller.start()
        deadline = time.monotonic() + 10
        while not server_registry.blob_hits(slow["layers"][0]["digest"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        reply = client.generate(model="tiny", prompt="Hello", options={"num_predict": 4})
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        assert reply.done and time.monotonic() - started < 2.5
        assert puller.is_alive()  # the pull was still downloading
    finally:
        puller.join(30)
        server_registry.rate = None
    assert progress[-1].status == "success"
    assert "slow:latest" in [m.model for m in client.list().models]
