"""A broker that answers but refuses this client: what went wrong, in words an operator can act on.

Retrying cannot fix wrong credentials, an untrusted certificate, a client speaking plain
text to a TLS listener (or TLS to a plain one) or a missing ACL, so these end a start at
once with a :class:`~qtasks.exc.BrokerRefusedError` instead of waiting for a broker that
already answered. Passwords never appear in these messages.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any

from aiokafka import errors as kafka_exc

from qtasks.exc import BrokerRefusedError

#: The first bytes of a TLS record: content type (alert 21, handshake 22), then version 3.x.
_TLS_RECORD_TYPES = (0x15, 0x16)

#: OpenSSL's reasons for a handshake that met something other than TLS (a plain listener).
#: Other TLS failures (a connection cut mid-handshake while a broker restarts) may pass.
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"})

#: Kafka's errors for a missing ACL, and the resource each names.
_AUTHORIZATION: dict[type[BaseException], str] = {
    kafka_exc.TopicAuthorizationFailedError: "a topic",
    kafka_exc.GroupAuthorizationFailedError: "the consumer group",
    kafka_exc.ClusterAuthorizationFailedError: "the cluster",
    kafka_exc.TransactionalIdAuthorizationFailed: "the transactional id",
}


def not_granted(where: str, user: str | None, lacking: Sequence[str]) -> BrokerRefusedError:
    """The error for ACLs that do not let this client do what the app needs.

    ``lacking`` are phrases such as ``"write on topic 'orders.results'"``. The check at start
    and a refusal met later (a share group's heartbeat, its settings) say the same words.
    """
    who = f"user {user!r}" if user else "this client"
    return BrokerRefusedError(
        f"Kafka at {where} does not let {who} do what this app needs: "
        f"{'; '.join(lacking)}. Grant it in the ACLs (docs/kafka.md lists what an app needs)"
    )


def refusal(exc: BaseException, where: str, options: dict[str, Any], *, handshake: bool = False) -> str | None:
    """What ``exc`` says about how the brokers at ``where`` refuse us, or None if it is not a refusal.

    ``options`` are the aiokafka client options (protocol, mechanism, user): they name what
    to fix. ``handshake``: ``exc`` ended a fresh connection's first exchange (the probe), where
    a TLS failure or a TLS record means the listener and the client disagree; on a connection
    already in use they mean a stream cut short, which may pass.
    """
    protocol = str(options.get("security_protocol", "PLAINTEXT"))
    user = options.get("sasl_plain_username") or ""
    who = f"user {user!r}" if user else "this client"
    mechanism = options.get("sasl_mechanism") or ""
    if isinstance(exc, kafka_exc.SaslAuthenticationFailed | kafka_exc.AuthenticationFailedError):
        return (
            f"Kafka at {where} refused the credentials of {who} ({mechanism}): "
            "check kafka_sasl_username and the password (kafka_sasl_password or kafka_sasl_password_file)"
        )
    if isinstance(exc, kafka_exc.UnsupportedSaslMechanismError | kafka_exc.AuthenticationMethodNotSupported):
        return (
            f"Kafka at {where} does not take SASL mechanism {mechanism!r}: set kafka_sasl_mechanism to one it enables"
        )
    if isinstance(exc, kafka_exc.IllegalSaslStateError):
        return (
            f"Kafka at {where} does not take SASL on this listener, but kafka_security_protocol is {protocol}: "
            "use PLAINTEXT or SSL for it"
        )
    for kind, what in _AUTHORIZATION.items():
        if isinstance(exc, kind):
            return f"Kafka at {where} denies {who} access to {what} ({exc}): grant it in the ACLs"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: the certificate of Kafka at {where} is not trusted ({getattr(exc, 'verify_message', None) or exc}): "
            "set kafka_ssl_cafile to the CA that signed it"
        )
    if not handshake:
        return None
    if isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None) in _NOT_TLS:
        reason = exc.reason
        return (
            f"TLS with Kafka at {where} failed ({reason}): is its listener TLS? (kafka_security_protocol is {protocol})"
        )
    if not protocol.endswith("SSL") and _answered_in_tls(exc):
        return (
            f"Kafka at {where} answers in TLS, but kafka_security_protocol is {protocol}: "
            "use SSL or SASL_SSL (and kafka_ssl_cafile)"
        )
    return None


def _answered_in_tls(exc: BaseException) -> bool:
    """A plain-text client reads a TLS record's header as the size of a Kafka response."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, asyncio.IncompleteReadError) and exc.expected is not None:
            head = exc.expected.to_bytes(4, "big", signed=False) if 0 <= exc.expected < 2**32 else b""
            return len(head) == 4 and head[0] in _TLS_RECORD_TYPES and head[1] == 0x03
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False
