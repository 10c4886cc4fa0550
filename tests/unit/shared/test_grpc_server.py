"""The gRPC server's caller authentication, over real servers on loopback: the rules as pure
functions, then the trainer's control RPCs served by the real TrainerServicer behind the real
GrpcServer, in plaintext and over TLS with a throwaway CA."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.inference.access import INFERENCE_ACCESS
from services.trainer.access import TRAINER_ACCESS
from services.trainer.loop import GateResult, StatusSnapshot
from services.trainer.servicer import TrainerServicer
from shared.config import ConfigError, ServiceAuthConfig, credential_entry, token_digest
from shared.grpc_channels import ClientCredentials, sync_channel
from shared.grpc_server import CALLS_REFUSED, OPEN_METHODS, GrpcServer, RpcAccess, bearer_token, refusal
from shared.pb import trainer_pb2, trainer_pb2_grpc
from tests.conftest import TEST_CALLER_TOKENS, LoopThread, issue_test_pki, test_auth

ROLLBACK = "/rlhf.v1.TrainerService/Rollback"
STATUS = "/rlhf.v1.TrainerService/Status"


# --- the rules --------------------------------------------------------------------------------------


def test_bearer_token_is_read_from_the_authorization_metadata():
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("x", "y"), ("authorization", "bearer  abc "))) == "abc"  # scheme case-insensitive
    assert bearer_token(None) is None and bearer_token(()) is None
    assert bearer_token((("authorization", "Basic abc"),)) is None
    assert bearer_token((("authorization", "Bearer "),)) is None
    assert bearer_token((("authorization", b"Bearer abc"),)) is None  # binary values are not tokens


def test_refusal_rule():
    accepted = {token_digest("op-token"): "operator", token_digest("gw-token"): "gateway"}
    allowed = TRAINER_ACCESS.methods()
    assert refusal(ROLLBACK, None, accepted, allowed) == ("missing_credential", "")
    assert refusal(ROLLBACK, "who-knows", accepted, allowed) == ("unknown_credential", "")
    assert refusal(ROLLBACK, "gw-token", accepted, allowed) == ("not_allowed", "gateway")
    assert refusal(ROLLBACK, "op-token", accepted, allowed) is None
    assert refusal("/rlhf.v1.TrainerService/NewRpc", "op-token", accepted, allowed) == ("not_allowed", "operator")
    for method in OPEN_METHODS:
        assert refusal(method, None, accepted, allowed) is None


def test_rpc_access_names_full_methods():
    access = RpcAccess("rlhf.v1.X", {"A": frozenset({"operator"})})
    assert access.methods() == {"/rlhf.v1.X/A": frozenset({"operator"})}
    assert INFERENCE_ACCESS.methods()["/rlhf.v1.InferenceService/Generate"] == {"gateway", "trainer"}


# --- a real server ------------------------------------------------------------------------------------


class ControlLoop:
    """The slice of TrainingLoop the control RPCs call; records what was asked."""

    def __init__(self) -> None:
        self.rollbacks: list[str] = []
        self.paused = False

    def rollback(self, version: str) -> GateResult:
        self.rollbacks.append(version)
        return GateResult(published=True, reason="rollback", step=3, version=version)

    def pause(self) -> None:
        self.paused = True

    def status(self) -> StatusSnapshot:
        return StatusSnapshot(
            step=3,
            paused=self.paused,
            state="paused" if self.paused else "training",
            detail="",
            base_policy_version="policy-0002",
            reference_policy_version="policy-0001",
            last_published=None,
            mean_reward=0.0,
            kl=0.0,
            entropy=0.0,
            rm_version="rm-0001",
            checkpoint_step=3,
            live_prompts=0,
            dropped_rollouts={},
            last_gate=None,
            baseline_reward=None,
        )


@dataclasses.dataclass
class Served:
    server: GrpcServer
    loop: ControlLoop
    address: str
    loop_thread: LoopThread


@pytest.fixture()
def serve():
    """Start a TrainerService (real servicer, real GrpcServer) with a given auth section."""
    thread = LoopThread()
    servers: list[GrpcServer] = []

    def start(auth: ServiceAuthConfig, health_port: int = 0) -> Served:
        loop = ControlLoop()

        async def make() -> GrpcServer:
            server = GrpcServer(
                "TrainerService", "127.0.0.1", 0, auth=auth, access=[TRAINER_ACCESS], health_port=health_port
            )
            trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(lambda: loop), server.server)
            await server.start()
            await server.set_serving()
            return server

        server = thread.run(make(), timeout=30)
        servers.append(server)
        return Served(server, loop, server.address, thread)

    yield start
    for server in servers:
        thread.run(server.stop(), timeout=30)
    thread.close()


def rollback(address: str, creds: ClientCredentials, version: str = "policy-0001") -> trainer_pb2.PublishResult:
    with sync_channel(address, creds) as channel:
        return trainer_pb2_grpc.TrainerServiceStub(channel).Rollback(
            trainer_pb2.RollbackRequest(policy_version=version), timeout=10
        )


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def refused(reason: str) -> float:
    return CALLS_REFUSED.labels("TrainerService", reason)._value.get()


def as_caller(caller: str, **tls) -> ClientCredentials:
    return ClientCredentials(token=TEST_CALLER_TOKENS[caller], **tls)


def test_rollback_needs_the_operator(serve):
    svc = serve(test_auth())
    before = {r: refused(r) for r in ("missing_credential", "unknown_credential", "not_allowed")}
    assert code_of(lambda: rollback(svc.address, ClientCredentials())) == grpc.StatusCode.UNAUTHENTICATED
    unknown = ClientCredentials(token="an-unknown-token-0123456789abcdef")
    assert code_of(lambda: rollback(svc.address, unknown)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: rollback(svc.address, as_caller("gateway"))) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: rollback(svc.address, as_caller("trainer"))) == grpc.StatusCode.PERMISSION_DENIED
    assert svc.loop.rollbacks == [], "a refused call must never reach the trainer"
    reply = rollback(svc.address, as_caller("operator"), "policy-0001")
    assert reply.published and reply.version.version == "policy-0001" and svc.loop.rollbacks == ["policy-0001"]
    assert refused("missing_credential") == before["missing_credential"] + 1
    assert refused("unknown_credential") == before["unknown_credential"] + 1
    assert refused("not_allowed") == before["not_allowed"] + 2


def test_monitoring_reads_status_but_cannot_pause(serve):
    svc = serve(test_auth())
    with sync_channel(svc.address, as_caller("monitoring")) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        assert stub.Status(trainer_pb2.StatusRequest(), timeout=10).base_policy_version == "policy-0002"
        assert code_of(lambda: stub.Pause(trainer_pb2.PauseRequest(), timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
    assert not svc.loop.paused


def test_health_stays_open_and_a_server_accepting_nobody_refuses_everything_else(serve):
    svc = serve(ServiceAuthConfig())
    with sync_channel(svc.address, ClientCredentials()) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert code_of(lambda: rollback(svc.address, as_caller("operator"))) == grpc.StatusCode.UNAUTHENTICATED


def test_health_watch_streams_status_changes_through_the_interceptors(serve):
    """grpc.health.v1 Watch (what health-checking clients and load balancers use) writes with
    context.write instead of yielding: the error-mapping interceptor must pass it through."""
    svc = serve(ServiceAuthConfig())
    with sync_channel(svc.address, ClientCredentials()) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        asyncio.run_coroutine_threadsafe(
            svc.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING), svc.loop_thread.loop
        ).result(10)
        assert next(stream).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stream.cancel()


def test_a_rotated_credential_keeps_its_name(serve):
    """Two accepted tokens under one name (the old and the new during a rotation) both work."""
    new = "operator-new-token-0123456789abcdef"
    svc = serve(test_auth(accept=(*test_auth().accept, credential_entry("operator", new))))
    assert rollback(svc.address, as_caller("operator")).published
    assert rollback(svc.address, ClientCredentials(token=new)).published


def test_tls_with_the_right_ca_works_and_with_a_wrong_ca_fails(serve, tmp_path):
    pki = issue_test_pki(tmp_path / "pki")
    svc = serve(test_auth(tls_cert_file=pki.cert, tls_key_file=pki.key, tls_ca_file=pki.ca))
    assert svc.server.tls
    assert rollback(svc.address, as_caller("operator", ca_file=pki.ca)).published
    # The name checked can be another than the address's host (here: localhost, reached at 127.0.0.1).
    assert rollback(svc.address, as_caller("operator", ca_file=pki.ca, server_name="localhost")).published
    wrong_ca = as_caller("operator", ca_file=pki.other_ca)
    assert code_of(lambda: rollback(svc.address, wrong_ca)) == grpc.StatusCode.UNAVAILABLE
    wrong_name = as_caller("operator", ca_file=pki.ca, server_name="someone-else")
    assert code_of(lambda: rollback(svc.address, wrong_name)) == grpc.StatusCode.UNAVAILABLE
    plaintext = as_caller("operator")
    assert code_of(lambda: rollback(svc.address, plaintext)) == grpc.StatusCode.UNAVAILABLE
    assert len(svc.loop.rollbacks) == 2
    # TLS does not replace the credential: no token over TLS is still unauthenticated.
    no_token = ClientCredentials(ca_file=pki.ca)
    assert code_of(lambda: rollback(svc.address, no_token)) == grpc.StatusCode.UNAUTHENTICATED


def test_mutual_tls_requires_a_client_certificate(serve, tmp_path):
    pki = issue_test_pki(tmp_path / "pki")
    auth = test_auth(tls_cert_file=pki.cert, tls_key_file=pki.key, tls_ca_file=pki.ca, tls_client_auth=True)
    svc = serve(auth)
    with_cert = as_caller("operator", ca_file=pki.ca, cert_file=pki.cert, key_file=pki.key)
    assert rollback(svc.address, with_cert).published
    without_cert = as_caller("operator", ca_file=pki.ca)
    assert code_of(lambda: rollback(svc.address, without_cert)) == grpc.StatusCode.UNAVAILABLE
    # A service's own client side presents its certificate when mutual TLS is on.
    assert ClientCredentials.of_service(auth).cert_file == pki.cert


def test_plaintext_health_port_beside_a_tls_server(serve, tmp_path):
    """Kubernetes' grpc probes cannot speak TLS: the health-only port answers them, and nothing else."""
    from shared.kafka.embedded import free_port

    pki = issue_test_pki(tmp_path / "pki")
    port = free_port()
    svc = serve(test_auth(tls_cert_file=pki.cert, tls_key_file=pki.key), health_port=port)
    with sync_channel(f"127.0.0.1:{port}", ClientCredentials()) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="rlhf.v1.TrainerService"), timeout=10
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    # The control RPCs are not served there, even to the operator.
    code = code_of(lambda: rollback(f"127.0.0.1:{port}", as_caller("operator")))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert svc.loop.rollbacks == []


