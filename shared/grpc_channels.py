"""The one place gRPC client channels are made: TLS when a CA is configured, this caller's bearer
token on every call.

    creds = ClientCredentials.of_service(cfg.auth)          # a service calling another
    creds = ClientCredentials.of_operator(load_config(OperatorConfig))   # `rlhf trainer`
    with sync_channel("127.0.0.1:50054", creds) as channel: ...
    channel = aio_channel(address, creds, options=[...])     # grpc.aio, in the loop that uses it
    channel = aio_channel(replica_target("10.0.0.5:50051,10.0.0.6:50051"), creds,
                          options=balanced_options("rlhf.v1.InferenceService"))   # several replicas

The token travels as metadata ``authorization: Bearer <token>`` (added by a client interceptor, so
it works on TLS and loopback plaintext channels alike). A token is never sent in plaintext to a host
that is not loopback unless ``allow_plaintext`` says the network is encrypted (a service mesh).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from shared.config import ConfigError, OperatorConfig, ServiceAuthConfig, is_loopback
from shared.grpc_server import AUTH_METADATA_KEY

Options = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class ClientCredentials:
    """How a caller connects: its token, and TLS (CA, optional client certificate, expected name)."""

    token: str = ""
    """Bearer token sent with every call; empty sends none (health checks need none)."""
    ca_file: Path | None = None
    """Set: TLS, the server's certificate checked against this PEM CA. Unset: plaintext."""
    cert_file: Path | None = None
    """Client certificate presented for mutual TLS (with ``key_file``)."""
    key_file: Path | None = None
    server_name: str = ""
    """Name the server's certificate must carry, instead of the address's host."""
    allow_plaintext: bool = False
    """Send the token without TLS to a host that is not loopback."""
    prefix: str = "RLHF_AUTH_"
    """Prefix of the settings these came from, for error messages."""

    @classmethod
    def of_service(cls, auth: ServiceAuthConfig) -> ClientCredentials:
        """A service's credentials as a client: its own token, the CA, its certificate with mutual TLS."""
        mutual = auth.tls_client_auth
        return cls(
            token=auth.own_token(),
            ca_file=auth.tls_ca_file,
            cert_file=auth.tls_cert_file if mutual else None,
            key_file=auth.tls_key_file if mutual else None,
            server_name=auth.tls_server_name,
            allow_plaintext=auth.allow_plaintext,
        )

    @classmethod
    def of_operator(cls, cfg: OperatorConfig) -> ClientCredentials:
        return cls(
            token=cfg.own_token(),
            ca_file=cfg.tls_ca_file,
            cert_file=cfg.tls_cert_file,
            key_file=cfg.tls_key_file,
            server_name=cfg.tls_server_name,
            allow_plaintext=cfg.allow_plaintext,
            prefix="RLHF_OPERATOR_",
        )

    def without_token(self) -> ClientCredentials:
        """The same transport, no token: for health checks, which are open."""
        return ClientCredentials(
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            server_name=self.server_name,
            allow_plaintext=self.allow_plaintext,
            prefix=self.prefix,
        )

    @property
    def tls(self) -> bool:
        return self.ca_file is not None


def target_host(address: str) -> str:
    """The host of a gRPC target: ``host:port``, ``[v6]:port``, ``dns:///host:port``, ``ipv4:h:p``
    (the first one of a list)."""
    return target_hosts(address)[0]


def target_hosts(address: str) -> list[str]:
    """Every host a gRPC target names: one for ``host:port``, ``[v6]:port`` and ``dns:///host:port``;
    one per entry of a list (``ipv4:h1:p1,h2:p2``, ``h1:p1,h2:p2``)."""
    target = address
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    hosts = []
    for entry in target.split(","):
        entry = entry.strip()
        if entry.startswith("["):
            hosts.append(entry[1:].split("]", 1)[0])
        else:
            hosts.append(entry.rpartition(":")[0] if ":" in entry else entry)
    return hosts


TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")
"""gRPC name-resolver schemes a target may start with (taken as they are)."""


def replica_target(address: str) -> str:
    """The gRPC target of one server or of several replicas of one service.

    Rule: a target with a scheme (``dns:///name:port``: every address the name resolves to, e.g. a
    headless Kubernetes Service; ``ipv4:``, ``ipv6:``, ``unix:``) and a single ``host:port`` are
    returned as they are; a comma-separated list ``h1:p1,h2:p2`` of IP addresses (``localhost``
    counts as 127.0.0.1) becomes ``ipv4:h1:p1,h2:p2`` (or ``ipv6:[h1]:p1,...``): one subchannel per
    replica. A list naming hosts, mixing address families or with an entry that is not ``host:port``
    raises ValueError (a list of names needs one DNS name that resolves to all of them).
    """
    address = address.strip()
    if address.startswith(TARGET_SCHEMES) or "," not in address:
        return address
    families = set()
    entries = []
    for raw in address.split(","):
        entry = raw.strip()
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{entry!r} is not host:port")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if host == "localhost":
            host = "127.0.0.1"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{host!r} is not an IP address: list replicas by address, or give one DNS name that resolves "
                "to every replica as dns:///name:port"
            ) from None
        families.add(ip.version)
        entries.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if len(families) > 1:
        raise ValueError("the replicas mix IPv4 and IPv6 addresses")
    return ("ipv6:" if families == {6} else "ipv4:") + ",".join(entries)


