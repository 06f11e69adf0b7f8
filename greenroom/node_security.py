"""Which CURVE keys each socket of a node uses, from the node's ``security`` section.

The client socket lets in ``curve_authorized_keys``; node-to-node sockets (a group head's rank
bus) let in ``curve_peer_keys`` (and the node's own key, which its local rank workers present).
A socket bound beyond loopback needs keys, or ``insecure``; given keys are used on loopback too.
A node connecting to a peer (a node agent or rank worker to its head, a router to its nodes)
presents its own key pair and expects the peer's public key from ``curve_peer_keys``.
"""

from __future__ import annotations

from greenroom.bus.security import (
    ClientKeys,
    SecurityError,
    SocketSecurity,
    check_bind,
    is_loopback,
)
from greenroom.config import ConfigError, NodeConfig
from greenroom.logging import get_logger

log = get_logger(__name__)


def client_socket_security(cfg: NodeConfig) -> SocketSecurity | None:
    """The client socket's CURVE keys (None: plain, on loopback or with ``insecure``)."""
    sec = cfg.security
    try:
        check_bind(cfg.host, sec.curve_secret_key is not None, sec.insecure)
        if sec.curve_secret_key is None:
            if not is_loopback(cfg.host):
                log.warning(
                    "serving beyond loopback WITHOUT authentication (--insecure)", host=cfg.host
                )
            return None
        return SocketSecurity.load(sec.curve_secret_key, sec.curve_authorized_keys)
    except SecurityError as exc:
        raise ConfigError(str(exc)) from None


def peer_socket_security(cfg: NodeConfig, host: str, what: str) -> SocketSecurity | None:
    """A node-to-node socket bound on ``host`` (``what`` names it in errors and logs)."""
    sec = cfg.security
    has_keys = sec.curve_secret_key is not None and sec.curve_peer_keys is not None
    try:
        check_bind(host, has_keys, sec.insecure, what=what)
        if not has_keys:
            if not is_loopback(host):
                log.warning(f"{what} runs beyond loopback WITHOUT authentication (--insecure)")
            return None
        return SocketSecurity.load_peers(sec.curve_secret_key, sec.curve_peer_keys)
    except SecurityError as exc:
        raise ConfigError(str(exc)) from None


def peer_client_keys(cfg: NodeConfig, address: str) -> ClientKeys | None:
    """This node's keys towards the peer serving ``address`` (None without peer keys)."""
    sec = cfg.security
    if sec.curve_secret_key is None or sec.curve_peer_keys is None:
        return None
    try:
        return ClientKeys.for_peer(sec.curve_secret_key, sec.curve_peer_keys, address)
    except SecurityError as exc:
        raise ConfigError(str(exc)) from None


__all__ = ["client_socket_security", "peer_client_keys", "peer_socket_security"]
