"""Model resolution over real stores built in a temporary HOME: a path, pagedserve's own store,
an Ollama store (manifests + sha256 blobs), the Hugging Face cache, and the bundled model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from pagedserve.hub import registry, store
from pagedserve.hub.bundled import bundled_model_path
from pagedserve.hub.registry import ModelNotFoundError, resolve
from pagedserve.hub.store import (
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    ModelIntegrityError,
    ModelName,
)

PARAMS = {"temperature": 0.3, "top_k": 20, "num_predict": 48, "repeat_penalty": 1.1,
          "num_ctx": 1024, "stop": ["<|im_end|>", "User:"], "mirostat": 0}
SYSTEM = "You are a terse assistant. Answer in one sentence."
TEMPLATE = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ .Prompt }}"


# ---------------------------------------------------------------------------------------------
# Building stores (also used by test_cli.py)


@pytest.fixture(scope="session")
def smollm_digest(smollm_gguf: Path) -> str:
    return hashlib.sha256(smollm_gguf.read_bytes()).hexdigest()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME: no pagedserve store, no Ollama store, no Hugging Face cache."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OLLAMA_MODELS", str(home / ".ollama" / "models"))
    monkeypatch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    for name in ("PAGEDSERVE_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


def add_blob(models: Path, data: bytes | Path, digest: str | None = None) -> dict:
    """A layer's blob: bytes are written, a Path is symlinked (the 98 MB GGUF is not copied)."""
    blobs = models / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Path):
        assert digest is not None
        size = data.stat().st_size
        blob = blobs / f"sha256-{digest}"
        if not blob.exists():
            blob.symlink_to(data)
    else:
        digest = digest or hashlib.sha256(data).hexdigest()
        size = len(data)
        (blobs / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": size}


def add_ollama_model(models: Path, name: str, layers: list[tuple[str, dict]]) -> Path:
    config = add_blob(models, json.dumps({"model_format": "gguf"}).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
        "layers": [{"mediaType": media, **layer} for media, layer in layers],
    }
    path = models.joinpath("manifests", *ModelName.parse(name).ollama_parts())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture
def ollama_models(home: Path, smollm_gguf: Path, smollm_digest: str) -> Path:
    """An Ollama store holding `smol:latest` (the bundled GGUF with params, system and template
    layers) and `someone/smol:q4` (the GGUF alone)."""
    models = home / ".ollama" / "models"
    gguf = add_blob(models, smollm_gguf, smollm_digest)
    add_ollama_model(models, "smol", [
        (MEDIA_MODEL, gguf),
        (MEDIA_PARAMS, add_blob(models, json.dumps(PARAMS).encode())),
        (MEDIA_SYSTEM, add_blob(models, SYSTEM.encode())),
        (MEDIA_TEMPLATE, add_blob(models, TEMPLATE.encode())),
    ])
    add_ollama_model(models, "someone/smol:q4", [(MEDIA_MODEL, gguf)])
    return models


def add_hf_repo(home: Path, repo_id: str, source_dir: Path, rev: str = "0" * 40,
                extra: dict[str, str] | None = None) -> Path:
    """The Hugging Face cache layout: snapshot files are symlinks to blobs named by hash."""
    repo = home / ".cache" / "huggingface" / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / rev
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    files = {p.name: p.read_bytes() for p in source_dir.iterdir() if p.is_file()}
    files.update({k: v.encode() for k, v in (extra or {}).items()})
    for filename, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / filename).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snapshot


GENERATION_CONFIG = json.dumps({"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.6,
                                "top_p": 0.9, "max_new_tokens": 100})


@pytest.fixture
def hf_cache(home: Path, tiny_llama_dir: Path) -> Path:
    return add_hf_repo(home, "tiny-org/tiny-llama", tiny_llama_dir,
                       extra={"generation_config.json": GENERATION_CONFIG})


