"""Content-addressed model stores: Ollama's layout, which pagedserve's own store also uses.

A store is a directory of manifests and blobs::

    ROOT/manifests/NAME.../TAG        JSON: {"schemaVersion": 2, "layers": [Layer, ...], ...}
    ROOT/blobs/sha256-<hex>           one file per distinct content, named by its sha256
    ROOT/blobs/sha256-<hex>-partial   a download under way, or cut: the next pull resumes it
    ROOT/trees/NAME.../TAG/<file>     pagedserve only: a Hugging Face directory rebuilt from
                                      symlinks to its blobs (a loader needs real file names)

Ollama keeps its store at ``$OLLAMA_MODELS`` or ``~/.ollama/models``, its manifests under
``manifests/registry.ollama.ai/library/NAME/TAG``. pagedserve keeps its own at
``$PAGEDSERVE_HOME/models`` (``~/.pagedserve/models``), its manifests under ``manifests/NAME/TAG``.

Writers (a pull, ``rm``, ``cp``, in the server or on the command line) hold the store's lock,
``ROOT/.lock``, from the moment they add blobs until their manifest names them, and while they
collect garbage: blobs no manifest names are deleted, so a blob must never be seen unnamed.

Every blob is checked against its digest before a model is handed out. Hashing a few GB takes
seconds, so verified digests are remembered by (real path, size, mtime) in
``$PAGEDSERVE_HOME/cache/digests.json``: a second start of the same model hashes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_FILE = "application/vnd.pagedserve.file"  # one file of a Hugging Face directory
MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

OLLAMA_HOST = "registry.ollama.ai"
OLLAMA_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_CHUNK = 1 << 20
_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_BLOB_NAME_RE = re.compile(r"^sha256-[0-9a-f]{64}$")
_NAME_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HOST_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(:[0-9]{1,5})?$")  # host[:port]


class ModelIntegrityError(OSError):
    """A blob is missing, or its content does not match its digest; the message names it.

    An OSError: like an unreadable file, it is the disk's state, not the caller's input."""


class ProgressHook(Protocol):
    """What a long copy or hash reports to; the CLI draws a progress bar from it."""

    def begin(self, label: str, total: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def end(self) -> None: ...


class NullProgress:
    def begin(self, label: str, total: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def end(self) -> None:
        pass


def pagedserve_home() -> Path:
    """``$PAGEDSERVE_HOME`` or ``~/.pagedserve``: pagedserve's own store and caches."""
    env = os.environ.get("PAGEDSERVE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".pagedserve"


def ollama_models_dir() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


# ---------------------------------------------------------------------------------------------
# Names


@dataclass(frozen=True, slots=True)
class ModelName:
    """``[HOST/][NAMESPACE/]MODEL[:TAG]``; a missing tag means ``latest``.

    As in Ollama, three components are host, namespace and model, and only the host may carry
    a port (``localhost:5000/library/tiny``); two are namespace and model."""

    parts: tuple[str, ...]  # the path components before the tag
    tag: str

    @classmethod
    def parse(cls, ref: str) -> ModelName:
        """Raises ValueError for a reference that cannot be a model name."""
        slash = ref.rfind("/")
        colon = ref.rfind(":")
        if colon > slash:
            base, tag = ref[:colon], ref[colon + 1:]
        else:
            base, tag = ref, DEFAULT_TAG
        parts = tuple(base.split("/"))
        host_ok = len(parts) == 3 and _HOST_PART_RE.match(parts[0])
        rest = parts[1:] if host_ok else parts
        if not base or not all(_NAME_PART_RE.match(p) for p in rest + (tag,)):
            raise ValueError(f"model must be NAME[:TAG] of letters, digits, '.', '_', '-', got {ref!r}")
        return cls(parts, tag)

    def __str__(self) -> str:
        return f"{'/'.join(self.parts)}:{self.tag}"

    def ollama_parts(self) -> tuple[str, ...]:
        """The manifest path components in an Ollama store: host/namespace/model/tag."""
        parts = self.parts
        if len(parts) == 1:
            parts = (OLLAMA_NAMESPACE, *parts)
        if len(parts) == 2 or (len(parts) > 3 and "." not in parts[0]):
            parts = (OLLAMA_HOST, *parts)
        return (*parts, self.tag)

    def short(self) -> ModelName:
        """The name as Ollama prints it: ``registry.ollama.ai/library/x`` is ``x``."""
        return ModelName.from_ollama_parts(self.ollama_parts())

    @classmethod
    def from_ollama_parts(cls, parts: tuple[str, ...]) -> ModelName:
        """The short name Ollama prints: library models without host and namespace."""
        *path, tag = parts
        if path[0] == OLLAMA_HOST:
            path = path[1:]
            if path[0] == OLLAMA_NAMESPACE:
                path = path[1:]
        return cls(tuple(path), tag)


# ---------------------------------------------------------------------------------------------
# Manifests


@dataclass(slots=True)
class Layer:
    media_type: str
    digest: str  # "sha256:<hex>"
    size: int
    filename: str | None = None  # MEDIA_FILE layers: the path inside the model directory

    def __post_init__(self) -> None:
        if not _DIGEST_RE.match(self.digest):
            raise ValueError(f"digest must be 'sha256:<64 hex digits>', got {self.digest!r}")

    @property
    def blob_name(self) -> str:
        return self.digest.replace(":", "-")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.filename is not None:
            out["filename"] = self.filename
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layer:
        return cls(data["mediaType"], data["digest"], int(data.get("size", 0)),
                   data.get("filename"))


@dataclass(slots=True)
class Manifest:
    path: Path  # the manifest file
    layers: list[Layer]
    config: Layer | None = None
    annotations: dict[str, Any] = field(default_factory=dict)

    def layer(self, media_type: str) -> Layer | None:
        return next((layer for layer in self.layers if layer.media_type == media_type), None)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                               "layers": [layer.to_json() for layer in self.layers]}
        if self.config is not None:
            out["config"] = self.config.to_json()
        if self.annotations:
            out["annotations"] = self.annotations
        return out


