"""Pulling from an Ollama registry (the OCI distribution API) into pagedserve's own store.

A name ``[HOST/][NAMESPACE/]MODEL[:TAG]`` maps to the registry as Ollama maps it: no host means
the default registry (``$PAGEDSERVE_REGISTRY``, else ``https://registry.ollama.ai``), no
namespace means ``library``, no tag ``latest``. Two requests make a pull::

    GET {base}/v2/{namespace}/{model}/manifests/{tag}   -> {"layers": [...], "config": {...}}
    GET {base}/v2/{namespace}/{model}/blobs/{digest}    -> the blob's bytes, once per layer

Each blob grows in ``blobs/sha256-<hex>-partial`` beside the store, hashed on the way in. A
connection cut mid-blob is retried with ``Range: bytes=<size on disk>-``, and so is a partial
file a previous pull left, so only the rest is downloaded. A blob whose sha256 is not its
digest is deleted and the pull fails; the complete blobs enter the store (renamed to
``sha256-<hex>``) and the manifest is written only after every blob of the model checked, so a
failed pull installs nothing.

Progress is reported as Ollama's ``/api/pull`` objects (:class:`PullEvent`), which the server
streams as they are and the command line draws as progress bars::

    {"status": "pulling manifest"}
    {"status": "pulling 5ee4f07cdb9b", "digest": "sha256:5ee4...", "total": N, "completed": M}
    {"status": "verifying sha256 digest"}
    {"status": "writing manifest"}
    {"status": "success"}

Downloads block: the server runs a pull in a thread of its own.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from pagedserve.hub.store import (
    MEDIA_MANIFEST,
    MEDIA_MODEL,
    OLLAMA_HOST,
    BlobStore,
    Layer,
    Manifest,
    ModelIntegrityError,
    ModelName,
    ProgressHook,
    digest_cache,
    file_key,
)

logger = logging.getLogger(__name__)

REGISTRY_ENV = "PAGEDSERVE_REGISTRY"
DEFAULT_REGISTRY = f"https://{OLLAMA_HOST}"
MAX_TRIES = 5  # per blob, counting only tries that brought no new bytes
RETRY_WAIT_S = 0.25  # doubled after each fruitless try
PROGRESS_EVERY_S = 0.1  # at most this often per blob, plus its first and last report
_CHUNK = 1 << 20
_MANIFEST_LIMIT = 4 << 20  # bytes; a manifest is a few hundred
_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


class PullError(RuntimeError):
    """A model could not be brought into pagedserve's store; the message says why.

    ``status`` is the HTTP status a server answers with: 404 when the registry has no such
    model, 502 when the registry cannot be reached or answers wrongly."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


class PullCancelled(PullError):
    """The pull was cancelled (the client that asked for it went away)."""

    def __init__(self) -> None:
        super().__init__("pull cancelled", status=499)


@dataclass(slots=True)
class PullEvent:
    """One of Ollama's ``/api/pull`` progress objects."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Ollama's wire shape: digest, total and completed only when set and not zero."""
        out: dict[str, Any] = {"status": self.status}
        for key in ("digest", "total", "completed"):
            if value := getattr(self, key):
                out[key] = value
        return out


OnEvent = Callable[[PullEvent], None]


# ---------------------------------------------------------------------------------------------
# Names -> registry URLs


def default_registry() -> str:
    """``$PAGEDSERVE_REGISTRY`` (a URL, or a host for https) or ``https://registry.ollama.ai``."""
    value = os.environ.get(REGISTRY_ENV, "").strip().rstrip("/")
    if not value:
        return DEFAULT_REGISTRY
    return value if "://" in value else f"https://{value}"


