"""The /flywheel page (services/gateway/static/flywheel.html) in a real headless Chromium against a real
gateway that follows rlhf.rollout on an embedded broker.

First the test publishes RolloutEvents as the rollout service would: the page must show a canary
starting, then the gate's decision, with the versions, traffic shares, thumbs-up rates and intervals
the events carry, within a few polls. It needs a login (the gateway has API keys), and text from the
topic is shown as text, never run as markup. Then against the real rollout service (with the
feedback service, its candidate line and users' ratings, as tests/integration/test_rollout.py sets
them up): a trainer candidate becomes the canary on the page, the users' ratings show up as live
thumbs-up rates (the rollout service's Status, read with the gateway's credential), and an
operator's rollback appears as the decision. Nothing is faked or intercepted."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from services.gateway.app import create_app
from shared.events import RolloutEvent
from shared.kafka.publishers import KafkaPublisher
from shared.kafka.topics import ROLLOUT
from shared.pb import rollout_pb2
from tests.conftest import TEST_API_KEYS, UvicornThread, gateway_config, start_broker
from tests.integration.test_chat_page_browser import CHROMIUM, CHROMIUM_ARGS, UNAUTHENTICATED, WAIT_MS
from tests.integration.test_rollout import World

pytestmark = [pytest.mark.integration, pytest.mark.slow]

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("the playwright Python package is not installed", allow_module_level=True)

STABLE, CANARY = "policy-0007", "policy-0008"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site():
    own = start_broker()
    # No inference is called by the page: the addresses only have to be well formed.
    cfg = gateway_config("127.0.0.1:9", canary_inference_address="127.0.0.1:10", kafka=own.kafka)
    gateway = UvicornThread(create_app(cfg))
    publisher = KafkaPublisher(own.kafka, "test-rollout")
    yield gateway, publisher
    publisher.close()
    gateway.stop()
    own.broker.stop()


def publish(publisher: KafkaPublisher, sequence: int, stage: str, version: str, **state) -> None:
    values = {"stable": STABLE, "canary": "", "canary_share": 0.0, "paused": False, "mode": "auto", **state}
    ev = RolloutEvent(sequence=sequence, version=version, stage=stage, at=time.time(), **values)
    publisher.publish_and_wait(ROLLOUT, ev, key="policy")


def open_page(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """The page in a fresh context, logged in as alice; the browser's errors are collected."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page: Page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.goto(url + "/flywheel")
    expect(page.get_by_test_id("login-form")).to_be_visible()  # keys on: the data needs a login
    page.get_by_test_id("api-key").fill(TEST_API_KEYS["alice"])
    page.get_by_test_id("log-in").click()
    return page, errors


def assert_no_errors(errors: list[str]) -> None:
    unexpected = [e for e in errors if not UNAUTHENTICATED.search(e)]  # the 401 before the login is expected
    assert not unexpected, f"errors in the browser console: {unexpected}"


def row(page: Page, role: str, version: str):
    return page.locator(f'[data-testid="version-row"][data-role="{role}"][data-version="{version}"]')


