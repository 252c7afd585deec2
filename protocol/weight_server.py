"""Weight shards over HTTP: the learner serves each version, actors fetch and relay it.

The learner serves the versions it publishes from its own disk (`sendfile`: the bytes never
pass through Python) and the manifest names the URL (`WeightManifest.sources`). An actor
fetches each shard on a connection of its own, hashing and writing the bytes as they arrive
(`fetch_shard`), and serves what it has received to other actors, while it is still receiving
(a relay passes the bytes on as they land). Fan-out: a server sends a version itself to at
most `fanout` requesters; it redirects (307) every later one to one of those, which applies
the same rule, so a version spreads down a tree of degree `fanout` and the learner sends at
most `fanout` copies however many actors there are. The receiver checks every sha256 against
the manifest; whatever an HTTP source gets wrong (refused, cut short, redirected in a loop,
bytes that do not hash) falls back to the object store for that shard.

Every URL starts with a token the learner draws at start (`/<token>/v<version>/<file>`): only
a reader of the manifest (a NATS user allowed to read KV `aha-policy`) can fetch. A relay
accepts the token of the manifest it fetched.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import secrets
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import structlog
from pydantic import BaseModel, ConfigDict, Field

from protocol.messages import Shard
from protocol.weights import ShardError

log = structlog.get_logger("protocol.weight_server")

RELAY_HEADER = "X-Aha-Relay"
"""A requester's own server URL: where a server may redirect later requesters for the version."""

MAX_REDIRECTS = 8
"""Relay hops a fetch follows before it gives the HTTP path up (a tree of degree 2 and 8
levels holds 500 actors)."""

CONNECT_S = 5.0
"""How long a fetch waits for a server to accept its connection."""

READ_BYTES = 4 << 20
"""Bytes a fetch receives, hashes and writes at a time."""

_PATH = re.compile(r"^/([0-9a-f]{16,64})/v(\d{1,18})/([A-Za-z0-9][A-Za-z0-9._-]{0,199})$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class WeightServerConfig(BaseModel):
    """The HTTP server every learner and actor runs to pass weight shards on."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = True
    """Serve (learner) and fetch and relay (actor) shards over HTTP; the object store is the
    fallback either way. Off: the object store only."""
    host: str = "0.0.0.0"
    """Address to listen on."""
    port: int = Field(0, ge=0, le=65535)
    """Port to listen on; 0 = any free one (compose and Helm fix it for their network policies)."""
    advertise: str | None = Field(None, pattern=r"^https?://[^/\s]+$")
    """`http://host:port` others reach this server at; default: this host's address (what its
    name resolves to, as in a container or pod) and the port listened on."""
    fanout: int = Field(2, ge=1, le=64)
    """Requesters a server sends a version to itself; later ones are redirected to those."""
    parallel: int = Field(4, ge=1, le=64)
    """Shards an actor fetches at once (each hashed in its own thread)."""
    stall_s: float = Field(30.0, gt=0)
    """Seconds without a byte after which a fetch, or a relay waiting for bytes, gives up."""
    store_wait_s: float = Field(120.0, ge=0)
    """Actor: how long a shard HTTP did not deliver waits for its object-store copy when the
    manifest says that copy is uploaded after it (`stored` false), while `latest` still names
    the version; past it the version is refused whole."""
    upload_wait_s: float = Field(120.0, ge=0)
    """Learner: at shutdown, how long the background object-store upload of the last version
    may still run (keep it within the orchestrator's kill timeout)."""


def is_file_name(name: str) -> bool:
    """Whether `name` is a plain file name (no folder, no `..`): what a shard may be called."""
    return bool(_FILE_NAME.match(name)) and ".." not in name


@dataclass
class Entry:
    """A file a server offers: complete, or still arriving (`received` grows to `size`)."""

    path: Path
    size: int
    received: int = 0
    failed: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)

    def advance(self, received: int) -> None:
        with self.changed:
            self.received = received
            self.changed.notify_all()

    def fail(self) -> None:
        with self.changed:
            self.failed = True
            self.changed.notify_all()

    def wait_beyond(self, sent: int, timeout: float) -> int:
        """Bytes available past `sent` (0 if failed or nothing came within `timeout`)."""
        with self.changed:
            self.changed.wait_for(lambda: self.failed or self.received > sent, timeout)
            return 0 if self.failed else self.received - sent


@dataclass
class _Version:
    entries: dict[str, Entry] = field(default_factory=dict)
    direct: list[str] = field(default_factory=list)
    redirected: dict[str, str] = field(default_factory=dict)
    folder: Path | None = None


