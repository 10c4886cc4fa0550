"""The channel factory's rules: which hosts a target names, never a token in plaintext off loopback,
targets of several replicas, and the health-checked round robin that routes around a replica that
reports NOT_SERVING."""

from __future__ import annotations

import pytest

from shared.config import ConfigError, OperatorConfig, ServiceAuthConfig, load_config
from shared.grpc_channels import (
    ClientCredentials,
    balanced_options,
    check_transport,
    replica_target,
    sync_channel,
    target_host,
    target_hosts,
)


@pytest.mark.parametrize(
    "target,host",
    [
        ("127.0.0.1:50051", "127.0.0.1"),
        ("rlhf-inference:50051", "rlhf-inference"),
        ("dns:///rlhf-inference.rlhf.svc:50051", "rlhf-inference.rlhf.svc"),
        ("[::1]:50051", "::1"),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", "10.0.0.1"),
        ("localhost", "localhost"),
    ],
)
def test_target_host(target, host):
    assert target_host(target) == host


def test_target_hosts_lists_every_replica():
    assert target_hosts("ipv4:10.0.0.1:1,10.0.0.2:1") == ["10.0.0.1", "10.0.0.2"]
    assert target_hosts("ipv6:[::1]:1,[::1]:2") == ["::1", "::1"]
    assert target_hosts("127.0.0.1:1, 127.0.0.2:2") == ["127.0.0.1", "127.0.0.2"]
    assert target_hosts("dns:///rlhf-inference:50051") == ["rlhf-inference"]