# ---------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("ref, parts", [
    ("smollm2", ("registry.ollama.ai", "library", "smollm2", "latest")),
    ("smollm2:135m", ("registry.ollama.ai", "library", "smollm2", "135m")),
    ("someone/model:q4", ("registry.ollama.ai", "someone", "model", "q4")),
    ("hf.co/org/repo:Q4_K_M", ("hf.co", "org", "repo", "Q4_K_M")),
])
def test_ollama_manifest_parts(ref: str, parts: tuple[str, ...]) -> None:
    name = ModelName.parse(ref)
    assert name.ollama_parts() == parts
    assert str(ModelName.from_ollama_parts(parts)) == ref if ":" in ref else f"{ref}:latest"


@pytest.mark.parametrize("ref", ["", "a b", "x:", ":tag", "a//b", "../x"])
def test_bad_names_are_rejected(ref: str) -> None:
    with pytest.raises(ValueError, match="model must be NAME"):
        ModelName.parse(ref)


# ---------------------------------------------------------------------------------------------
# Resolution


def test_none_and_aliases_are_the_bundled_model(home: Path) -> None:
    for ref in (None, "smollm2", "smollm2:135m"):
        found = resolve(ref)
        assert (found.name, found.source, found.path) == (
            "smollm2:135m", "bundled", bundled_model_path())
        assert found.sampling_defaults == {} and found.system is None


def test_paths(home: Path, smollm_gguf: Path, tiny_llama_dir: Path) -> None:
    found = resolve(str(smollm_gguf))
    assert (found.source, found.path, found.name) == ("path", smollm_gguf, str(smollm_gguf))
    found = resolve(str(tiny_llama_dir))
    assert (found.source, found.path) == ("path", tiny_llama_dir)
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve(str(home))
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve(str(home / "missing.gguf"))


def test_a_bare_word_is_a_name_even_if_the_directory_holds_that_file(
        ollama_models: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "smol").mkdir()  # e.g. a source checkout named like the model
    (tmp_path / "smollm2").write_text("notes")
    monkeypatch.chdir(tmp_path)
    assert resolve("smol").source == "ollama"
    assert resolve("smollm2").source == "bundled"
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve("./smol")


def test_ollama_model_with_params_system_and_template(
        ollama_models: Path, smollm_digest: str) -> None:
    found = resolve("smol")
    assert found.name == "smol:latest"
    assert found.source == "ollama"
    assert found.path == ollama_models / "blobs" / f"sha256-{smollm_digest}"
    assert found.sampling_defaults == {
        "temperature": 0.3, "top_k": 20, "max_tokens": 48, "repetition_penalty": 1.1,
        "num_ctx": 1024, "stop": ["<|im_end|>", "User:"]}  # mirostat: no equivalent, dropped
    assert found.system == SYSTEM
    assert found.template == TEMPLATE
    # the defaults are SamplingParams fields, num_ctx aside
    from pagedserve.sampling_params import SamplingParams
    SamplingParams(**{k: v for k, v in found.sampling_defaults.items() if k != "num_ctx"})


def test_ollama_namespaced_model(ollama_models: Path) -> None:
    found = resolve("someone/smol:q4")
    assert (found.name, found.source, found.sampling_defaults, found.system) == (
        "someone/smol:q4", "ollama", {}, None)
    with pytest.raises(ModelNotFoundError):
        resolve("someone/smol")  # :latest is not there


def test_num_predict_below_zero_means_no_limit() -> None:
    assert registry.ollama_params_to_sampling({"num_predict": -1, "stop": "x"}) == {
        "max_tokens": None, "stop": ["x"]}
    assert registry.ollama_params_to_sampling({"num_predict": 0}) == {"max_tokens": None}


def test_repeat_last_n_minus_one_means_the_whole_context() -> None:
    assert registry.ollama_params_to_sampling({"repeat_last_n": -1}) == {"repeat_last_n": None}
    assert registry.ollama_params_to_sampling({"repeat_last_n": 32}) == {"repeat_last_n": 32}


def test_corrupt_blob_is_named(ollama_models: Path) -> None:
    params = json.dumps(PARAMS).encode()
    digest = hashlib.sha256(params).hexdigest()
    (ollama_models / "blobs" / f"sha256-{digest}").write_bytes(params.replace(b"0.3", b"0.9"))
    with pytest.raises(ModelIntegrityError, match=f"blob sha256-{digest} is corrupt"):
        resolve("smol")