class WeightServer:
    """A threaded HTTP server of weight versions; `start()` it, `close()` it."""

    def __init__(self, config: WeightServerConfig, token: str | None = None):
        self.config = config
        self.token = token or secrets.token_hex(16)
        self._versions: dict[tuple[str, int], _Version] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self.sent_bytes = 0
        """Body bytes sent so far (what this server's outbound fan-out costs)."""

    def start(self) -> WeightServer:
        handler = type("Handler", (_Handler,), {"weights": self})
        self._httpd = ThreadingHTTPServer((self.config.host, self.config.port), handler)
        self._httpd.daemon_threads = True
        threading.Thread(
            target=self._httpd.serve_forever, name="weight-server", daemon=True
        ).start()
        log.info("weight server listening", url=self.url)
        return self

    @property
    def base(self) -> str:
        """`http://host:port` others reach this server at."""
        assert self._httpd is not None, "start() the server first"
        if self.config.advertise:
            return self.config.advertise
        return f"http://{own_address()}:{self._httpd.server_address[1]}"

    @property
    def url(self) -> str:
        """The base of this server's own versions (the learner's `sources` entry)."""
        return f"{self.base}/{self.token}"

    def offer(self, version: int, folder: Path, shards: list[Shard], *, owned: bool = True):
        """Serve `folder`'s complete shard files as `version`; `forget` deletes the folder when
        it is `owned` (not a shared volume's, which the learner prunes itself)."""
        files = {s.name: Entry(folder / s.name, s.bytes, received=s.bytes) for s in shards}
        with self._lock:
            self._versions[self.token, version] = _Version(files, folder=folder if owned else None)

    def receiving(self, token: str, version: int, folder: Path, shards: list[Shard]) -> dict:
        """Serve `version`'s shards as they arrive in `folder`; returns their entries by name,
        for the fetch to `advance` (or `fail`). A registration of the same version it replaces
        fails at once (its requesters are cut off and fall back, rather than wait `stall_s`
        for bytes that will not come), and its folder is deleted unless it is `folder`."""
        files = {s.name: Entry(folder / s.name, s.bytes) for s in shards}
        with self._lock:
            old = self._versions.get((token, version))
            self._versions[token, version] = _Version(files, folder=folder)
        if old is not None:
            for entry in old.entries.values():
                entry.fail()
            if old.folder is not None and old.folder != folder:
                shutil.rmtree(old.folder, ignore_errors=True)
        return files

    def forget(self, keep: int) -> list[int]:
        """Stop serving all but the newest `keep` versions and delete their folders."""
        with self._lock:
            old = sorted(self._versions, key=lambda k: k[1])
            old = old[:-keep] if keep else old
        return self._remove(old)

    def drop(self, version: int) -> list[int]:
        """Stop serving `version` (under any token) and delete its folder."""
        with self._lock:
            old = [k for k in self._versions if k[1] == version]
        return self._remove(old)

    def _remove(self, keys: list[tuple[str, int]]) -> list[int]:
        with self._lock:
            dropped = [v for k in keys if (v := self._versions.pop(k, None)) is not None]
        for version in dropped:
            for entry in version.entries.values():
                entry.fail()  # a relay still waiting for bytes stops
            if version.folder is not None:
                shutil.rmtree(version.folder, ignore_errors=True)
        return [k[1] for k in keys]

    def route(self, token: str, version: int, requester: str | None) -> str | None:
        """None to serve `requester` here, else the base URL of the server to redirect it to."""
        with self._lock:
            v = self._versions.get((token, version))
            if v is None or requester is None or requester == self.base:
                return None
            if requester in v.direct:
                return None
            if requester in v.redirected:
                return v.redirected[requester]
            if len(v.direct) < self.config.fanout:
                v.direct.append(requester)
                return None
            target = v.direct[len(v.redirected) % len(v.direct)]
            v.redirected[requester] = target
            return target

    def entry(self, token: str, version: int, name: str) -> Entry | None:
        with self._lock:
            v = self._versions.get((token, version))
            return None if v is None else v.entries.get(name)

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        self.forget(0)