def test_bad_tls_files_are_reported_with_their_variable(tmp_path):
    not_pem = tmp_path / "tls.crt"
    not_pem.write_text("hello")
    auth = test_auth(tls_cert_file=not_pem, tls_key_file=tmp_path / "missing.key")
    thread = LoopThread()
    try:

        async def make() -> GrpcServer:
            return GrpcServer("TrainerService", "127.0.0.1", 0, auth=auth, access=[TRAINER_ACCESS])

        with pytest.raises(ConfigError, match="RLHF_AUTH_TLS_KEY_FILE"):
            thread.run(make(), timeout=30)
    finally:
        thread.close()


def test_refusal_log_memory_is_bounded_whatever_methods_callers_invent():
    from shared.grpc_server import AuthInterceptor

    interceptor = AuthInterceptor("TrainerService", {}, [TRAINER_ACCESS])
    for n in range(1000):
        interceptor._log(f"/made.up/Method{n}", "missing_credential", "")
    interceptor._log(ROLLBACK, "missing_credential", "")
    assert set(interceptor._logged) == {("<unknown>", "missing_credential", ""), (ROLLBACK, "missing_credential", "")}


# --- bounds --------------------------------------------------------------------------------------------


def test_calls_beyond_the_bound_are_refused_with_resource_exhausted_and_in_flight_is_counted():
    """Two long-lived health watches fill a server bounded at 2 calls: a third call is refused at
    once (RESOURCE_EXHAUSTED, not queued); once a watch ends, calls are served again."""
    from shared.grpc_server import IN_FLIGHT, MAX_CONCURRENT

    thread = LoopThread()

    async def make() -> GrpcServer:
        server = GrpcServer(
            "BoundedService", "127.0.0.1", 0, auth=test_auth(), access=[TRAINER_ACCESS], max_concurrent_rpcs=2
        )
        await server.start()
        await server.set_serving()
        return server

    server = thread.run(make(), timeout=30)
    try:
        assert MAX_CONCURRENT.labels("BoundedService")._value.get() == 2
        channel = grpc.insecure_channel(server.address)
        stub = health_pb2_grpc.HealthStub(channel)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(2)]
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # both are running
        assert IN_FLIGHT.labels("BoundedService")._value.get() == 2
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        watches[0].cancel()
        reply = None
        for _ in range(50):  # the server frees the slot when it sees the cancellation
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                break
            except grpc.RpcError:
                thread.run(asyncio.sleep(0.1))
        assert reply is not None and reply.status == health_pb2.HealthCheckResponse.SERVING
        watches[1].cancel()
        channel.close()
    finally:
        thread.run(server.stop(), timeout=30)
        thread.close()


def test_server_options_bound_messages_and_metadata_not_streams_per_connection():
    from shared.grpc_server import server_options

    opts = dict(server_options(4))
    assert opts["grpc.max_receive_message_length"] == opts["grpc.max_send_message_length"] == 4 << 20
    assert opts["grpc.max_metadata_size"] == 8 << 10
    assert "grpc.max_concurrent_streams" not in opts  # calls past the bound are refused, not queued
