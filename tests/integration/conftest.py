"""The running loop that most integration tests share: one embedded broker, one vLLM engine, the
feedback service and the gateway, all real, on loopback; started once per test session."""

from __future__ import annotations

import dataclasses

import openai
import pytest

from tests.conftest import (
    TEST_API_KEYS,
    LoopThread,
    UvicornThread,
    gateway_config,
    start_feedback,
    start_inference,
)

MODEL = "rlhf-policy"


@dataclasses.dataclass
class Stack:
    inference: object
    feedback: object
    gateway: UvicornThread
    loop: LoopThread
    store: object
    kafka: object

    @property
    def url(self) -> str:
        return self.gateway.url

    def client(self, principal: str = "alice") -> openai.OpenAI:
        """An OpenAI client authenticated as a test principal (its key from TEST_API_KEYS)."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key=TEST_API_KEYS[principal], max_retries=0)

    def headers(self, principal: str = "alice") -> dict[str, str]:
        """The Authorization header of a test principal, for plain HTTP clients."""
        return {"Authorization": f"Bearer {TEST_API_KEYS[principal]}"}


@pytest.fixture(scope="session")
def stack(broker, policy_store):
    from services.gateway.app import create_app

    loop = LoopThread()
    inference = start_inference(loop, broker.kafka, policy_store.root)
    feedback = start_feedback(loop, broker.kafka)
    gateway = UvicornThread(create_app(gateway_config(inference.address, feedback.address, max_body_bytes=64 * 1024)))
    yield Stack(inference, feedback, gateway, loop, policy_store, broker.kafka)
    gateway.stop()
    loop.run(feedback.stop())
    loop.run(inference.stop())
    loop.close()
