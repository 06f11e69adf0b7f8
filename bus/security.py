"""CURVE authentication for sockets bound beyond loopback (ZeroMQ's CurveZMQ + ZAP).

`greenroom keys` makes key pairs (`NAME.key` holds the public key, `NAME.key_secret` both).
A server socket takes its secret key and the public keys of the clients it accepts; the ZAP
handler (one per zmq context, run by pyzmq on a thread) refuses any other client during the
handshake, so such a client's messages never reach the application. A client takes its own
secret key and the server's public key.

Two ZAP domains keep the key sets apart: clients (the client socket) and peers (node-to-node
sockets: a group head's rank bus, which node agents and rank workers join). A client key
therefore never opens a node-to-node socket. A node connecting to a peer finds the peer's
public key in ``security.curve_peer_keys``: one key file, or a directory holding
``HOST_PORT.key`` or ``HOST.key`` per peer (or a single ``*.key``).
"""

from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

ZAP_DOMAIN = "greenroom"  # the client socket's clients
PEER_DOMAIN = "greenroom-peers"  # node-to-node sockets' peers
LOOPBACK_NAMES = ("localhost",)


class SecurityError(ValueError):
    """Keys missing, unreadable, or a bind that needs keys and has none."""


def make_key_pair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (secret, mode 0600) into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (directory / f"{name}{suffix}").exists():
            raise SecurityError(f"{directory / (name + suffix)} exists; choose another name")
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_public_key(path: str | Path) -> bytes:
    """The z85 public key in a `.key` or `.key_secret` file."""
    try:
        public, _secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read a CURVE key from {str(path)!r}: {exc}") from None
    return public


