"""Model name -> files: the places a user already keeps models, searched in a fixed order.

``resolve(ref)`` tries, first match wins:

1. a path: a ``.gguf`` file or a Hugging Face model directory (holding ``config.json``);
2. pagedserve's own store, ``$PAGEDSERVE_HOME/models`` (see :mod:`pagedserve.hub.store`);
3. an Ollama store, ``$OLLAMA_MODELS`` or ``~/.ollama/models``;
4. the Hugging Face cache, ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``,
   for a reference ``ORG/NAME`` (the revision ``refs/main`` points at);
5. the bundled SmolLM2-135M, ``smollm2:135m`` (alias ``smollm2``), also what ``None`` means.

``dummy:NAME`` (``dummy:llama-3.1-8b``, see loader/shapes.py) is no file: random weights of
that shape, made where they are used, for benchmarks.

The result carries the model's own defaults: the Ollama params, system and template layers, or
a Hugging Face ``generation_config.json``, translated to :class:`SamplingParams` field names.
Blobs are checked against their digests before a model from a store is handed out.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pagedserve.hub import store
from pagedserve.hub.bundled import BUNDLED_ALIASES, BUNDLED_MODEL_NAME, bundled_model_path
from pagedserve.hub.registry_client import HookEvents, PullError, RegistryRef, pull_from_registry
from pagedserve.hub.store import (
    MEDIA_FILE,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    BlobStore,
    Layer,
    Manifest,
    ModelIntegrityError,
    ModelName,
    ProgressHook,
    ollama_store,
    own_store,
)
from pagedserve.loader.shapes import is_dummy_name, shape_for

logger = logging.getLogger(__name__)

Source = Literal["path", "pagedserve", "ollama", "huggingface", "bundled", "dummy"]

__all__ = [
    "ModelEntry",
    "ModelIntegrityError",
    "ModelNotFoundError",
    "PullError",
    "ResolvedModel",
    "copy",
    "list_models",
    "model_info",
    "pull",
    "remove",
    "resolve",
    "store_models",
]


class ModelNotFoundError(LookupError):
    """No source has the model; the message lists every place looked at."""


@dataclass(slots=True)
class ResolvedModel:
    name: str  # canonical "NAME:TAG", "ORG/NAME" for the Hugging Face cache, or the path as given
    path: Path  # a GGUF file (an Ollama blob has no .gguf suffix) or a Hugging Face directory
    source: Source
    sampling_defaults: dict[str, Any] = field(default_factory=dict)  # SamplingParams names
    system: str | None = None
    template: str | None = None  # Ollama's Go template: informational, we render the jinja one


@dataclass(slots=True)
class ModelEntry:
    """One row of ``pagedserve list``: what a model is and where it lives."""

    name: str
    source: Source
    path: Path
    size: int  # bytes on disk (all files of a directory, all layers of a manifest)
    format: str  # "gguf" | "safetensors" | "?"
    quantization: str = "?"
    family: str = "?"
    parameter_count: int | None = None
    context_length: int | None = None
    problem: str | None = None  # why the model cannot be used, e.g. a missing blob


# ---------------------------------------------------------------------------------------------
# Defaults: Ollama params layer and generation_config.json -> SamplingParams names

_OLLAMA_PARAM_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repetition_penalty",
    "repeat_last_n": "repeat_last_n",
    "num_predict": "max_tokens",
    "num_ctx": "num_ctx",  # not a SamplingParams field: the engine's context per sequence
}

_GENERATION_CONFIG_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def ollama_params_to_sampling(params: dict[str, Any]) -> dict[str, Any]:
    """Translate an Ollama params layer (or a request's ``options``) to SamplingParams names.

    Options we have no equivalent for (mirostat, tfs_z, num_gpu, ...) are dropped with a debug
    log. ``num_predict`` 0 or below (0 and -1 endless, -2 fill the context: Ollama's runner
    limits only a positive one) becomes ``max_tokens=None``,
    ``repeat_last_n`` -1 (the whole context) ``None``.
    """
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = _OLLAMA_PARAM_NAMES.get(key)
        if name is None:
            logger.debug("ollama option %s=%r has no pagedserve equivalent; ignored", key, value)
            continue
        if name == "stop":
            value = [value] if isinstance(value, str) else list(value)
        elif name == "max_tokens" and isinstance(value, int) and value <= 0:
            value = None
        elif name == "repeat_last_n" and value == -1:  # the whole context
            value = None
        out[name] = value
    return out


def generation_config_defaults(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return {name: config[key] for key, name in _GENERATION_CONFIG_NAMES.items()
            if config.get(key) is not None}


# ---------------------------------------------------------------------------------------------
# The Hugging Face cache


def hf_cache_dir() -> Path:
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env).expanduser()
    if env := os.environ.get("HF_HOME"):
        return Path(env).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _hf_repo_dir(repo_id: str) -> Path:
    return hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def hf_snapshot(repo_dir: Path, revision: str | None = None) -> Path | None:
    """The snapshot ``refs/main`` names, else the most recently written one. With
    ``revision`` (a branch, tag or commit hash) that one only, or None."""
    if revision is not None:
        ref = repo_dir / "refs" / revision
        snapshot = repo_dir / "snapshots" / (ref.read_text().strip() if ref.is_file() else revision)
        return snapshot if snapshot.is_dir() else None
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = [p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()]
    return max(snapshots, key=lambda p: p.stat().st_mtime, default=None)


def _hf_ggufs(snapshot: Path) -> list[Path]:
    return sorted(snapshot.rglob("*.gguf"))


def _pick_gguf(ggufs: list[Path], tag: str | None, where: str) -> Path:
    """A GGUF repository holds one file per quantization: the tag names it (``:Q4_K_M``)."""
    if tag is None and len(ggufs) == 1:
        return ggufs[0]
    if tag is not None:
        matches = [p for p in ggufs if tag.lower() in p.name.lower()]
        if len(matches) == 1:
            return matches[0]
    names = ", ".join(p.name for p in ggufs)
    raise ModelNotFoundError(
        f"{where} holds several GGUF files ({names}); name one as ORG/NAME:QUANT, "
        "e.g. :Q4_K_M"
    )


# ---------------------------------------------------------------------------------------------
# resolve


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.endswith(".gguf")


def _from_path(ref: str) -> ResolvedModel | None:
    """``ref`` as a path; None when nothing is there, or when a bare word such as ``llama3``
    only names an unrelated file or directory of the current directory (then it is a name)."""
    path = Path(ref).expanduser()
    explicit = _looks_like_path(ref)
    if path.is_file():
        if explicit or os.sep in ref or _is_gguf(path):
            return ResolvedModel(ref, path, "path")
    elif path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(ref, path, "path", generation_config_defaults(path))
        if explicit:
            raise ModelNotFoundError(
                f"{path} is a directory without config.json: not a Hugging Face model directory"
            )
    return None


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _from_store(store: BlobStore, name: ModelName, source: Source,
                display: str, verify: bool, progress: ProgressHook | None) -> ResolvedModel | None:
    manifest = store.find(name)
    if manifest is None:
        return None
    if verify:
        store.verify(manifest, progress)
    model = manifest.layer(MEDIA_MODEL)
    if model is not None:
        path = store.blob_path(model)
    elif manifest.layer(MEDIA_FILE) is not None:
        path = store.tree_path(name)
        if not path.is_dir():
            path = store.build_tree(name, manifest)
    else:
        raise ModelIntegrityError(f"manifest {manifest.path} has no model layer")
    defaults: dict[str, Any] = {}
    if (params := manifest.layer(MEDIA_PARAMS)) is not None:
        try:
            defaults = ollama_params_to_sampling(json.loads(store.blob_path(params).read_text()))
        except (OSError, ValueError) as exc:
            raise ModelIntegrityError(
                f"params blob {params.blob_name} of {display} is not JSON: {exc}"
            ) from exc
    elif model is None:
        defaults = generation_config_defaults(path)
    return ResolvedModel(
        display, path, source, defaults,
        system=store.read_text_layer(manifest, MEDIA_SYSTEM),
        template=store.read_text_layer(manifest, MEDIA_TEMPLATE),
    )


def _from_hf_cache(name: ModelName, explicit_tag: bool,
                   revision: str | None = None) -> ResolvedModel | None:
    if len(name.parts) != 2:
        return None
    repo_id = "/".join(name.parts)
    repo_dir = _hf_repo_dir(repo_id)
    snapshot = hf_snapshot(repo_dir, revision) if repo_dir.is_dir() else None
    if snapshot is None:
        return None
    if (snapshot / "config.json").is_file():
        return ResolvedModel(repo_id, snapshot, "huggingface",
                             generation_config_defaults(snapshot))
    ggufs = _hf_ggufs(snapshot)
    if ggufs:
        tag = name.tag if explicit_tag else None
        path = _pick_gguf(ggufs, tag, f"the Hugging Face repository {repo_id}")
        return ResolvedModel(f"{repo_id}:{tag}" if tag else repo_id, path, "huggingface")
    raise ModelNotFoundError(f"{snapshot} holds neither config.json nor a .gguf file")


def resolve(ref: str | None, *, verify: bool = True,
            progress: ProgressHook | None = None) -> ResolvedModel:
    """Find a model by path or name; ``None`` is the bundled ``smollm2:135m``.

    Raises :class:`ModelNotFoundError` (listing where it looked) or
    :class:`ModelIntegrityError` (a store's blob is missing or does not match its digest).
    """
    if ref is None or not ref.strip():
        return ResolvedModel(BUNDLED_MODEL_NAME, bundled_model_path(), "bundled")
    ref = ref.strip()
    if is_dummy_name(ref):  # random weights of a known shape, for benchmarks
        shape_for(ref)  # an unknown shape is refused here, with the known ones
        return ResolvedModel(ref, Path(ref), "dummy")
    looked: list[str] = []

    if (found := _from_path(ref)) is not None:
        return found
    looked.append(f"no model file or directory {ref!r}")
    try:
        name = ModelName.parse(ref)
    except ValueError as exc:
        if _looks_like_path(ref):
            raise ModelNotFoundError(f"model {ref!r} not found: no such file or directory") from exc
        raise ModelNotFoundError(f"model {ref!r} not found: {exc}") from exc

    for blobs, source in ((own_store(), "pagedserve"), (ollama_store(), "ollama")):
        found = _from_store(blobs, name, source, _display_name(name, source), verify, progress)
        if found is not None:
            logger.debug("%s resolved to %s (%s)", ref, found.path, source)
            return found
        looked.append(f"{source} store {blobs.manifest_path(name)}")

    explicit_tag = ref.rfind(":") > ref.rfind("/")
    if (found := _from_hf_cache(name, explicit_tag)) is not None:
        return found
    if len(name.parts) == 2:
        looked.append(f"Hugging Face cache {_hf_repo_dir('/'.join(name.parts))}")
    else:
        looked.append(f"Hugging Face cache {hf_cache_dir()} (only for ORG/NAME)")

    if ref in BUNDLED_ALIASES:
        return ResolvedModel(BUNDLED_MODEL_NAME, bundled_model_path(), "bundled")
    looked.append(f"bundled models ({', '.join(BUNDLED_ALIASES)})")
    raise ModelNotFoundError(
        f"model {ref!r} not found; looked at: " + "; ".join(looked)
        + ". See `pagedserve list`, or `pagedserve pull REF` to add it"
    )


def _display_name(name: ModelName, source: Source) -> str:
    if source == "ollama":
        return str(ModelName.from_ollama_parts(name.ollama_parts()))
    return str(name)


# ---------------------------------------------------------------------------------------------
# list_models


InfoReader = Callable[[Path], Any]


class _InfoCache:
    """The loader's ModelInfo by (real path, size, mtime), in memory and in
    ``$PAGEDSERVE_HOME/cache/model_info.json``: reading a GGUF's metadata parses its whole
    vocabulary (seconds), and one blob often backs several names."""

    def __init__(self) -> None:
        self._memory: dict[str, Any] = {}
        self._disk: store.JsonCache | None = None

    def get(self, path: Path, read_info: InfoReader) -> Any:
        from pagedserve.loader import ModelInfo

        if path.is_dir():  # a directory's mtime misses edits of its files; reading it is cheap
            return read_info(path)
        key = store.file_key(path)
        if key in self._memory:
            return self._memory[key]
        cache_path = store.pagedserve_home() / "cache" / "model_info.json"
        if self._disk is None or self._disk.path != cache_path:
            self._disk = store.JsonCache(cache_path)
        if (saved := self._disk.get(key)) is not None:
            info = ModelInfo(**{**saved, "path": Path(saved["path"])})
        else:
            info = read_info(path)
            fields = {name: getattr(info, name) for name in ModelInfo.__slots__}
            self._disk.put(key, {**fields, "path": str(info.path)})
        self._memory[key] = info
        return info


_info_cache = _InfoCache()


def model_info(path: Path, read_info: InfoReader | None = None) -> Any:
    """The loader's ``read_model_info(path)``, cached by (real path, size, mtime)."""
    if read_info is None:
        from pagedserve.loader import read_model_info

        read_info = read_model_info
    return _info_cache.get(path, read_info)


def _default_info_reader() -> InfoReader | None:
    try:
        from pagedserve.loader import read_model_info
    except ImportError as exc:  # the loader is optional for listing names and sizes
        logger.debug("no loader to read model details: %s", exc)
        return None
    return read_model_info


def _fill_details(entry: ModelEntry, read_info: InfoReader | None) -> ModelEntry:
    if read_info is None or entry.problem:
        return entry
    try:
        info = model_info(entry.path, read_info)
    except Exception as exc:  # a parser may raise anything on a bad file; list the others
        logger.warning("cannot read %s (%s): %s", entry.name, entry.path, exc)
        entry.problem = f"unreadable: {exc}"
        return entry
    entry.format = info.format or entry.format
    entry.quantization = info.quantization or "?"
    entry.family = info.family or info.architecture or "?"
    entry.parameter_count = info.parameter_count
    entry.context_length = info.context_length
    return entry


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _store_entries(store: BlobStore, source: Source) -> Iterator[ModelEntry]:
    for name in store.names():
        display = _display_name(name, source)
        try:
            manifest = store.find(name)
        except ModelIntegrityError as exc:
            yield ModelEntry(display, source, store.manifest_path(name), 0, "?", problem=str(exc))
            continue
        assert manifest is not None
        yield _manifest_entry(store, name, manifest, display, source)


def _manifest_entry(store: BlobStore, name: ModelName, manifest: Manifest, display: str,
                    source: Source) -> ModelEntry:
    model = manifest.layer(MEDIA_MODEL)
    layers: list[Layer] = [model] if model is not None else [
        layer for layer in manifest.layers if layer.media_type == MEDIA_FILE]
    missing = [layer.blob_name for layer in layers if not store.blob_path(layer).is_file()]
    problem = f"missing blob {missing[0]}" if missing else None
    if not layers:
        problem = "no model layer"
    if model is not None:
        path, fmt = store.blob_path(model), "gguf"
    else:
        path, fmt = store.tree_path(name), "safetensors"
    return ModelEntry(display, source, path, manifest.size, fmt, problem=problem)


def _hf_entries() -> Iterator[ModelEntry]:
    root = hf_cache_dir()
    if not root.is_dir():
        return
    for repo_dir in sorted(root.glob("models--*--*")):
        repo_id = repo_dir.name.removeprefix("models--").replace("--", "/", 1)
        snapshot = hf_snapshot(repo_dir)
        if snapshot is None:
            continue
        if (snapshot / "config.json").is_file():
            if not any(snapshot.glob("*.safetensors")) and not any(snapshot.glob("*.bin")):
                logger.debug("skipping %s: no weights in %s", repo_id, snapshot)
                continue
            yield ModelEntry(repo_id, "huggingface", snapshot, _dir_size(snapshot), "safetensors")
            continue
        ggufs = _hf_ggufs(snapshot)
        for gguf in ggufs:
            name = repo_id if len(ggufs) == 1 else f"{repo_id}:{gguf.stem}"
            yield ModelEntry(name, "huggingface", gguf, gguf.stat().st_size, "gguf")


def store_models(read_info: InfoReader | None = None) -> list[ModelEntry]:
    """The models of pagedserve's own store only (what ``pull`` adds and ``remove`` removes)."""
    reader = read_info or _default_info_reader()
    return [_fill_details(entry, reader) for entry in _store_entries(own_store(), "pagedserve")]


def list_models(read_info: InfoReader | None = None) -> list[ModelEntry]:
    """Every model of every source, in resolution order (own store, Ollama, Hugging Face
    cache, bundled), sorted by name within a source. ``read_info`` (default: the loader's
    ``read_model_info``) fills format, quantization, family and parameter count."""
    reader = read_info or _default_info_reader()
    entries: list[ModelEntry] = []
    entries.extend(_store_entries(own_store(), "pagedserve"))
    entries.extend(_store_entries(ollama_store(), "ollama"))
    entries.extend(_hf_entries())
    try:
        bundled = bundled_model_path()
        entries.append(ModelEntry(BUNDLED_MODEL_NAME, "bundled", bundled,
                                  bundled.stat().st_size, "gguf"))
    except FileNotFoundError as exc:
        logger.debug("no bundled model: %s", exc)
    return [_fill_details(entry, reader) for entry in entries]


# ---------------------------------------------------------------------------------------------
# pull and remove: pagedserve's own store


def _default_pull_name(ref: str, found: ResolvedModel) -> ModelName:
    if found.source != "path":
        return ModelName.parse(found.name)
    path = found.path
    stem = (path.stem if path.is_file() else path.name).lower()
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip("-._")
    return ModelName.parse(cleaned or "model")


# What a model directory needs; not README images, not original/*.pth, not every GGUF quant.
_HF_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "*.txt"]


def _download_hf(repo_id: str, quant: str | None, revision: str | None = None) -> Path:
    """``snapshot_download`` of the files a model needs; with ``quant``, that GGUF file only;
    ``revision``: a branch, tag or commit hash (default: main)."""
    patterns = list(_HF_PATTERNS)
    if quant:
        patterns = ["*.json"] + [f"*{q}*.gguf" for q in {quant, quant.upper(), quant.lower()}]
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise PullError(
            "pulling from Hugging Face needs huggingface_hub: pip install 'pagedserve[hub]'"
        ) from exc
    import httpx

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, revision=revision))
    except (OSError, ValueError, httpx.HTTPError) as exc:
        at = f" at revision {revision}" if revision else ""
        raise PullError(
            f"cannot download {repo_id}{at} from Hugging Face ({type(exc).__name__}: {exc}); "
            "the network may be unreachable or HF_HUB_OFFLINE set. Download it elsewhere and "
            "pull its directory: pagedserve pull /path/to/model (a model of the Ollama "
            f"registry's namespace {repo_id.split('/')[0]} is registry.ollama.ai/{repo_id})"
        ) from exc


