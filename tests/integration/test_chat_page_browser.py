"""The chat page (services/gateway/static/chat.html) in a real headless Chromium against the real
stack: the page logs in once with an API key (the gateway of the `stack` fixture has keys on) and
then authenticates by its session cookie; ratings clicked in the page must arrive on rlhf.feedback
as the page showed them, under the logged-in principal; refusals by the API must show up as
messages, not break the page. With anonymous mode on, the page gets a principal of its own at once.
Nothing is faked or intercepted: every request goes to the gateway, the vLLM engine and the
feedback service of the `stack` fixture."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator

import httpx
import pytest

from services.gateway.app import create_app
from shared.events import CompletionEvent, FeedbackEvent, Message, RejectedFeedbackEvent
from shared.feedback_token import prompt_hash
from shared.kafka.topics import COMPLETIONS, FEEDBACK, FEEDBACK_DLQ
from tests.conftest import TEST_API_KEYS, UvicornThread, consume_events, gateway_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("the playwright Python package is not installed", allow_module_level=True)

CHROMIUM = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
if not CHROMIUM:  # pragma: no cover - depends on the environment
    pytest.skip("no Chromium browser: neither /usr/bin/chromium nor `chromium` on PATH", allow_module_level=True)

# Without the background-networking flags Chromium keeps calling home, which a closed network punishes.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 30_000
"""Upper bound of any wait on the page; answers normally take well under a second."""
UNAUTHENTICATED = re.compile(r"^Failed to load resource: the server responded with a status of 401\b")
REFUSED = re.compile(r"^Failed to load resource: the server responded with a status of 40[0-3]\b")
"""What Chromium itself logs to the console for an HTTP 400, 401 or 403 reply, which the refusal
and login tests provoke."""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    expect.set_options(timeout=WAIT_MS)  # the default 5 s is tight for a first answer on a busy 2-core machine
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class ChatPage:
    """One tab on the chat page, recording console errors, page errors and the chat requests sent."""

    def __init__(self, context: BrowserContext, url: str, principal: str | None):
        self.url = url
        self.page: Page = context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.chat_requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.page.on(
            "request",
            lambda r: self.chat_requests.append(r.post_data or "") if r.url.endswith("/v1/chat/completions") else None,
        )
        self.page.goto(url + "/")
        if principal is None:  # not logged in: the login form (keys on) or an anonymous session
            expect(self.page.locator("#status")).to_contain_text(re.compile("serving|log in"))
            return
        self.log_in(TEST_API_KEYS[principal])
        expect(self.by("principal")).to_have_text(principal)
        expect(self.page.locator("#status")).to_contain_text("serving")
        # The page's first "who am I" before the login was answered 401, as it should be; Chromium
        # logs every 4xx reply to the console.
        self.errors = [e for e in self.errors if not UNAUTHENTICATED.search(e)]

    def log_in(self, key: str) -> None:
        expect(self.by("login-form")).to_be_visible()
        self.by("api-key").fill(key)
        self.by("log-in").click()

    def by(self, testid: str):
        return self.page.get_by_test_id(testid)

    def send(self, text: str) -> None:
        self.by("input").fill(text)
        self.by("send").click()

    @property
    def principal(self) -> str:
        shown = self.by("principal").text_content()
        assert shown, "no principal shown"
        return shown

    def assert_no_errors(self, allowed: re.Pattern | None = None) -> None:
        unexpected = [e for e in self.errors if not (allowed and allowed.search(e))]
        assert not unexpected, f"errors in the browser console: {unexpected}"


@pytest.fixture
def open_chat(browser, stack) -> Iterator[Callable[..., ChatPage]]:
    """Opens the chat page in a fresh browser context (no cookies: a new session), logged in as
    ``principal`` with its key (None: not logged in, e.g. on an anonymous gateway at ``url``)."""
    contexts = []

    def open_(principal: str | None = "alice", url: str | None = None, **context_args) -> ChatPage:
        context = browser.new_context(viewport={"width": 1000, "height": 900}, **context_args)
        contexts.append(context)
        return ChatPage(context, url or stack.url, principal)

    yield open_
    for context in contexts:
        context.close()


def feedback_events(stack, want: Callable[[FeedbackEvent], bool], count: int) -> list[FeedbackEvent]:
    envelopes = consume_events(
        stack.kafka, FEEDBACK, lambda e: isinstance(e.payload, FeedbackEvent) and want(e.payload), count
    )
    assert len(envelopes) == count, f"expected {count} feedback events on {FEEDBACK}, found {len(envelopes)}"
    return sorted((e.payload for e in envelopes), key=lambda ev: ev.revision)


def completion_of(stack, response_id: str) -> CompletionEvent:
    [env] = consume_events(
        stack.kafka,
        COMPLETIONS,
        lambda e: isinstance(e.payload, CompletionEvent) and e.payload.response_id == response_id,
        1,
    )
    return env.payload


def test_thumbs_reach_kafka_and_a_changed_vote_supersedes_the_first(stack, open_chat):
    chat = open_chat()
    question = "What is the capital of France?"
    chat.send(question)
    answer = chat.by("answer")
    expect(answer).to_have_count(1)
    rid, shown_version = answer.get_attribute("data-response-id"), answer.get_attribute("data-policy-version")
    assert rid.startswith("resp-")
    expect(chat.page.locator(".turn.assistant .meta").first).to_have_text(shown_version)
    assert shown_version in (stack.store.first, stack.store.second)
    user = chat.principal
    assert user == "alice"

    up, down, status = chat.by("thumb-up"), chat.by("thumb-down"), chat.by("rating-status")
    expect(up).to_have_attribute("aria-label", "Good answer")
    up.click()
    expect(status).to_have_attribute("data-state", "saved")
    expect(status).to_have_text("saved")
    expect(status).to_have_attribute("data-revision", "1")
    expect(up).to_have_attribute("aria-pressed", "true")
    expect(down).to_have_attribute("aria-pressed", "false")

    mine = lambda ev: ev.kind == "thumb" and ev.user_id == user and ev.responses[0].response_id == rid
    [first] = feedback_events(stack, mine, 1)
    assert (first.thumb, first.revision, first.supersedes) == ("up", 1, None)
    assert [r.response_id for r in first.responses] == [rid]
    assert first.responses[0].policy_version == shown_version  # from the signed token, not from the page
    assert first.responses[0].prompt_hash == prompt_hash([("user", question)])

    down.click()  # a change of mind: a new revision superseding the first vote
    expect(status).to_have_attribute("data-revision", "2")
    expect(status).to_have_attribute("data-state", "saved")
    expect(down).to_have_attribute("aria-pressed", "true")
    expect(up).to_have_attribute("aria-pressed", "false")
    again, second = feedback_events(stack, mine, 2)
    assert again == first
    assert (second.thumb, second.revision, second.supersedes) == ("down", 2, first.feedback_id)
    assert second.responses == first.responses

    chat.page.reload()  # the session outlives the page: no login form again
    expect(chat.by("principal")).to_have_text(user)
    expect(chat.by("login-form")).to_be_hidden()
    chat.assert_no_errors()


def test_compare_two_answers_and_the_preferred_one_continues(stack, open_chat, tmp_path):
    chat = open_chat()
    chat.by("compare-toggle").check()
    question = "Name a colour of the sky."
    chat.send(question)
    answers = chat.by("answer")
    expect(answers).to_have_count(2)
    rid_a, rid_b = (answers.nth(i).get_attribute("data-response-id") for i in range(2))
    assert rid_a != rid_b
    text_b = answers.nth(1).text_content()

    # Before a pick the conversation cannot go on: nothing is sent.
    chat.send("And at night?")
    expect(chat.page.locator("#hint")).to_contain_text("Pick A, B or Tie")
    assert len(chat.chat_requests) == 1

    chat.by("choose-b").click()
    status = chat.by("rating-status")
    expect(status).to_have_attribute("data-state", "saved")
    expect(chat.by("choose-b")).to_have_attribute("aria-pressed", "true")
    expect(chat.by("choose-a")).to_have_attribute("aria-pressed", "false")
    expect(chat.by("choose-tie")).to_have_attribute("aria-pressed", "false")
    expect(chat.page.locator(".option.chosen [data-testid=answer]")).to_have_attribute("data-response-id", rid_b)
    expect(chat.page.locator(".option.discarded [data-testid=answer]")).to_have_attribute("data-response-id", rid_a)

    user = chat.principal
    [ev] = feedback_events(
        stack, lambda e: e.kind == "pairwise" and e.user_id == user and e.responses[0].response_id == rid_a, 1
    )
    assert [r.response_id for r in ev.responses] == [rid_a, rid_b]
    assert (ev.preferred, ev.revision) == ("b", 1)
    assert {r.prompt_hash for r in ev.responses} == {prompt_hash([("user", question)])}

    # The follow-up (one answer) is asked with B as the assistant's turn; A is gone.
    chat.by("compare-toggle").uncheck()
    expect(chat.by("send")).to_be_enabled()
    chat.send("And at night?")
    expect(answers).to_have_count(3)
    follow_up = completion_of(stack, answers.nth(2).get_attribute("data-response-id"))
    assert [m.role for m in follow_up.messages] == ["user", "assistant", "user"]
    assert follow_up.messages[0] == Message("user", question)
    assert follow_up.messages[1].content.strip() == text_b  # the page shows answers trimmed
    assert follow_up.messages[2] == Message("user", "And at night?")
    for choice in ("choose-a", "choose-b", "choose-tie"):
        expect(chat.by(choice)).to_be_disabled()  # the conversation has moved on past the comparison
    chat.by("thumb-up").click()
    expect(chat.by("rating-status").nth(1)).to_have_text("saved")

    chat.page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    chat.page.screenshot(path="/tmp/chat-page.png", full_page=True)

    # Narrow screens: the two answers stack instead of squeezing side by side.
    chat.page.set_viewport_size({"width": 380, "height": 800})
    box_a, box_b = (answers.nth(i).bounding_box() for i in range(2))
    assert box_b["y"] >= box_a["y"] + box_a["height"]
    assert box_a["width"] > 250
    chat.page.screenshot(path=str(tmp_path / "chat-narrow.png"))
    chat.page.screenshot(path="/tmp/chat-page-narrow.png")
    chat.assert_no_errors()


def test_refusals_show_the_api_message_and_the_page_keeps_working(stack, open_chat):
    chat = open_chat()
    chat.send("   ")  # blank: not sent at all
    chat.by("input").press("Enter")
    expect(chat.page.locator(".turn")).to_have_count(0)

    too_long = "word " * 800  # far over the 512-token context of the test engine: refused by the inference service
    chat.send(too_long)
    error = chat.by("error")
    expect(error).to_contain_text("exceeds the context length")
    expect(error).to_have_attribute("role", "alert")
    expect(chat.page.locator(".turn.user.failed")).to_have_count(1)
    expect(chat.by("answer")).to_have_count(0)

    chat.send("Hello again")  # the page still works, and the refused message is not part of the conversation
    expect(chat.by("answer")).to_have_count(1)
    follow_up = completion_of(stack, chat.by("answer").get_attribute("data-response-id"))
    assert follow_up.messages == [Message("user", "Hello again")]
    assert len(chat.chat_requests) == 2, "the blank message must not have been sent"
    chat.assert_no_errors(allowed=REFUSED)


def test_a_refused_rating_shows_the_reason_and_is_not_shown_as_chosen(stack, open_chat):
    # The answer was served to alice; then the page's session becomes bob's (a login in the same
    # browser): the feedback service refuses bob's rating of alice's answer, a real refusal.
    chat = open_chat("alice")
    chat.send("Rate me")
    expect(chat.by("answer")).to_have_count(1)
    rid = chat.by("answer").get_attribute("data-response-id")
    bob = chat.page.request.post(chat.url + "/v1/session", data={"api_key": TEST_API_KEYS["bob"]})
    assert bob.ok and bob.json()["principal"] == "bob"
    chat.by("thumb-up").click()
    status = chat.by("rating-status")
    expect(status).to_have_attribute("data-state", "error")
    expect(status).to_contain_text("issued to another principal")
    expect(chat.by("thumb-up")).to_have_attribute("aria-pressed", "false")
    refused = consume_events(
        stack.kafka,
        FEEDBACK_DLQ,
        lambda e: isinstance(e.payload, RejectedFeedbackEvent) and rid in e.payload.raw,
        1,
    )
    assert refused and refused[0].payload.param == "feedback_tokens"
    assert not consume_events(stack.kafka, FEEDBACK, lambda e: e.payload.responses[0].response_id == rid, 1, 3)
    assert httpx.get(stack.url + "/healthz").status_code == 200
    chat.assert_no_errors(allowed=REFUSED)


def test_the_page_asks_for_a_key_once_and_logs_out(stack, open_chat):
    chat = open_chat(principal=None)
    expect(chat.by("login-form")).to_be_visible()
    expect(chat.by("input")).to_be_hidden()
    chat.log_in("wrong-key-0123456789abcdefgh")
    expect(chat.by("login-error")).to_contain_text("invalid API key")
    chat.page.screenshot(path="/tmp/chat-page-login.png")
    chat.by("api-key").fill(TEST_API_KEYS["carol"])
    chat.by("log-in").click()
    expect(chat.by("principal")).to_have_text("carol")
    expect(chat.page.locator("#status")).to_contain_text("serving")
    cookie = next(c for c in chat.page.context.cookies() if c["name"] == "rlhf_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert chat.page.evaluate("document.cookie") == "", "no script can read the session"
    chat.send("Hello from carol")
    expect(chat.by("answer")).to_have_count(1)
    rid = chat.by("answer").get_attribute("data-response-id")
    assert completion_of(stack, rid).principal == "carol"
    chat.by("log-out").click()
    expect(chat.by("login-form")).to_be_visible()
    assert not [c for c in chat.page.context.cookies() if c["name"] == "rlhf_session" and c["value"]]
    chat.assert_no_errors(allowed=REFUSED)


def test_in_anonymous_mode_the_page_chats_and_rates_at_once_as_its_own_principal(stack, open_chat):
    gateway = UvicornThread(
        create_app(gateway_config(stack.inference.address, stack.feedback.address, api_keys="", anonymous=True))
    )
    try:
        chat = open_chat(principal=None, url=gateway.url)
        expect(chat.page.locator("#status")).to_contain_text("serving")
        expect(chat.by("login-form")).to_be_hidden()
        principal = chat.principal
        assert re.fullmatch(r"anon:[0-9a-f]{16}", principal)
        expect(chat.by("log-out")).to_be_hidden()
        chat.send("Hello, anonymously")
        expect(chat.by("answer")).to_have_count(1)
        rid = chat.by("answer").get_attribute("data-response-id")
        chat.by("thumb-down").click()
        expect(chat.by("rating-status")).to_have_attribute("data-state", "saved")
        [ev] = feedback_events(stack, lambda e: e.responses[0].response_id == rid, 1)
        assert (ev.user_id, ev.thumb) == (principal, "down")
        assert completion_of(stack, rid).conversation_id.startswith("conv-")
        chat.assert_no_errors()
    finally:
        gateway.stop()