def test_corrupt_model_blob(home: Path) -> None:
    models = home / ".ollama" / "models"
    wrong = "ab" * 32
    layer = add_blob(models, b"GGUF not really a model", digest=wrong)
    add_ollama_model(models, "broken", [(MEDIA_MODEL, layer)])
    with pytest.raises(ModelIntegrityError, match=f"sha256-{wrong} is corrupt.*pull it again"):
        resolve("broken")


def test_missing_blob_is_named(ollama_models: Path, smollm_digest: str) -> None:
    (ollama_models / "blobs" / f"sha256-{smollm_digest}").unlink()
    with pytest.raises(ModelIntegrityError, match=f"blob sha256-{smollm_digest} is missing"):
        resolve("smol")
    entry = next(e for e in registry.list_models(read_info=_no_info) if e.name == "smol:latest")
    assert entry.problem == f"missing blob sha256-{smollm_digest}"


def test_verified_digests_are_cached(ollama_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    real = store.sha256_file

    def counting(path, *args):
        hashed.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(store, "sha256_file", counting)
    resolve("smol")
    assert len(hashed) == 4  # model, params, system, template
    store._digest_cache = None  # a new process: only the file on disk remains
    resolve("smol")
    assert len(hashed) == 4
    assert (ollama_models.parent.parent / ".pagedserve" / "cache" / "digests.json").is_file()


def test_hugging_face_cache(hf_cache: Path, home: Path, tiny_llama_dir: Path) -> None:
    found = resolve("tiny-org/tiny-llama")
    assert (found.name, found.source, found.path) == ("tiny-org/tiny-llama", "huggingface",
                                                       hf_cache)
    assert found.sampling_defaults == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 100}
    # refs/main decides between snapshots
    newer = add_hf_repo(home, "tiny-org/tiny-llama-2", tiny_llama_dir, rev="1" * 40)
    assert resolve("tiny-org/tiny-llama-2").path == newer


def test_hugging_face_gguf_repo_picks_by_quant_tag(home: Path) -> None:
    src = home / "src"
    src.mkdir()
    for quant in ("Q4_K_M", "Q8_0"):
        (src / f"tiny-{quant}.gguf").write_bytes(b"GGUF" + quant.encode())
    snapshot = add_hf_repo(home, "org/tiny-GGUF", src)
    assert resolve("org/tiny-GGUF:q8_0").path == snapshot / "tiny-Q8_0.gguf"
    with pytest.raises(ModelNotFoundError, match="several GGUF files.*ORG/NAME:QUANT"):
        resolve("org/tiny-GGUF")


def test_resolution_order(ollama_models: Path, home: Path, smollm_gguf: Path) -> None:
    assert resolve("smol").source == "ollama"
    registry.pull(str(smollm_gguf), "smol")
    assert resolve("smol").source == "pagedserve"  # pagedserve's own store comes first
    add_ollama_model(ollama_models, "smollm2", [(MEDIA_MODEL, {
        "digest": resolve("smol").path.name.replace("-", ":"),
        "size": smollm_gguf.stat().st_size})])
    assert resolve("smollm2").source == "ollama"  # a user's model beats the bundled alias