@dataclass(frozen=True, slots=True)
class RegistryRef:
    """Where a model lives in a registry, and the name it gets in pagedserve's store."""

    base_url: str  # "https://registry.ollama.ai"
    namespace: str
    model: str
    tag: str
    local: ModelName

    @classmethod
    def parse(cls, ref: str, *, insecure: bool = False, name: str | None = None) -> RegistryRef:
        """Raises ValueError (naming ``model``) for a name that cannot be a registry's.

        ``insecure`` reaches the registry over http rather than https, as Ollama's flag does.
        ``name`` stores the model under another name than its registry's."""
        parsed = ModelName.parse(ref)
        default = default_registry()
        default_host = httpx.URL(default).netloc.decode()
        if len(parsed.parts) > 3:
            raise ValueError(f"model must be [HOST/][NAMESPACE/]NAME[:TAG], got {ref!r}")
        if len(parsed.parts) == 3 and parsed.parts[0] != default_host:
            host, namespace, model = parsed.parts
            base = f"{'http' if insecure else 'https'}://{host}"
            local = parsed
        else:
            namespace, model = (("library",) + parsed.parts)[-2:]
            base = default
            if insecure:  # as Ollama: any registry over plain http
                base = "http://" + default.split("://", 1)[1]
            local = ModelName((model,) if namespace == "library" else (namespace, model),
                              parsed.tag)
        return cls(base, namespace, model, parsed.tag, ModelName.parse(name) if name else local)

    @property
    def host(self) -> str:
        return httpx.URL(self.base_url).netloc.decode()

    @property
    def manifest_url(self) -> str:
        return f"{self.base_url}/v2/{self.namespace}/{self.model}/manifests/{self.tag}"

    def blob_url(self, digest: str) -> str:
        return f"{self.base_url}/v2/{self.namespace}/{self.model}/blobs/{digest}"

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


# ---------------------------------------------------------------------------------------------
# The pull


def pull_from_registry(target: RegistryRef, store: BlobStore, *, on_event: OnEvent | None = None,
                       cancel: threading.Event | None = None) -> ModelName:
    """Download ``target``'s manifest and blobs into ``store``; returns the name it got there.

    Raises PullError (the registry: unreachable, no such model, an answer we cannot read),
    ModelIntegrityError (a blob that does not match its digest), PullCancelled (``cancel``
    was set), or OSError (the store's disk)."""
    emit = on_event or (lambda event: None)
    cancel = cancel or threading.Event()
    with httpx.Client(follow_redirects=True, timeout=_TIMEOUT,
                      headers={"User-Agent": _user_agent()}) as client:
        emit(PullEvent("pulling manifest"))
        manifest = _fetch_manifest(client, target)
        blobs = [*manifest.layers, *([manifest.config] if manifest.config else [])]
        fetched: dict[str, Path | None] = {}  # digest -> its checked partial file
        for layer in blobs:
            if layer.digest in fetched or _present(store, layer):
                _report(emit, layer, layer.size)
                continue
            fetched[layer.digest] = _download(client, target, store, layer, emit, cancel)
    emit(PullEvent("verifying sha256 digest"))  # each blob was checked as it arrived
    with store.locked():
        for digest, partial in fetched.items():
            final = store.blob_path(digest)
            if partial is not None and partial.exists():  # else a concurrent pull moved it
                os.replace(partial, final)
                digest_cache().put(file_key(final), digest.removeprefix("sha256:"))
        for layer in blobs:
            if not _present(store, layer):  # removed by another writer since we looked
                raise PullError(f"blob {layer.digest} of {target} vanished from the store "
                                "during the pull; pull again", status=500)
        emit(PullEvent("writing manifest"))
        path = store.manifest_path(target.local)
        store.write_manifest(target.local, Manifest(
            path, manifest.layers, manifest.config,
            {"pagedserve.source": f"registry:{target.manifest_url}"}))
        if store.collect_garbage():  # blobs of the model this pull replaced
            emit(PullEvent("removing unused layers"))
    emit(PullEvent("success"))
    logger.info("pulled %s from %s as %s", target, target.base_url, target.local)
    return target.local


def _present(store: BlobStore, layer: Layer) -> bool:
    blob = store.blob_path(layer)
    return blob.is_file() and blob.stat().st_size == layer.size