def load_key_pair(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a `.key_secret` file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read a CURVE key from {str(path)!r}: {exc}") from None
    if secret is None:
        raise SecurityError(
            f"{str(path)!r} holds no secret key: pass the NAME.key_secret file `greenroom keys` wrote"
        )
    return public, secret


def load_authorized_keys(path: str | Path) -> frozenset[bytes]:
    """Client public keys: every `*.key` file of a directory, or one key file."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.key"))
        if not files:
            raise SecurityError(f"no client public keys (*.key) in {str(p)!r}")
        return frozenset(load_public_key(f) for f in files)
    return frozenset({load_public_key(p)})


@dataclass(frozen=True)
class SocketSecurity:
    """A CURVE server socket's keys and the client keys it accepts."""

    public_key: bytes
    secret_key: bytes
    authorized_keys: frozenset[bytes]
    domain: str = ZAP_DOMAIN

    @classmethod
    def load(cls, secret_key_file: str | Path, authorized_keys: str | Path) -> SocketSecurity:
        public, secret = load_key_pair(secret_key_file)
        return cls(public, secret, load_authorized_keys(authorized_keys))

    @classmethod
    def load_peers(cls, secret_key_file: str | Path, peer_keys: str | Path) -> SocketSecurity:
        """A node-to-node server socket: the peers' keys and this node's own (its local
        workers present it) are let in, in the peer domain."""
        public, secret = load_key_pair(secret_key_file)
        allowed = load_authorized_keys(peer_keys) | {public}
        return cls(public, secret, allowed, PEER_DOMAIN)

    def apply_server(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.ZAP_DOMAIN, self.domain.encode())
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True


def apply_client_keys(
    sock: zmq.Socket, server_public_key: bytes, client_public: bytes, client_secret: bytes
) -> None:
    sock.curve_secretkey = client_secret
    sock.curve_publickey = client_public
    sock.curve_serverkey = server_public_key


def peer_key_file(peer_keys: str | Path, address: str) -> Path:
    """The public key file of the peer serving ``address`` (tcp://HOST:PORT): ``peer_keys``
    itself when a file, else ``HOST_PORT.key``, ``HOST.key`` or the only ``*.key`` in it."""
    p = Path(peer_keys)
    if not p.is_dir():
        if not p.exists():
            raise SecurityError(f"cannot read CURVE peer keys: {str(p)!r} does not exist")
        return p
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    names = [f"{host}_{port}.key", f"{host}.key"]
    for name in names:
        if (p / name).is_file():
            return p / name
    files = sorted(p.glob("*.key"))
    if len(files) == 1:
        return files[0]
    raise SecurityError(
        f"no public key for the peer at {address} in {str(p)!r}: expected {' or '.join(names)}"
        + (" (or a single *.key)" if not files else "")
    )


@dataclass(frozen=True)
class ClientKeys:
    """A CURVE client socket's keys: its own pair and the server's public key."""

    server_public_key: bytes
    public_key: bytes
    secret_key: bytes

    @classmethod
    def for_peer(
        cls, secret_key_file: str | Path, peer_keys: str | Path, address: str
    ) -> ClientKeys:
        public, secret = load_key_pair(secret_key_file)
        return cls(load_public_key(peer_key_file(peer_keys, address)), public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        apply_client_keys(sock, self.server_public_key, self.public_key, self.secret_key)


class _AllowList:
    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


class _SharedAuthenticator:
    def __init__(self, ctx: zmq.Context) -> None:
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.users = 0


_authenticators: dict[int, _SharedAuthenticator] = {}
_authenticators_lock = threading.Lock()


class ZapHandler:
    """Accepts CURVE clients of ``security.domain`` whose public key is authorized. One ZAP
    authenticator serves a zmq context (its inproc endpoint is unique per context), shared by
    every handler of that context, one domain each; it stops with the last handler."""

    def __init__(self, ctx: zmq.Context, security: SocketSecurity) -> None:
        self._key = id(ctx)
        self._domain = security.domain
        with _authenticators_lock:
            shared = _authenticators.get(self._key)
            if shared is None:
                shared = _authenticators[self._key] = _SharedAuthenticator(ctx)
            shared.users += 1
            shared.auth.configure_curve_callback(
                security.domain, credentials_provider=_AllowList(security.authorized_keys)
            )
        self._stopped = False

    def stop(self) -> None:
        with _authenticators_lock:
            if self._stopped:
                return
            self._stopped = True
            shared = _authenticators[self._key]
            shared.auth.credentials_providers.pop(self._domain, None)
            shared.users -= 1
            if shared.users == 0:
                del _authenticators[self._key]
                shared.auth.stop()


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, has_keys: bool, insecure: bool, what: str = "") -> None:
    """Refuse a bind beyond loopback without CURVE keys (unless explicitly insecure).

    ``what`` names a node-to-node socket (e.g. "the rank bus"); empty: the client socket."""
    if has_keys or insecure or is_loopback(host):
        return
    if what:
        raise SecurityError(
            f"{what} binds {host!r}, not a loopback address: peers must authenticate. Make a "
            "key pair per node with `greenroom keys --dir keys --name NODE`, then pass "
            "--curve-secret-key keys/NODE.key_secret --curve-authorized-keys CLIENT_KEYS "
            "--curve-peer-keys DIR_OF_PEER_KEYS (or --insecure to run without authentication)"
        )
    raise SecurityError(
        f"host = {host!r} is not a loopback address: clients must authenticate. Make keys with "
        "`greenroom keys --dir keys --name server` (and one pair per client), then serve with "
        "--curve-secret-key keys/server.key_secret --curve-authorized-keys DIR_OF_CLIENT_KEYS "
        "(or pass --insecure to serve without authentication)"
    )


__all__ = [
    "PEER_DOMAIN",
    "ZAP_DOMAIN",
    "ClientKeys",
    "SecurityError",
    "SocketSecurity",
    "ZapHandler",
    "apply_client_keys",
    "check_bind",
    "is_loopback",
    "load_authorized_keys",
    "load_key_pair",
    "load_public_key",
    "make_key_pair",
    "peer_key_file",
]