def balanced_options(health_service: str) -> list[tuple[str, Any]]:
    """Channel options that spread calls over every address of a target and route around the ones
    that are not ready: ``round_robin`` over the subchannels whose server reports SERVING for
    ``health_service`` on grpc.health.v1 (client-side health checking: each subchannel watches its
    server's status, so a replica that reports NOT_SERVING gets no new calls until it reports SERVING
    again; calls already running on it go on)."""
    config = {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": health_service}}
    return [("grpc.service_config", json.dumps(config))]


def check_transport(address: str, creds: ClientCredentials) -> None:
    """Refuse to send a token in plaintext off loopback (ConfigError naming the settings).

    Rule: a token without TLS is allowed only to loopback hosts (localhost, 127.0.0.0/8, ::1; every
    host of a list of replicas) or with ``allow_plaintext``; unix sockets count as local.
    """
    if not creds.token or creds.tls or creds.allow_plaintext or address.startswith(("unix:", "unix-abstract:")):
        return
    if not all(is_loopback(host) for host in target_hosts(address)):
        p = creds.prefix
        raise ConfigError(
            f"refusing to send a bearer token to {address} without TLS: set {p}TLS_CA_FILE (the CA of the "
            f"services' certificates), or {p}ALLOW_PLAINTEXT=1 where the network itself is encrypted"
        )


def _read(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{variable}={str(path)!r}: cannot read it ({exc.__class__.__name__}: {exc})") from None


def channel_credentials(creds: ClientCredentials) -> grpc.ChannelCredentials:
    """TLS channel credentials: the CA to verify the server, and the client certificate if any."""
    assert creds.ca_file is not None
    p = creds.prefix
    key = _read(creds.key_file, f"{p}TLS_KEY_FILE") if creds.key_file else None
    cert = _read(creds.cert_file, f"{p}TLS_CERT_FILE") if creds.cert_file else None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(creds.ca_file, f"{p}TLS_CA_FILE"), private_key=key, certificate_chain=cert
    )


def _options(creds: ClientCredentials, options: Options) -> list[tuple[str, Any]]:
    out = list(options)
    if creds.tls and creds.server_name:
        out.append(("grpc.ssl_target_name_override", creds.server_name))
    return out


def _with_token(metadata: Any, token: str) -> list[tuple[str, str | bytes]]:
    return [*(metadata or ()), (AUTH_METADATA_KEY, f"Bearer {token}")]


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call of a synchronous channel."""

    def __init__(self, token: str):
        self.token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            _with_token(details.metadata, self.token),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(
        self,
        method: str,
        timeout: float | None,
        metadata: Any,
        credentials: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


class _AioToken(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the bearer token to every unary call of a grpc.aio channel.

    One class per call shape: grpc.aio files an interceptor under the first shape it is an instance
    of (an if/elif chain), so a class of both shapes would never see the streaming calls."""

    def __init__(self, token: str):
        self.token = token

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(details._replace(metadata=_with_token(details.metadata, self.token)), request)


class _AioStreamToken(grpc.aio.UnaryStreamClientInterceptor):
    """Adds the bearer token to every unary-stream call of a grpc.aio channel (GenerateStream)."""

    def __init__(self, token: str):
        self.token = token

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(details._replace(metadata=_with_token(details.metadata, self.token)), request)


def sync_channel(address: str, creds: ClientCredentials, *, options: Options = ()) -> grpc.Channel:
    """A synchronous channel to ``address`` with ``creds`` (TLS when a CA is set; the token on every call)."""
    check_transport(address, creds)
    opts = _options(creds, options)
    if creds.tls:
        channel = grpc.secure_channel(address, channel_credentials(creds), options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    return grpc.intercept_channel(channel, _SyncToken(creds.token)) if creds.token else channel


def aio_channel(address: str, creds: ClientCredentials, *, options: Options = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address`` with ``creds``; make it in the event loop that will use it."""
    check_transport(address, creds)
    opts = _options(creds, options)
    interceptors: list[Any] | None = [_AioToken(creds.token), _AioStreamToken(creds.token)] if creds.token else None
    if creds.tls:
        return grpc.aio.secure_channel(address, channel_credentials(creds), options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
