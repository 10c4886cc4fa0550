"""What the gateway sends on and signs for a chat completion: the authenticated principal and the
conversation go to the inference service and into every response's feedback token."""

from __future__ import annotations

import time

from services.gateway.chat.schema import ChatCompletionRequest
from services.gateway.chat.serving import FeedbackTokens, to_generate_request
from shared.config import FeedbackTokenConfig
from shared.feedback_token import verify

SECRET = "s" * 32


def request(**over) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **over)


def test_the_generate_request_carries_the_principal_and_conversation_not_the_user_label():
    msg = to_generate_request(request(user="mallory", conversation_id="conv-1"), "alice")
    assert (msg.principal, msg.conversation_id, msg.source) == ("alice", "conv-1", "user")
    assert to_generate_request(request(), "alice").conversation_id == ""


def test_each_feedback_token_is_issued_to_the_principal_served():
    signer = FeedbackTokens(FeedbackTokenConfig(secret=SECRET)).for_request(request(conversation_id="c1"), "alice")
    token = signer("resp-1", "policy-0001")
    assert token is not None
    claims = verify(SECRET, token)
    assert (claims.response_id, claims.principal, claims.conversation_id) == ("resp-1", "alice", "c1")
    assert claims.expires_at > time.time()
    assert FeedbackTokens(FeedbackTokenConfig()).for_request(request(), "alice")("r", "p") is None  # feedback off
