"""The Kafka security settings reach both clients under each client's own names, and each client
accepts them (kafka-python's known configs; librdkafka validates a Producer's config when built)."""

from __future__ import annotations

from pathlib import Path

import confluent_kafka
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from shared.config import KafkaConfig
from shared.kafka.client import (
    client_kwargs,
    consumer_kwargs,
    producer_kwargs,
    rdkafka_consumer_config,
    rdkafka_producer_config,
)


def sasl_ssl(tmp_path: Path) -> KafkaConfig:
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    return KafkaConfig(
        bootstrap_servers="kafka:9093",
        security_protocol="SASL_SSL",
        sasl_username="rlhf-feedback",
        sasl_password_file=password,
        ssl_ca_file=tmp_path / "ca.crt",
    )


def test_plaintext_adds_only_the_protocol():
    cfg = KafkaConfig(bootstrap_servers="127.0.0.1:9092")
    kw = producer_kwargs(cfg, "t")
    assert kw["security_protocol"] == "PLAINTEXT"
    assert not {k for k in kw if k.startswith(("ssl_", "sasl_"))}
    rd = rdkafka_producer_config(cfg, "t")
    assert rd["security.protocol"] == "plaintext" and not {k for k in rd if k.startswith(("ssl.", "sasl."))}


def test_sasl_ssl_maps_to_both_clients(tmp_path):
    cfg = sasl_ssl(tmp_path)
    for kw in (producer_kwargs(cfg, "t"), consumer_kwargs(cfg, "t", "g"), client_kwargs(cfg, "admin")):
        assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
        assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("rlhf-feedback", "s3cret")
        assert kw["ssl_cafile"] == str(tmp_path / "ca.crt") and kw["ssl_check_hostname"] is True
    for rd in (rdkafka_producer_config(cfg, "t"), rdkafka_consumer_config(cfg, "t")):
        assert rd["security.protocol"] == "sasl_ssl" and rd["sasl.mechanisms"] == "SCRAM-SHA-512"
        assert (rd["sasl.username"], rd["sasl.password"]) == ("rlhf-feedback", "s3cret")
        assert rd["ssl.ca.location"] == str(tmp_path / "ca.crt")
        assert rd["ssl.endpoint.identification.algorithm"] == "https"


def test_client_certificates_and_hostname_checking(tmp_path):
    cfg = KafkaConfig(
        bootstrap_servers="kafka:9093",
        security_protocol="SSL",
        ssl_cert_file=tmp_path / "user.crt",
        ssl_key_file=tmp_path / "user.key",
        ssl_check_hostname=False,
    )
    kw = producer_kwargs(cfg, "t")
    assert (kw["ssl_certfile"], kw["ssl_keyfile"]) == (str(tmp_path / "user.crt"), str(tmp_path / "user.key"))
    assert kw["ssl_check_hostname"] is False and "ssl_cafile" not in kw and "sasl_mechanism" not in kw
    rd = rdkafka_producer_config(cfg, "t")
    assert rd["ssl.certificate.location"] == str(tmp_path / "user.crt")
    assert rd["ssl.endpoint.identification.algorithm"] == "none"


def test_every_setting_is_one_the_clients_know(tmp_path):
    cfg = sasl_ssl(tmp_path)
    known = set(KafkaProducer.DEFAULT_CONFIG) | {"bootstrap_timeout_ms"}
    assert set(producer_kwargs(cfg, "t")) <= known
    assert set(consumer_kwargs(cfg, "t", "g")) <= set(KafkaConsumer.DEFAULT_CONFIG) | {"bootstrap_timeout_ms"}
    assert set(client_kwargs(cfg, "admin")) <= set(KafkaAdminClient.DEFAULT_CONFIG) | {"bootstrap_timeout_ms"}
    # librdkafka rejects an unknown property or a bad value when the client is built (nothing connects
    # yet); it reads the CA file then too.
    from tests.conftest import issue_test_pki

    pki = issue_test_pki(tmp_path / "pki")
    (tmp_path / "ca.crt").write_bytes(pki.ca.read_bytes())
    confluent_kafka.Producer(rdkafka_producer_config(cfg, "t")).flush(0)
    confluent_kafka.Consumer(rdkafka_consumer_config(cfg, "t")).close()