def test_the_page_shows_a_canary_and_then_the_decision_as_they_happen(browser, site):
    gateway, publisher = site
    page, errors = open_page(browser, gateway.url)
    by = page.get_by_test_id
    try:
        expect(by("feed-status")).to_contain_text("following the rollout")
        expect(by("stable-version")).to_have_text("–")
        expect(by("no-decisions")).to_be_visible()

        publish(
            publisher, 1, "canary", CANARY, canary=CANARY, canary_share=0.25,
            reason='a new candidate <img src=x onerror="window.pwned=1">',
        )  # fmt: skip
        expect(by("canary-version")).to_have_text(CANARY)
        expect(by("stable-version")).to_have_text(STABLE)
        expect(by("canary-share")).to_have_text("25.0%")
        rows = by("version-row")
        expect(rows).to_have_count(2)
        canary_row = row(page, "canary", CANARY)
        expect(canary_row.get_by_test_id("traffic-share")).to_have_text("25.0%")
        first = by("decision").first
        expect(first).to_have_attribute("data-stage", "canary")
        expect(first.get_by_test_id("decision-reason")).to_have_text(
            'a new candidate <img src=x onerror="window.pwned=1">'
        )
        assert page.locator("#decisions img").count() == 0 and page.evaluate("window.pwned") is None

        evidence = {
            "thumbs": {"canary_n": 120, "canary_mean": 0.7, "stable_n": 400, "stable_mean": 0.6,
                       "difference": [-0.02, 0.21], "verdict": "promote"},
            "no_error": {"verdict": "continue", "difference": [-0.01, 0.01]},
            "canary": {"thumbs_up_rate": 0.7, "thumbs": 120, "likert_mean": 5.1, "likerts": 10,
                       "completions": 300, "error_rate": 0.0, "latency_p50_s": 0.21},
            "stable": {"thumbs_up_rate": 0.6, "thumbs": 400, "completions": 1200, "error_rate": 0.0},
        }  # fmt: skip
        publish(
            publisher, 2, "promoted", CANARY, stable=CANARY,
            reason="non-inferior on thumbs with 120 ratings", evidence=evidence,
        )  # fmt: skip
        expect(by("decision").first).to_have_attribute("data-stage", "promoted")
        expect(by("decision").first.get_by_test_id("decision-reason")).to_have_text(
            "non-inferior on thumbs with 120 ratings"
        )
        expect(by("decision").first).to_contain_text("thumbs: promote")
        expect(by("decision")).to_have_count(2)
        expect(by("stable-version")).to_have_text(CANARY)
        expect(by("canary-version")).to_have_text("none")
        expect(by("canary-share")).to_have_text("0.0%")
        stable_row = row(page, "stable", CANARY)
        expect(stable_row.get_by_test_id("thumbs-rate")).to_have_text("70.0%")
        expect(stable_row.get_by_test_id("thumbs-count")).to_have_text("120")
        expect(stable_row.get_by_test_id("thumbs-interval")).to_have_text(re.compile(r"^\[\d+\.\d%, \d+\.\d%\]$"))
        low, high = (
            float(x) for x in re.findall(r"(\d+\.\d)%", stable_row.get_by_test_id("thumbs-interval").text_content())
        )
        assert low < 70.0 < high
        expect(by("feed-status")).to_contain_text("event #2")
        expect(by("feed-status")).to_contain_text("figures as of the latest decision")
    finally:
        page.context.close()
    assert_no_errors(errors)


def test_with_the_real_rollout_service_the_page_shows_live_ratings_and_the_operators_rollback(browser, tmp_path):
    world = World(tmp_path)
    gateway = None
    try:
        world.start_rollout(initial_mode="manual")  # the gate only advises: the canary stays until the operator acts
        cfg = gateway_config(
            "127.0.0.1:9",
            canary_inference_address="127.0.0.1:10",
            kafka=world.kafka,
            rollout_address=world.rollout.address,
        )
        gateway = UvicornThread(create_app(cfg))
        page, errors = open_page(browser, gateway.url)
        by = page.get_by_test_id
        try:
            expect(by("feed-status")).to_contain_text("live figures from the rollout service")
            expect(by("stable-version")).to_have_text("policy-0001")
            version = world.publish_candidate()
            expect(by("canary-version")).to_have_text(version)
            expect(by("decision").first).to_have_attribute("data-stage", "canary")

            world.rate("policy-0001", ups=30, downs=10)
            world.rate(version, ups=4, downs=36)
            canary_row, stable_row = row(page, "canary", version), row(page, "stable", "policy-0001")
            expect(canary_row.get_by_test_id("thumbs-count")).to_have_text("40")
            expect(canary_row.get_by_test_id("thumbs-rate")).to_have_text("10.0%")
            expect(stable_row.get_by_test_id("thumbs-rate")).to_have_text("75.0%")
            expect(canary_row.get_by_test_id("thumbs-interval")).to_have_text(re.compile(r"^\[\d+\.\d%, \d+\.\d%\]$"))

            world.stub("operator").Rollback(rollout_pb2.RolloutVersionRequest(version=version), timeout=30)
            expect(by("decision").first).to_have_attribute("data-stage", "rolled_back")
            expect(by("decision").first.get_by_test_id("decision-reason")).to_have_text("rolled back by an operator")
            expect(by("canary-version")).to_have_text("none")
            expect(by("version-row")).to_have_count(1)
        finally:
            page.context.close()
        assert_no_errors(errors)
    finally:
        if gateway is not None:
            gateway.stop()
        world.close()