class _FromRegistry(Exception):
    """``pull`` is to download the name from an Ollama registry: nothing local has it."""


def _pull_source(ref: str, revision: str | None = None) -> tuple[ResolvedModel, Manifest | None]:
    """Where ``pull`` copies from: the model found, and its Ollama manifest if it has one.
    Raises _FromRegistry for a name (NAME[:TAG], HOST/NAMESPACE/NAME[:TAG]) found nowhere.
    ``revision`` pins a Hugging Face repository's files (and is refused for anything else)."""
    if revision is not None and (_from_path(ref) is not None or ref.count("/") != 1):
        raise PullError(f"revision {revision!r}: only a Hugging Face repository ORG/NAME has "
                        f"revisions, and {ref!r} is not one")
    if (found := _from_path(ref)) is not None:
        return found, None
    try:
        parsed = ModelName.parse(ref)
    except ValueError as exc:
        raise PullError(f"cannot pull {ref!r}: no such file, and {exc}") from exc
    if revision is None and (manifest := ollama_store().find(parsed)) is not None:
        return ResolvedModel(_display_name(parsed, "ollama"), manifest.path, "ollama"), manifest
    if len(parsed.parts) == 2:
        explicit_tag = ref.rfind(":") > ref.rfind("/")
        try:
            quant = parsed.tag if explicit_tag and parsed.tag != "latest" else None
            logger.info("downloaded %s to %s", ref,
                        _download_hf("/".join(parsed.parts), quant, revision))
        except PullError:
            if _from_hf_cache(parsed, explicit_tag, revision) is None:
                raise
            logger.warning("cannot reach Hugging Face: pulling %s from the local cache", ref)
        if (found := _from_hf_cache(parsed, explicit_tag, revision)) is not None:
            return found, None
        if revision is not None:
            raise PullError(f"revision {revision!r} of {ref} is not in the cache after download")
    if ref in BUNDLED_ALIASES:
        return ResolvedModel(BUNDLED_MODEL_NAME, bundled_model_path(), "bundled"), None
    if len(parsed.parts) in (1, 3):  # llama3.2:1b, hf.co/ORG/REPO:QUANT
        raise _FromRegistry(ref)
    raise PullError(f"cannot pull {ref!r}: no file, Ollama model, Hugging Face repository or "
                    "bundled model has that name")