@pytest.mark.parametrize(
    "address,target",
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("rlhf-inference:50051", "rlhf-inference:50051"),
        ("dns:///rlhf-inference-canary:50051", "dns:///rlhf-inference-canary:50051"),
        ("ipv4:10.0.0.1:1,10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        ("10.0.0.1:1, 10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        ("localhost:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
        ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2"),
    ],
)
def test_replica_target(address, target):
    assert replica_target(address) == target


@pytest.mark.parametrize(
    "address,problem",
    [
        ("inference-0:1,inference-1:1", "not an IP address"),
        ("10.0.0.1:1,10.0.0.2", "not host:port"),
        ("10.0.0.1:1,", "not host:port"),
        ("10.0.0.1:1,[::1]:2", "mix IPv4 and IPv6"),
    ],
)
def test_a_bad_list_of_replicas_is_refused_with_the_reason(address, problem):
    with pytest.raises(ValueError, match=problem):
        replica_target(address)


TOKEN = "a-token-of-enough-characters-0123"


def test_a_token_goes_in_plaintext_to_a_list_of_replicas_only_when_all_are_loopback():
    check_transport("ipv4:127.0.0.1:1,127.0.0.2:2", ClientCredentials(token=TOKEN))
    with pytest.raises(ConfigError, match="without TLS"):
        check_transport("ipv4:127.0.0.1:1,10.0.0.2:2", ClientCredentials(token=TOKEN))


def test_health_checked_round_robin_routes_around_a_replica_that_is_not_serving():
    """Two real servers behind one channel: both take calls while SERVING; while one reports
    NOT_SERVING for the watched service every call goes to the other, and none fails; back to
    SERVING, it takes calls again. With neither serving, calls fail fast (UNAVAILABLE)."""
    import asyncio

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from shared.grpc_channels import aio_channel

    watched = "rlhf.v1.Test"
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    async def run() -> dict[str, list[object]]:
        servers, healths, ports = [], [], []
        for i in range(2):
            server = grpc.aio.server()
            h = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(h, server)
            ports.append(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
            await h.set(watched, serving)
            await h.set(f"replica-{i}", serving)  # each server knows only its own name: who answered
            servers.append(server)
            healths.append(h)
        channel = aio_channel(
            replica_target(",".join(f"127.0.0.1:{p}" for p in ports)),
            ClientCredentials(),
            options=balanced_options(watched),
        )
        stub = health_pb2_grpc.HealthStub(channel)

        async def who() -> object:
            try:
                await stub.Check(health_pb2.HealthCheckRequest(service="replica-1"), timeout=5)
                return 1
            except grpc.aio.AioRpcError as exc:
                return 0 if exc.code() == grpc.StatusCode.NOT_FOUND else exc.code()

        async def calls(n: int) -> list[object]:
            return [await who() for _ in range(n)]

        async def set_watched(i: int, status: int) -> None:
            await healths[i].set(watched, status)
            await asyncio.sleep(0.3)  # the channel's health watch sees it

        out = {"both": await calls(8)}
        await set_watched(0, not_serving)
        out["one_away"] = await calls(8)
        await set_watched(0, serving)
        out["back"] = await calls(8)
        await set_watched(1, not_serving)
        await set_watched(0, not_serving)
        out["none"] = await calls(2)
        await channel.close()
        for server in servers:
            await server.stop(None)
        return out

    out = asyncio.run(run())
    assert set(out["both"]) == {0, 1}
    assert out["one_away"] == [1] * 8
    assert set(out["back"]) == {0, 1}
    assert out["none"] == [grpc.StatusCode.UNAVAILABLE] * 2


def test_balanced_options_name_round_robin_and_the_watched_service():
    import json

    ((name, value),) = balanced_options("rlhf.v1.InferenceService")
    config = json.loads(value)
    assert name == "grpc.service_config"
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "rlhf.v1.InferenceService"}


def test_a_token_goes_in_plaintext_to_loopback_only():
    check_transport("127.0.0.1:1", ClientCredentials(token=TOKEN))
    check_transport("localhost:1", ClientCredentials(token=TOKEN))
    check_transport("[::1]:1", ClientCredentials(token=TOKEN))
    check_transport("rlhf-inference:50051", ClientCredentials())  # no token, nothing to leak
    check_transport("rlhf-inference:50051", ClientCredentials(token=TOKEN, allow_plaintext=True))
    with pytest.raises(ConfigError, match="RLHF_AUTH_TLS_CA_FILE"):
        check_transport("rlhf-inference:50051", ClientCredentials(token=TOKEN))
    with pytest.raises(ConfigError, match="RLHF_OPERATOR_TLS_CA_FILE"):
        sync_channel("10.1.2.3:50054", ClientCredentials(token=TOKEN, prefix="RLHF_OPERATOR_"))


def test_credentials_of_a_service_and_of_the_operator(tmp_path):
    auth = ServiceAuthConfig(token=TOKEN, tls_ca_file=tmp_path / "ca.crt", tls_server_name="x")
    creds = ClientCredentials.of_service(auth)
    assert (creds.token, creds.ca_file, creds.server_name, creds.cert_file) == (TOKEN, tmp_path / "ca.crt", "x", None)
    assert creds.without_token().token == "" and creds.without_token().ca_file == creds.ca_file
    token_file = tmp_path / "operator-token"
    token_file.write_text(TOKEN + "\n")
    op = load_config(OperatorConfig, {"RLHF_OPERATOR_TOKEN_FILE": str(token_file)})
    assert ClientCredentials.of_operator(op).token == TOKEN
    assert (
        ClientCredentials.of_operator(
            load_config(OperatorConfig, {"RLHF_OPERATOR_TOKEN_FILE": str(tmp_path / "no")})
        ).token
        == ""
    )
    assert ClientCredentials.of_operator(op).prefix == "RLHF_OPERATOR_"


def test_an_unreadable_ca_is_reported_with_its_variable(tmp_path):
    with pytest.raises(ConfigError, match="RLHF_AUTH_TLS_CA_FILE"):
        sync_channel("127.0.0.1:1", ClientCredentials(token=TOKEN, ca_file=tmp_path / "missing.crt"))


def test_an_aio_channel_sends_the_token_on_unary_and_streaming_calls():
    """grpc.aio files each interceptor under one call shape only: the token must still reach the
    server on a unary-stream call (the gateway's GenerateStream) as on a unary one."""
    import asyncio

    import grpc

    from shared.grpc_channels import aio_channel

    def metadata_of(context) -> str:
        return dict(context.invocation_metadata()).get("authorization", "")

    async def unary(request: bytes, context) -> bytes:
        return metadata_of(context).encode()

    async def stream(request: bytes, context):
        yield metadata_of(context).encode()

    async def run() -> tuple[bytes, list[bytes]]:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(unary),
                "Stream": grpc.unary_stream_rpc_method_handler(stream),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            channel = aio_channel(f"127.0.0.1:{port}", ClientCredentials(token=TOKEN))
            one = await channel.unary_unary("/test.Echo/Unary")(b"")
            many = [m async for m in channel.unary_stream("/test.Echo/Stream")(b"")]
            await channel.close()
            return one, many
        finally:
            await server.stop(None)

    one, many = asyncio.run(run())
    assert one == many[0] == f"Bearer {TOKEN}".encode()