class _Handler(BaseHTTPRequestHandler):
    weights: WeightServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        pass  # every request would be a stderr line

    def do_GET(self) -> None:
        match = _PATH.match(self.path)
        entry = match and self.weights.entry(match[1], int(match[2]), match[3])
        if not entry:
            self.send_error(404)
            return
        relay = self.headers.get(RELAY_HEADER)
        relay = relay if relay and re.match(r"^https?://[^/\s]+$", relay) else None
        target = self.weights.route(match[1], int(match[2]), relay)
        if target is not None:
            self.send_response(307)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(entry.size))
        self.end_headers()
        self.send_body(entry)

    def send_body(self, entry: Entry) -> None:
        """The file's bytes as they become available; the connection is cut if its source fails
        or stalls (the requester then sees a short body and falls back).

        A relay is asked for shards it has not begun to receive (its own fetch of one waits for
        a slot, or for its source's answer): the file is created only when that answer arrives,
        so it is opened once the first bytes are in it, not before (opening a file not there yet
        cut the body off at 0 bytes)."""
        sent = 0
        stall_s = self.weights.config.stall_s
        try:
            if entry.size and entry.wait_beyond(0, stall_s):
                with open(entry.path, "rb") as f:
                    while sent < entry.size:
                        ready = entry.wait_beyond(sent, stall_s)
                        if not ready:
                            break
                        n = self.connection.sendfile(f, offset=sent, count=ready)
                        if not n:  # the file is shorter than its entry says
                            break
                        sent += n
        except OSError:  # the requester went away, or the file was deleted
            pass
        self.weights.sent_bytes += sent
        if sent < entry.size:
            self.close_connection = True


def own_address() -> str:
    """This host's address as others see it: what its name resolves to (a container's or pod's
    address), else loopback."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def fetch_shard(
    url: str,
    shard: Shard,
    path: Path,
    *,
    relay: str | None = None,
    entry: Entry | None = None,
    stall_s: float = 30.0,
) -> None:
    """GET `url` into `path`, hashing while receiving; `ShardError` unless the bytes are exactly
    `shard`'s. `relay` (this actor's server) is announced so a full server can redirect here;
    `entry` is advanced as bytes land so that server can pass them on. Blocking: run it in a
    thread. Nothing is left at `path` on error."""
    try:
        response, conn = _open(url, relay, stall_s)
        try:
            got = _receive(response, shard, path, entry)
        finally:
            conn.close()
        if got != shard.sha256:
            raise ShardError(
                f"shard {shard.name}: sha256 mismatch from {url}: got {got}, "
                f"the manifest says {shard.sha256}"
            )
    except (OSError, http.client.HTTPException) as e:
        path.unlink(missing_ok=True)
        raise ShardError(f"shard {shard.name}: {url}: {e!r}") from e
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if entry is not None:
        entry.advance(shard.bytes)


def _open(url: str, relay: str | None, stall_s: float):
    """The 200 response for `url`, following relay redirects."""
    headers = {RELAY_HEADER: relay} if relay else {}
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ShardError(f"not an http URL: {url[:200]}")
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=CONNECT_S)
        conn.connect()  # an address nobody answers at costs CONNECT_S, not the stall limit
        conn.sock.settimeout(stall_s)
        conn.request("GET", parts.path, headers=headers)
        response = conn.getresponse()
        if response.status == 200:
            return response, conn
        location = response.getheader("Location")
        conn.close()
        if response.status != 307 or not location:
            raise ShardError(f"{url[:200]}: HTTP {response.status}")
        url = location
    raise ShardError(f"more than {MAX_REDIRECTS} redirects from {url[:200]}")


def _receive(response, shard: Shard, path: Path, entry: Entry | None) -> str:
    """Write the body to `path` and hash it; the hex sha256.

    sha256 costs more CPU than receiving and writing together (~1 s/GB against ~0.7 s/GB on
    this machine's cores), so it runs in a thread of its own, one chunk behind: while chunk i
    is hashed, chunk i+1 is received and written into the other of two buffers. A shard then
    keeps two cores busy, and its rate is sha256's on one core rather than the sum of the two.
    """
    length = response.getheader("Content-Length")
    if length != str(shard.bytes):
        raise ShardError(
            f"shard {shard.name}: {length} bytes offered, the manifest says {shard.bytes}"
        )
    digest = hashlib.sha256()
    size = min(READ_BYTES, max(shard.bytes, 1))
    buffers = [memoryview(bytearray(size)) for _ in range(2)]
    received = turn = 0
    hashing = None  # the previous chunk's hash, in flight while this chunk arrives
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
            while received < shard.bytes:
                # This buffer's previous chunk (two back) was hashed: its hash was awaited
                # before the last one was submitted.
                buffer = buffers[turn % 2]
                turn += 1
                n = response.readinto(buffer[: min(size, shard.bytes - received)])
                if not n:
                    raise ShardError(f"shard {shard.name}: cut off after {received} bytes")
                chunk = rest = buffer[:n]
                while rest:
                    rest = rest[os.write(fd, rest) :]
                received += n
                if entry is not None:
                    entry.advance(received)
                if hashing is not None:
                    hashing.result()
                hashing = hasher.submit(digest.update, chunk)
            if hashing is not None:
                hashing.result()
    finally:
        os.close(fd)
    return digest.hexdigest()