def _copy_layers(source: ResolvedModel, ollama_manifest: Manifest | None, own: BlobStore,
                 link: bool, progress: ProgressHook | None) -> list[Layer]:
    if ollama_manifest is not None:
        ollama = ollama_store()
        layers = []
        for layer in ollama_manifest.layers:
            blob = ollama.blob_path(layer)
            if not blob.is_file():
                raise ModelIntegrityError(f"blob {layer.blob_name} is missing: no file {blob}")
            label = f"{source.name} {layer.media_type.rsplit('.', 1)[-1]}"
            added = own.add_blob(blob, layer.digest, link=link, progress=progress, label=label)
            layers.append(Layer(layer.media_type, added.digest, added.size))
        return layers
    if source.path.is_file():
        added = own.add_blob(source.path, link=link, progress=progress)
        return [Layer(MEDIA_MODEL, added.digest, added.size)]
    layers = []
    for file in sorted(p for p in source.path.rglob("*") if p.is_file()):
        rel = file.relative_to(source.path).as_posix()
        if not any(part.startswith(".") for part in rel.split("/")):
            added = own.add_blob(file, link=link, progress=progress, label=rel)
            layers.append(Layer(MEDIA_FILE, added.digest, added.size, rel))
    return layers


def pull(ref: str, name: str | None = None, *, link: bool = False, insecure: bool = False,
         progress: ProgressHook | None = None, revision: str | None = None) -> ResolvedModel:
    """Copy (or hard-link, ``link=True``) a model into pagedserve's store, checking sha256.

    Sources, first match wins: a path (GGUF file or Hugging Face directory), an Ollama store
    entry (all its layers, digests checked), a Hugging Face repository ``ORG/NAME``
    (downloaded with huggingface_hub, or taken from its cache when offline), the bundled model,
    and last an Ollama registry for ``NAME[:TAG]`` and ``HOST/NAMESPACE/NAME[:TAG]``
    (:mod:`pagedserve.hub.registry_client`; ``insecure``: over http). A blob lands in the store
    only once its digest is known and checked; the manifest is written last. ``revision``:
    a Hugging Face repository's branch, tag or commit hash (default: main).
    """
    own = own_store()
    try:
        source, ollama_manifest = _pull_source(ref, revision)
    except _FromRegistry:
        target = RegistryRef.parse(ref, insecure=insecure, name=name)
        events = HookEvents(progress) if progress is not None else None
        return resolve(str(pull_from_registry(target, own, on_event=events)))
    target_name = ModelName.parse(name) if name else _default_pull_name(ref, source)
    with own.locked():  # until the manifest names the new blobs
        layers = _copy_layers(source, ollama_manifest, own, link, progress)
        manifest = Manifest(own.manifest_path(target_name), layers,
                            annotations={"pagedserve.source": f"{source.source}:{ref}"
                                         + (f"@{revision}" if revision else "")})
        own.write_manifest(target_name, manifest)
        if manifest.layer(MEDIA_FILE) is not None:
            own.build_tree(target_name, manifest)
        own.collect_garbage()  # blobs of a model this pull replaced
    logger.info("pulled %s as %s", ref, target_name)
    return resolve(str(target_name))


