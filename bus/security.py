"""CURVE authentication for sockets bound beyond loopback (ZeroMQ's CurveZMQ + ZAP).

`greenroom keys` makes key pairs (`NAME.key` holds the public key, `NAME.key_secret` both).
A server socket takes its secret key and the public keys of the clients it accepts; the ZAP
handler (one per zmq context, run by pyzmq on a thread) refuses any other client during the
handshake, so such a client's messages never reach the application. A client takes its own
secret key and the server's public key.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

ZAP_DOMAIN = "greenroom"
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

    @classmethod
    def load(cls, secret_key_file: str | Path, authorized_keys: str | Path) -> SocketSecurity:
        public, secret = load_key_pair(secret_key_file)
        return cls(public, secret, load_authorized_keys(authorized_keys))

    def apply_server(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True


def apply_client_keys(
    sock: zmq.Socket, server_public_key: bytes, client_public: bytes, client_secret: bytes
) -> None:
    sock.curve_secretkey = client_secret
    sock.curve_publickey = client_public
    sock.curve_serverkey = server_public_key


class _AllowList:
    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


class ZapHandler:
    """The context's ZAP handler: accepts CURVE clients whose public key is authorized."""

    def __init__(self, ctx: zmq.Context, security: SocketSecurity) -> None:
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback(
            ZAP_DOMAIN, credentials_provider=_AllowList(security.authorized_keys)
        )

    def stop(self) -> None:
        self._auth.stop()


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, has_keys: bool, insecure: bool) -> None:
    """Refuse a bind beyond loopback without CURVE keys (unless explicitly insecure)."""
    if has_keys or insecure or is_loopback(host):
        return
    raise SecurityError(
        f"host = {host!r} is not a loopback address: clients must authenticate. Make keys with "
        "`greenroom keys --dir keys --name server` (and one pair per client), then serve with "
        "--curve-secret-key keys/server.key_secret --curve-authorized-keys DIR_OF_CLIENT_KEYS "
        "(or pass --insecure to serve without authentication)"
    )


__all__ = [
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
]