def test_not_found_lists_where_it_looked(ollama_models: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve("nosuch:7b")
    message = str(err.value)
    for place in ("no model file or directory 'nosuch:7b'",
                  "pagedserve store", ".pagedserve/models/manifests/nosuch/7b",
                  "ollama store", "manifests/registry.ollama.ai/library/nosuch/7b",
                  "Hugging Face cache", "bundled models", "pagedserve pull"):
        assert place in message


# ---------------------------------------------------------------------------------------------
# pull and remove


def test_pull_a_gguf_then_remove_it(home: Path, smollm_gguf: Path, smollm_digest: str) -> None:
    pulled = registry.pull(str(smollm_gguf))
    assert pulled.name == "smollm2-135m-instruct.q4_1:latest"
    assert pulled.source == "pagedserve"
    blob = home / ".pagedserve" / "models" / "blobs" / f"sha256-{smollm_digest}"
    assert pulled.path == blob and not blob.is_symlink()
    assert registry.remove("smollm2-135m-instruct.q4_1") == [blob]
    assert not blob.exists()
    assert not (home / ".pagedserve" / "models" / "manifests" / "smollm2-135m-instruct.q4_1"
                ).exists()
    with pytest.raises(ModelNotFoundError, match="not in pagedserve's store"):
        registry.remove("smollm2-135m-instruct.q4_1")


def test_pull_from_ollama_keeps_every_layer(ollama_models: Path) -> None:
    pulled = registry.pull("smol", link=True)
    assert (pulled.name, pulled.source) == ("smol:latest", "pagedserve")
    assert pulled.sampling_defaults == resolve("smol").sampling_defaults
    assert pulled.system == SYSTEM
    assert pulled.template == TEMPLATE


def test_pull_refuses_a_corrupt_ollama_blob(ollama_models: Path, home: Path) -> None:
    digest = hashlib.sha256(SYSTEM.encode()).hexdigest()
    (ollama_models / "blobs" / f"sha256-{digest}").write_text("You are a pirate.")
    with pytest.raises(ModelIntegrityError, match=f"sha256:{digest}|{digest}"):
        registry.pull("smol")
    blobs = home / ".pagedserve" / "models" / "blobs"
    assert not (home / ".pagedserve" / "models" / "manifests").exists()
    assert not list(blobs.glob(".partial-*"))


def test_pull_a_hugging_face_repo_from_the_cache(hf_cache: Path, home: Path) -> None:
    pulled = registry.pull("tiny-org/tiny-llama")  # HF_HUB_OFFLINE: the cache answers
    assert (pulled.name, pulled.source) == ("tiny-org/tiny-llama:latest", "pagedserve")
    tree = home / ".pagedserve" / "models" / "trees" / "tiny-org" / "tiny-llama" / "latest"
    assert pulled.path == tree
    assert (tree / "config.json").read_bytes() == (hf_cache / "config.json").read_bytes()
    assert pulled.sampling_defaults["temperature"] == 0.6
    shutil.rmtree(tree)  # rebuilt from the manifest on demand
    assert resolve("tiny-org/tiny-llama").path == tree and (tree / "config.json").is_file()
    assert registry.remove("tiny-org/tiny-llama") and not tree.exists()


def test_pull_an_unreachable_hugging_face_repo(home: Path) -> None:
    with pytest.raises(registry.PullError, match="cannot download nobody/nothing"):
        registry.pull("nobody/nothing")


# ---------------------------------------------------------------------------------------------
# list_models


def _no_info(path: Path):
    raise AssertionError("not called for a model with a problem")


def test_list_models_from_every_source(ollama_models: Path, hf_cache: Path) -> None:
    entries = registry.list_models()
    assert [(e.name, e.source, e.format) for e in entries] == [
        ("smol:latest", "ollama", "gguf"),
        ("someone/smol:q4", "ollama", "gguf"),
        ("tiny-org/tiny-llama", "huggingface", "safetensors"),
        ("smollm2:135m", "bundled", "gguf"),
    ]
    smol, _, tiny, bundled = entries
    assert (smol.quantization, smol.family, smol.problem) == ("Q4_1", "llama", None)
    assert smol.size > bundled.size  # the manifest's layers: GGUF plus params, system...
    assert tiny.family == "llama" and tiny.parameter_count


def test_pull_downloads_only_what_a_model_needs(home: Path, tiny_llama_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    asked = []

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        asked.append((repo_id, sorted(allow_patterns)))
        return str(add_hf_repo(home, repo_id, tiny_llama_dir))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    pulled = registry.pull("new-org/fresh")
    assert (pulled.name, pulled.source) == ("new-org/fresh:latest", "pagedserve")
    assert asked == [("new-org/fresh", ["*.jinja", "*.json", "*.model", "*.safetensors",
                                        "*.tiktoken", "*.txt"])]
    registry.pull("other-org/model-GGUF:Q4_K_M")  # one quantization, not the whole repository
    assert asked[-1] == ("other-org/model-GGUF",
                         ["*.json", "*Q4_K_M*.gguf", "*q4_k_m*.gguf"])
