"""An Ollama-style registry on 127.0.0.1 for tests: the two GETs of the OCI distribution API
that a pull makes, served from memory, with the faults a download must survive.

    GET /v2/<namespace>/<model>/manifests/<tag>   the manifest JSON, or 404
    GET /v2/<namespace>/<model>/blobs/<digest>    the blob; honours "Range: bytes=N-" (206)

Faults, set by the test: ``cut_after[digest] = n`` sends the first n bytes of that blob's next
download, then drops the connection (once); ``down_after_cut`` makes every blob request after
a cut a 503 until cleared; ``corrupt`` serves a blob with its last byte changed;
``ignore_range`` answers every range with the whole blob (200); ``rate`` slows every blob to
that many bytes a second. Each blob request is logged as a :class:`Hit`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_MANIFEST = re.compile(r"^/v2/([^/]+)/([^/]+)/manifests/([^/]+)$")
_BLOB = re.compile(r"^/v2/([^/]+)/([^/]+)/blobs/(sha256:[0-9a-f]{64})$")


@dataclass(slots=True)
class Hit:
    digest: str
    start: int  # the first byte asked for (0 without a Range header)
    status: int
    sent: int  # body bytes written


class Registry:
    def __init__(self) -> None:
        self.manifests: dict[tuple[str, str, str], bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}
        self.down_after_cut = False
        self.down = False
        self.corrupt: set[str] = set()
        self.ignore_range = False
        self.rate: float | None = None
        self.hits: list[Hit] = []
        self.manifest_requests = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="test-registry")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def add_model(self, name: str, layers: list[tuple[str, bytes]]) -> dict:
        """``namespace/model:tag`` with these (media type, content) layers and a config."""
        base, tag = name.rsplit(":", 1)
        namespace, model = base.split("/")
        config = self.add_blob(json.dumps({"model_format": "gguf"}).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       **config},
            "layers": [{"mediaType": media, **self.add_blob(data)} for media, data in layers],
        }
        self.manifests[(namespace, model, tag)] = json.dumps(manifest).encode()
        return manifest

    def add_blob(self, data: bytes) -> dict:
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        self.blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    def blob_hits(self, digest: str) -> list[Hit]:
        return [hit for hit in self.hits if hit.digest == digest]

    def __enter__(self) -> Registry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(registry: Registry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if match := _MANIFEST.match(self.path):
                registry.manifest_requests += 1
                body = registry.manifests.get(match.groups())
                if body is None:
                    self._error(404, "MANIFEST_UNKNOWN")
                    return
                self._send(200, body, "application/vnd.docker.distribution.manifest.v2+json")
            elif match := _BLOB.match(self.path):
                self._blob(match.group(3))
            else:
                self._error(404, "NAME_UNKNOWN")

        def _blob(self, digest: str) -> None:
            data = registry.blobs.get(digest)
            asked = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
            start = int(asked.group(1)) if asked else 0
            hit = Hit(digest, start, 0, 0)
            registry.hits.append(hit)
            if registry.down or data is None:
                hit.status = 503 if registry.down else 404
                self._error(hit.status, "BLOB_UNKNOWN")
                return
            if digest in registry.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            if registry.ignore_range:
                start = 0
            if start >= len(data) and asked:
                hit.status = 416
                self._error(416, "RANGE_NOT_SATISFIABLE")
                return
            hit.status = 206 if start else 200
            self.send_response(hit.status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            end = len(data)
            cut = registry.cut_after.pop(digest, None)
            if cut is not None:
                end = min(end, start + cut)
            step = 64 << 10
            for offset in range(start, end, step):
                chunk = data[offset:min(offset + step, end)]
                self.wfile.write(chunk)
                hit.sent += len(chunk)
                if registry.rate:
                    time.sleep(len(chunk) / registry.rate)
            self.wfile.flush()
            if cut is not None:  # drop the connection with the body unfinished
                registry.down = registry.down_after_cut
                self.close_connection = True

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, code: str) -> None:
            body = json.dumps({"errors": [{"code": code, "message": code.lower()}]}).encode()
            self._send(status, body, "application/json")

    return Handler
