"""Kafka TLS and SASL settings (RLHF_KAFKA_SECURITY_PROTOCOL and friends) through both clients,
kafka-python and confluent-kafka, against the embedded broker.

TLS: tansu 0.6.0 cannot serve TLS itself (its CLI refuses --cert together with --key), so it runs
behind a TLS-terminating proxy that it advertises as its address: every client connection, the
bootstrap and the ones metadata points to, is TLS with the test CA's certificate. A client with the
right CA produces and consumes; one trusting another CA is refused.

SASL: tansu with --authentication refuses every client that does not authenticate, and one whose
SCRAM credentials it does not know. It creates users only over an authenticated connection and
keeps them in memory, so no user can exist on it: a successful SCRAM login is left to a real Kafka
(docs/security.md, "What only a real cluster can verify").
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from pathlib import Path

import confluent_kafka
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError

from shared.config import KafkaConfig
from shared.kafka.client import (
    client_kwargs,
    consumer_kwargs,
    producer_kwargs,
    rdkafka_consumer_config,
    rdkafka_producer_config,
)
from shared.kafka.embedded import EmbeddedBroker, free_port
from tests.conftest import issue_test_pki

pytestmark = pytest.mark.integration

TOPIC = "rlhf.security-test"


class TlsProxy:
    """Terminates TLS on a loopback port and relays the bytes to a plaintext upstream port."""

    def __init__(self, upstream_port: int, cert: Path, key: Path):
        self.port = free_port()
        self.upstream_port = upstream_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)

    async def _serve(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._relay, "127.0.0.1", self.port, ssl=self.context)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    pki = issue_test_pki(tmp_path_factory.mktemp("kafka-pki"))
    broker_port = free_port()
    proxy = TlsProxy(broker_port, pki.cert, pki.key)
    broker = EmbeddedBroker(port=broker_port, advertised=f"127.0.0.1:{proxy.port}").start()
    yield pki, f"127.0.0.1:{proxy.port}"
    broker.stop()
    proxy.close()


def tls_config(servers: str, ca: Path) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=servers,
        security_protocol="SSL",
        ssl_ca_file=ca,
        request_timeout_ms=3000,
        delivery_timeout_s=5.0,
    )


def read_all(cfg: KafkaConfig, want: int, timeout_s: float = 20.0) -> list[bytes]:
    consumer = KafkaConsumer(**consumer_kwargs(cfg, "test", group_id=None))
    try:
        part = TopicPartition(TOPIC, 0)
        consumer.assign([part])
        consumer.seek_to_beginning(part)
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while len(values) < want and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                values += [r.value for r in records]
        return values
    finally:
        consumer.close()


def rd_read_all(cfg: KafkaConfig, want: int, timeout_s: float = 20.0) -> list[bytes]:
    consumer = confluent_kafka.Consumer(rdkafka_consumer_config(cfg, "test"))
    try:
        consumer.assign([confluent_kafka.TopicPartition(TOPIC, 0, confluent_kafka.OFFSET_BEGINNING)])
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while len(values) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.3)
            if msg is not None and not msg.error():
                values.append(msg.value())
        return values
    finally:
        consumer.close()


def test_both_clients_produce_and_consume_over_tls_with_the_right_ca(tls_broker):
    pki, servers = tls_broker
    cfg = tls_config(servers, pki.ca)
    admin = KafkaAdminClient(**client_kwargs(cfg, "admin"))
    try:
        admin.create_topics([NewTopic(TOPIC, 1, 1)])
    finally:
        admin.close()

    producer = KafkaProducer(**producer_kwargs(cfg, "test"))
    producer.send(TOPIC, b"from kafka-python").get(10)
    producer.close()
    rd = confluent_kafka.Producer(rdkafka_producer_config(cfg, "test"))
    failures: list[object] = []
    rd.produce(TOPIC, b"from librdkafka", on_delivery=lambda err, msg: err and failures.append(err))
    assert rd.flush(15) == 0 and not failures

    assert sorted(read_all(cfg, 2)) == [b"from kafka-python", b"from librdkafka"]
    assert sorted(rd_read_all(cfg, 2)) == [b"from kafka-python", b"from librdkafka"]


def test_a_client_trusting_another_ca_is_refused(tls_broker):
    pki, servers = tls_broker
    cfg = tls_config(servers, pki.other_ca)
    with pytest.raises(KafkaError):
        KafkaProducer(**producer_kwargs(cfg, "test"))
    rd = confluent_kafka.Producer({**rdkafka_producer_config(cfg, "test"), "message.timeout.ms": 3000})
    failures: list[object] = []
    rd.produce(TOPIC, b"never", on_delivery=lambda err, msg: err and failures.append(err))
    rd.flush(10)
    assert failures, "a record went out over TLS to a broker whose certificate is not trusted"


def test_a_plaintext_client_is_refused_by_a_tls_listener(tls_broker):
    _, servers = tls_broker
    cfg = KafkaConfig(bootstrap_servers=servers, request_timeout_ms=2000)
    with pytest.raises(KafkaError):
        KafkaProducer(**producer_kwargs(cfg, "test"))


@pytest.fixture(scope="module")
def authenticating_broker():
    broker = EmbeddedBroker(authentication=True).start()
    yield broker.bootstrap_servers
    broker.stop()


def test_an_authenticating_broker_refuses_clients_without_known_credentials(authenticating_broker, tmp_path):
    password = tmp_path / "password"
    password.write_text("not-the-password\n")
    for cfg in (
        KafkaConfig(bootstrap_servers=authenticating_broker, request_timeout_ms=2000),
        KafkaConfig(
            bootstrap_servers=authenticating_broker,
            request_timeout_ms=2000,
            delivery_timeout_s=3.0,
            security_protocol="SASL_PLAINTEXT",
            sasl_username="rlhf-feedback",
            sasl_password_file=password,
        ),
    ):
        with pytest.raises(KafkaError):
            KafkaProducer(**producer_kwargs(cfg, "test"))
        rd = confluent_kafka.Producer({**rdkafka_producer_config(cfg, "test"), "message.timeout.ms": 3000})
        failures: list[object] = []
        rd.produce(TOPIC, b"never", on_delivery=lambda err, msg, f=failures: err and f.append(err))
        rd.flush(10)
        assert failures, f"{cfg.security_protocol}: a record was accepted without known credentials"