def _report(emit: OnEvent, layer: Layer, completed: int) -> None:
    emit(PullEvent(f"pulling {layer.digest.removeprefix('sha256:')[:12]}", layer.digest,
                   layer.size, completed))


def _user_agent() -> str:
    from pagedserve.version import __version__

    return f"pagedserve/{__version__}"


def _unreachable(target: RegistryRef, exc: Exception) -> PullError:
    reason = str(exc) or type(exc).__name__
    return PullError(f"cannot reach the registry {target.host} ({target.base_url}): {reason}; "
                     f"check the network, or set {REGISTRY_ENV} to a registry you can reach")


def _fetch_manifest(client: httpx.Client, target: RegistryRef) -> Manifest:
    try:
        with client.stream("GET", target.manifest_url,
                           headers={"Accept": MEDIA_MANIFEST}) as response:
            _check_status(response, target, what="manifest")
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > _MANIFEST_LIMIT:
                    raise PullError(f"the registry {target.host} sent more than "
                                    f"{_MANIFEST_LIMIT} bytes as the manifest of {target}")
        data = json.loads(body)
        layers = [Layer.from_json(layer) for layer in data["layers"]]
        config = Layer.from_json(data["config"]) if data.get("config") else None
    except httpx.TransportError as exc:
        raise _unreachable(target, exc) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise PullError(f"the registry {target.host} sent a manifest for {target} that is not "
                        f"one pagedserve can read: {exc}") from exc
    manifest = Manifest(Path(), layers, config)
    if manifest.layer(MEDIA_MODEL) is None:  # e.g. safetensors "tensor" layers, for MLX
        kinds = ", ".join(sorted({layer.media_type for layer in layers})) or "none"
        raise PullError(f"{target} has no GGUF model layer ({MEDIA_MODEL}), so pagedserve "
                        f"cannot run it; its layers: {kinds}", status=400)
    return manifest


def _check_status(response: httpx.Response, target: RegistryRef, what: str) -> None:
    status = response.status_code
    if status in (200, 206):
        return
    if status == 404:
        raise PullError(f"model {target.local} not found in the registry {target.host}: no "
                        f"{what} at {response.request.url}", status=404)
    if status in (401, 403):
        raise PullError(f"the registry {target.host} refused the {what} of {target} "
                        f"({status}): a private model, which pagedserve cannot sign in for")
    response.read()  # a streamed answer's error body
    raise PullError(f"the registry {target.host} answered {status} for the {what} of "
                    f"{target}: {' '.join(response.text[:200].split())}")


def _download(client: httpx.Client, target: RegistryRef, store: BlobStore, layer: Layer,
              emit: OnEvent, cancel: threading.Event) -> Path | None:
    """The blob, complete and checked, in its partial file (None: another pull brought it into
    the store meanwhile). Resumes what a previous try left in the partial file."""
    store.blobs_dir.mkdir(parents=True, exist_ok=True)
    partial = store.partial_path(layer.digest)
    with open(partial, "a+b") as out:
        _lock(out.fileno(), cancel)  # a concurrent pull of the same blob waits here
        if _present(store, layer):  # the pull we waited for finished it
            if os.fstat(out.fileno()).st_size == 0:  # the empty file we just made
                partial.unlink(missing_ok=True)
            return None
        blob = _PartialBlob(partial, layer, out)
        wait, fruitless = RETRY_WAIT_S, 0
        while blob.size < layer.size:
            _report(emit, layer, blob.size)
            had = blob.size
            try:
                blob.receive(client, target, emit, cancel)
            except httpx.TransportError as exc:
                fruitless = 0 if blob.size > had else fruitless + 1
                if fruitless >= MAX_TRIES:
                    raise _unreachable(target, exc) from exc
                logger.info("download of %s cut at %d of %d bytes (%s); resuming",
                            layer.digest, blob.size, layer.size, exc)
                if fruitless:
                    time.sleep(wait)
                    wait *= 2
            else:
                break  # the registry sent all it had: complete or not, the check says
        blob.check(target)
    _report(emit, layer, layer.size)
    return partial