def _stored_name(blobs: BlobStore, ref: str) -> ModelName:
    """The store's name for ``ref``: as written, else as Ollama shortens it
    (``library/x`` is ``x``). Raises ModelNotFoundError naming the store."""
    try:
        name = ModelName.parse(ref)
    except ValueError as exc:
        raise ModelNotFoundError(f"model {ref!r} is not in pagedserve's store: {exc}") from exc
    for candidate in (name, name.short()):
        if blobs.manifest_path(candidate).is_file():
            return candidate
    raise ModelNotFoundError(
        f"model {ref!r} is not in pagedserve's store {blobs.root}; only models pulled there "
        "can be removed or copied (see `pagedserve list`)")


def remove(ref: str) -> list[Path]:
    """Delete a model from pagedserve's store (never from Ollama's or Hugging Face's); returns
    the blobs freed. Raises ModelNotFoundError when the store has no such model."""
    blobs = own_store()
    name = _stored_name(blobs, ref)
    try:
        return blobs.remove(name)
    except FileNotFoundError as exc:  # removed by someone else meanwhile
        raise ModelNotFoundError(f"model {ref!r} is not in pagedserve's store") from exc


def copy(source: str, destination: str) -> ModelName:
    """Give a model of pagedserve's store a second name (the blobs are shared, not copied);
    returns the new name. Raises ModelNotFoundError without ``source``, ValueError (naming
    ``destination``) for a destination that cannot be a name."""
    blobs = own_store()
    name = _stored_name(blobs, source)
    try:
        target = ModelName.parse(destination)
    except ValueError as exc:
        raise ValueError("destination" + str(exc).removeprefix("model")) from exc
    try:
        blobs.copy(name, target)
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"model {source!r} is not in pagedserve's store") from exc
    logger.info("copied %s to %s", name, target)
    return target