def read_manifest(path: Path) -> Manifest:
    """Raises ModelIntegrityError when the file is not a manifest we understand."""
    try:
        data = json.loads(path.read_text())
        layers = [Layer.from_json(layer) for layer in data["layers"]]
        config = Layer.from_json(data["config"]) if data.get("config") else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelIntegrityError(f"unreadable manifest {path}: {exc}") from exc
    return Manifest(path, layers, config, dict(data.get("annotations") or {}))


# ---------------------------------------------------------------------------------------------
# Digests


def file_key(path: Path) -> str:
    """Identifies a file's content cheaply: a change of content changes size or mtime."""
    st = path.stat()
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


class JsonCache:
    """A small JSON dict on disk, for results that are slow to compute from a file (keyed by
    :func:`file_key`). A convenience only: when its file cannot be read or written, callers
    recompute, and why is logged at debug level."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._entries is None:
            try:
                self._entries = dict(json.loads(self.path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                logger.debug("cache %s not used: %s", self.path, exc)
                self._entries = {}
        return self._entries

    def get(self, key: str) -> Any:
        with self._lock:
            return self._load().get(key)

    def put(self, key: str, value: Any) -> None:
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            logger.debug("not caching %s: %s", key, exc)
            return
        with self._lock:
            entries = self._load()
            entries[key] = value
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}-")
                with os.fdopen(fd, "w") as f:
                    json.dump(entries, f, indent=0, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError as exc:
                logger.debug("cache %s not written: %s", self.path, exc)


_digest_cache: JsonCache | None = None


def digest_cache() -> JsonCache:
    """Verified sha256 digests by :func:`file_key`."""
    global _digest_cache
    path = pagedserve_home() / "cache" / "digests.json"
    if _digest_cache is None or _digest_cache.path != path:
        _digest_cache = JsonCache(path)
    return _digest_cache


def sha256_file(path: Path, progress: ProgressHook | None = None,
                label: str | None = None) -> str:
    """The hex sha256 of a file, reporting bytes read to ``progress``."""
    progress = progress or NullProgress()
    h = hashlib.sha256()
    progress.begin(f"verifying {label or path.name}", path.stat().st_size)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                progress.advance(len(chunk))
    finally:
        progress.end()
    return h.hexdigest()


def verify_blob(path: Path, digest: str, progress: ProgressHook | None = None,
                label: str | None = None) -> None:
    """Check that the blob at ``path`` has content ``digest``; cached by (path, size, mtime)."""
    expected = digest.removeprefix("sha256:")
    if not path.is_file():
        raise ModelIntegrityError(f"blob {path.name} is missing: no file {path}")
    cache = digest_cache()
    actual = cache.get(file_key(path))
    if actual is None:
        logger.debug("hashing %s", path)
        actual = sha256_file(path, progress, label)
        if actual == expected:  # remember only good blobs: a bad one is reported every time
            cache.put(file_key(path), actual)
    if actual != expected:
        raise ModelIntegrityError(
            f"blob {path.name} is corrupt: its sha256 is {actual}, not {expected} ({path}); "
            "remove the model and pull it again"
        )


# ---------------------------------------------------------------------------------------------
# Stores


class BlobStore:
    """A directory of manifests and blobs. Read-only use fits Ollama's store too."""

    def __init__(self, root: Path, *, ollama_layout: bool = False) -> None:
        self.root = root
        self.ollama_layout = ollama_layout

    @property
    def manifests_dir(self) -> Path:
        return self.root / "manifests"

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    def manifest_parts(self, name: ModelName) -> tuple[str, ...]:
        return name.ollama_parts() if self.ollama_layout else (*name.parts, name.tag)

    def manifest_path(self, name: ModelName) -> Path:
        return self.manifests_dir.joinpath(*self.manifest_parts(name))

    def tree_path(self, name: ModelName) -> Path:
        return self.root.joinpath("trees", *self.manifest_parts(name))

    def blob_path(self, layer: Layer | str) -> Path:
        digest = layer.digest if isinstance(layer, Layer) else layer
        return self.blobs_dir / digest.replace(":", "-")

    def partial_path(self, digest: str) -> Path:
        """Where the download of ``digest`` grows until it is complete and checked."""
        return self.blobs_dir / f"{digest.replace(':', '-')}-partial"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The store's writers' lock (see the module's docstring): threads of this process
        wait for each other on :data:`_WRITERS`, processes on ``flock(ROOT/.lock)``."""
        with _WRITERS.hold(self.root):
            yield

    def find(self, name: ModelName) -> Manifest | None:
        path = self.manifest_path(name)
        return read_manifest(path) if path.is_file() else None

    def names(self) -> Iterator[ModelName]:
        """Every model with a manifest, in sorted order."""
        if not self.manifests_dir.is_dir():
            return
        for path in sorted(p for p in self.manifests_dir.rglob("*") if p.is_file()):
            parts = path.relative_to(self.manifests_dir).parts
            if any(part.startswith(".") for part in parts) or len(parts) < 2:
                continue
            if self.ollama_layout:
                yield ModelName.from_ollama_parts(parts)
            else:
                yield ModelName(parts[:-1], parts[-1])

    def verify(self, manifest: Manifest, progress: ProgressHook | None = None) -> None:
        for layer in manifest.layers:
            verify_blob(self.blob_path(layer), layer.digest, progress)

    def read_text_layer(self, manifest: Manifest, media_type: str) -> str | None:
        layer = manifest.layer(media_type)
        return None if layer is None else self.blob_path(layer).read_text(encoding="utf-8")

    # -- writing (pagedserve's own store) ------------------------------------------------------

    def add_blob(self, source: Path, expected_digest: str | None = None, *, link: bool = False,
                 progress: ProgressHook | None = None, label: str | None = None) -> Layer:
        """Copy (or hard-link) ``source`` into the store as a blob, hashing it on the way.

        The blob lands under its digest only after the hash matched ``expected_digest`` (when
        given), so a failed or interrupted copy leaves nothing behind but a removed temp file.
        """
        progress = progress or NullProgress()
        label = label or source.name
        source = Path(os.path.realpath(source))
        size = source.stat().st_size
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        if expected_digest is not None:
            existing = self.blob_path(expected_digest)
            if existing.is_file() and existing.stat().st_size == size:
                try:
                    verify_blob(existing, expected_digest, progress, label)
                    return Layer("", expected_digest, size)
                except ModelIntegrityError:
                    logger.warning("replacing corrupt blob %s", existing)
        fd, tmp_name = tempfile.mkstemp(dir=self.blobs_dir, prefix=".partial-")
        tmp = Path(tmp_name)
        try:
            linked = False
            if link:
                os.close(fd)
                tmp.unlink()
                try:
                    os.link(source, tmp)
                    linked = True
                except OSError as exc:
                    logger.info("cannot hard-link %s (%s); copying it", source, exc)
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            if linked:
                hexdigest = sha256_file(tmp, progress, label)
            else:
                hexdigest = _copy_hashing(source, fd, size, progress, label)
            digest = f"sha256:{hexdigest}"
            if expected_digest is not None and digest != expected_digest:
                raise ModelIntegrityError(
                    f"blob {source.name} is corrupt: its sha256 is {hexdigest}, "
                    f"not {expected_digest.removeprefix('sha256:')} ({source})"
                )
            if not linked:
                tmp.chmod(0o644)
            final = self.blob_path(digest)
            os.replace(tmp, final)
            digest_cache().put(file_key(final), hexdigest)
            return Layer("", digest, size)
        finally:
            tmp.unlink(missing_ok=True)

    def write_manifest(self, name: ModelName, manifest: Manifest) -> Path:
        path = self.manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
        manifest.path = path
        return path

    def build_tree(self, name: ModelName, manifest: Manifest) -> Path:
        """Lay out a Hugging Face directory of relative symlinks to the manifest's blobs."""
        tree = self.tree_path(name)
        if tree.exists():
            shutil.rmtree(tree)
        for layer in manifest.layers:
            if layer.media_type != MEDIA_FILE or not layer.filename:
                continue
            dest = tree / layer.filename
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(os.path.relpath(self.blob_path(layer), dest.parent))
        return tree

    def remove(self, name: ModelName) -> list[Path]:
        """Delete a model's manifest and tree, then every blob no other manifest uses."""
        with self.locked():
            path = self.manifest_path(name)
            if not path.is_file():
                raise FileNotFoundError(path)
            path.unlink()
            _prune_empty_dirs(path.parent, self.manifests_dir)
            tree = self.tree_path(name)
            if tree.exists():
                shutil.rmtree(tree)
                _prune_empty_dirs(tree.parent, self.root / "trees")
            return self.collect_garbage()

    def copy(self, source: ModelName, destination: ModelName) -> Manifest:
        """A second name for a model: a manifest naming the same blobs (nothing is copied).
        Replaces what ``destination`` named before. Raises FileNotFoundError without
        ``source``."""
        with self.locked():
            manifest = self.find(source)
            if manifest is None:
                raise FileNotFoundError(self.manifest_path(source))
            copy = Manifest(self.manifest_path(destination), manifest.layers, manifest.config,
                            dict(manifest.annotations))
            self.write_manifest(destination, copy)
            if copy.layer(MEDIA_FILE) is not None:
                self.build_tree(destination, copy)
            self.collect_garbage()  # the blobs only the replaced destination used
            return copy

    def collect_garbage(self) -> list[Path]:
        """Delete every blob no manifest names; partial downloads stay, to be resumed."""
        with self.locked():
            used: set[str] = set()
            for other in self.names():
                manifest = self.find(other)
                if manifest is not None:
                    used.update(layer.blob_name for layer in manifest.layers)
                    if manifest.config is not None:
                        used.add(manifest.config.blob_name)
            removed = []
            if self.blobs_dir.is_dir():
                for blob in sorted(self.blobs_dir.iterdir()):
                    if _BLOB_NAME_RE.match(blob.name) and blob.name not in used:
                        blob.unlink()
                        removed.append(blob)
            return removed


class _WritersLock:
    """Per store root: a reentrant lock between this process's threads, and the first holder
    keeps ``flock(ROOT/.lock)`` between processes. Reentrant, because ``remove`` collects
    garbage while it holds the lock; flock alone would not be (two opens of one file conflict,
    even in one process)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Path, threading.RLock] = {}
        self._held: dict[Path, tuple[int, int]] = {}  # root -> (depth, lock file descriptor)

    @contextlib.contextmanager
    def hold(self, root: Path) -> Iterator[None]:
        root = Path(os.path.realpath(root))
        with self._guard:
            lock = self._locks.setdefault(root, threading.RLock())
        with lock:
            depth, fd = self._held.get(root, (0, -1))
            if depth == 0:
                root.mkdir(parents=True, exist_ok=True)
                fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
            self._held[root] = (depth + 1, fd)
            try:
                yield
            finally:
                depth, fd = self._held.pop(root)
                if depth > 1:
                    self._held[root] = (depth - 1, fd)
                else:
                    os.close(fd)  # closing releases the flock


_WRITERS = _WritersLock()


def own_store() -> BlobStore:
    return BlobStore(pagedserve_home() / "models")


def ollama_store() -> BlobStore:
    return BlobStore(ollama_models_dir(), ollama_layout=True)


def _copy_hashing(source: Path, fd: int, size: int, progress: ProgressHook, label: str) -> str:
    h = hashlib.sha256()
    progress.begin(f"copying {label}", size)
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                dst.write(chunk)
                progress.advance(len(chunk))
            dst.flush()
            os.fsync(dst.fileno())
    finally:
        progress.end()
    return h.hexdigest()


def _prune_empty_dirs(start: Path, stop: Path) -> None:
    current = start
    while current != stop and stop in current.parents:
        try:
            current.rmdir()
        except OSError:
            return
        current = current.parent