class _PartialBlob:
    """A blob's partial file, open to read and append under its lock, and the sha256 of what
    it holds. Read through that descriptor, not the path: the file may have grown, or been
    renamed into the store, while this pull waited for the lock."""

    def __init__(self, path: Path, layer: Layer, out: BinaryIO) -> None:
        self.path = path
        self.layer = layer
        self.out = out
        self.sha = hashlib.sha256()
        out.seek(0)
        while chunk := out.read(_CHUNK):
            self.sha.update(chunk)
        if self.size > layer.size:
            logger.warning("discarding %s: %d bytes, more than the blob's %d", path,
                           self.size, layer.size)
            self.restart()
        elif self.size:
            logger.info("resuming %s at %d of %d bytes", layer.digest, self.size, layer.size)

    @property
    def size(self) -> int:
        return self.out.tell()

    def restart(self) -> None:
        self.out.seek(0)
        self.out.truncate()
        self.sha = hashlib.sha256()

    def receive(self, client: httpx.Client, target: RegistryRef, emit: OnEvent,
                cancel: threading.Event) -> None:
        """Append the rest of the blob from the registry, from ``size`` on."""
        start = self.size
        # identity: byte offsets must be the blob's; a range resumes from the first missing one
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={start}-"} if start else {})}
        with client.stream("GET", target.blob_url(self.layer.digest), headers=headers) as response:
            if response.status_code == 416:  # nothing after `start`: the check will say
                return
            _check_status(response, target, what=f"blob {self.layer.digest}")
            if start and response.status_code == 200:
                logger.info("%s ignored the range: downloading %s again", target.host,
                            self.layer.digest)
                self.restart()
            elif start and not response.headers.get("content-range", "").startswith(
                    f"bytes {start}-"):
                raise PullError(f"the registry {target.host} answered a download from byte "
                                f"{start} of {self.layer.digest} with the range "
                                f"{response.headers.get('content-range')!r}")
            last = time.monotonic()
            for chunk in response.iter_bytes():  # as they arrive: a cut loses nothing read
                if cancel.is_set():
                    raise PullCancelled()
                self.out.write(chunk)
                self.sha.update(chunk)
                if time.monotonic() - last >= PROGRESS_EVERY_S:
                    _report(emit, self.layer, min(self.size, self.layer.size))
                    last = time.monotonic()
                if self.size > self.layer.size:
                    return  # more than the manifest said: the check refuses it

    def check(self, target: RegistryRef) -> None:
        """Raises ModelIntegrityError, and deletes the file, unless size and sha256 match."""
        self.out.flush()
        os.fsync(self.out.fileno())
        actual = self.sha.hexdigest()
        if self.size == self.layer.size and actual == self.layer.digest.removeprefix("sha256:"):
            return
        size = self.size
        self.path.unlink()
        raise ModelIntegrityError(
            f"blob {self.layer.digest} of {target} from {target.host} is corrupt: its "
            f"{size} bytes have sha256 {actual}, not the {self.layer.size} bytes of that "
            "digest; it was deleted and nothing was installed")


def _lock(fd: int, cancel: threading.Event) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if cancel.wait(0.1):
                raise PullCancelled() from None


# ---------------------------------------------------------------------------------------------
# Progress bars for the command line


class HookEvents:
    """Draws a pull's events on a :class:`ProgressHook` (one bar per blob)."""

    def __init__(self, hook: ProgressHook) -> None:
        self.hook = hook
        self._done: dict[str, int] = {}  # digest -> bytes reported so far

    def __call__(self, event: PullEvent) -> None:
        if event.digest is None:
            return
        completed = event.completed or 0
        if event.digest not in self._done:
            self.hook.begin(event.status, event.total or 0)
            self._done[event.digest] = 0
        if completed > self._done[event.digest]:
            self.hook.advance(completed - self._done[event.digest])
            self._done[event.digest] = completed
