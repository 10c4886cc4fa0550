"""The channel factory's rules: which host a target names, and never a token in plaintext off loopback."""

from __future__ import annotations

import pytest

from shared.config import ConfigError, OperatorConfig, ServiceAuthConfig, load_config
from shared.grpc_channels import ClientCredentials, check_transport, sync_channel, target_host


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


TOKEN = "a-token-of-enough-characters-0123"


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
