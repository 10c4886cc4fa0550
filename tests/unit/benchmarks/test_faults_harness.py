"""The fault-injection harness's accounting (tests/faults_harness.py) on made-up records, without a
stack: lost ratings, recovery time, phases, learning, the verdict and the store checks."""

from __future__ import annotations

import json

from tests.faults_harness import (
    FAULTS,
    POISON_RECORDS,
    ChatRecord,
    FaultReport,
    RatingRecord,
    StackOptions,
    _line_state,
    failed_chats,
    first_new_version,
    half_written_versions,
    leftover_tmp,
    lost_by_phase,
    lost_ids,
    options_for,
    payload_ids,
    phase_of,
    seconds_to_recover,
    seconds_to_steady,
    table,
    verdict,
)


def test_lost_ids_are_accepted_ids_missing_on_the_topic():
    assert lost_ids(["a", "b", "b", "c"], {"a", "c", "z"}) == ["b"]
    assert lost_ids([], {"a"}) == []


def test_a_rating_counts_as_accepted_only_with_a_2xx_and_an_id():
    assert RatingRecord(0, 1, 200, "f1").accepted
    assert not RatingRecord(0, 1, 200, "").accepted
    assert not RatingRecord(0, 1, 503, "f1").accepted
    assert not RatingRecord(0, 1, 0).accepted


def test_recovery_is_the_first_answer_to_a_chat_sent_after_the_fault():
    chats = [
        ChatRecord(9.0, 12.0, True),  # sent before the fault: says nothing about recovery
        ChatRecord(10.5, 10.6, False),
        ChatRecord(11.0, 14.5, True),
        ChatRecord(12.0, 13.0, True),
    ]
    assert seconds_to_recover(10.0, chats) == 3.0
    assert seconds_to_recover(20.0, chats) is None
    assert failed_chats(chats, 10.0) == 1 and failed_chats(chats, 11.0) == 0


def test_steady_is_the_first_answer_after_the_last_failure():
    chats = [
        ChatRecord(11.0, 11.5, True),  # another engine (a canary) kept answering some users
        ChatRecord(11.2, 11.3, False),
        ChatRecord(14.0, 14.1, False),
        ChatRecord(14.5, 16.0, True),
        ChatRecord(15.0, 15.5, True),
    ]
    assert seconds_to_recover(10.0, chats) == 1.5
    assert seconds_to_steady(10.0, chats) == 5.5
    assert seconds_to_steady(10.0, chats[:3]) is None  # still failing at the end
    assert seconds_to_steady(10.0, [ChatRecord(10.5, 12.0, True)]) == 2.0  # no failure: the first answer


def test_phases_split_ratings_at_the_fault_and_at_recovery():
    assert phase_of(1.0, 5.0, 8.0) == "before"
    assert phase_of(6.0, 5.0, 8.0) == "during"
    assert phase_of(8.0, 5.0, 8.0) == "after"
    assert phase_of(100.0, 5.0, None) == "during"
    ratings = [
        RatingRecord(1.0, 2.0, 200, "a"),
        RatingRecord(2.0, 3.0, 200, "b"),
        RatingRecord(6.0, 7.0, 503),
        RatingRecord(9.0, 9.5, 200, "c"),
    ]
    assert lost_by_phase(ratings, {"c"}, 5.0, 8.0) == {
        "before": {"accepted": 2, "lost": 2},
        "during": {"accepted": 0, "lost": 0},
        "after": {"accepted": 1, "lost": 0},
    }


def test_learning_is_a_version_new_since_the_start_seen_after_recovery():
    seen = {"rm-0001": 0.0, "rm-0002": 5.0, "policy-0002": 12.0, "rm-0003": 15.0}
    assert first_new_version(seen, {"rm-0001"}, after=10.0) == ("policy-0002", 12.0)
    assert first_new_version(seen, {"rm-0001", "policy-0002", "rm-0003"}, after=10.0) is None
    assert first_new_version(seen, {"rm-0001"}, after=20.0) is None


def test_payload_ids_count_what_is_not_an_envelope_with_the_key():
    records = [
        json.dumps({"payload": {"feedback_id": "f1"}}).encode(),
        json.dumps({"payload": {"feedback_id": "f1"}}).encode(),
        json.dumps({"payload": {"feedback_id": 3}}).encode(),
        *POISON_RECORDS,
    ]
    ids, unreadable = payload_ids(records, "feedback_id")
    assert ids == {"f1"} and unreadable == 1 + len(POISON_RECORDS)
    response_ids, poison = payload_ids(POISON_RECORDS, "response_id")
    assert response_ids == set() and poison == len(POISON_RECORDS)


def test_the_verdict_names_what_failed_the_targets():
    ok = FaultReport("kill-feedback", "", ratings_accepted=10, recover_s=2.0, learned=True, recovered_by="supervisor")
    assert verdict(ok) == []
    lost = FaultReport(
        "kill-feedback", "", ratings_accepted=10, ratings_lost=2, recover_s=None, launcher_survived=False
    )
    assert verdict(lost) == [
        "2 accepted ratings lost",
        "rlhf up stopped the whole stack",
        "no chat answered after the fault",
        "the part hit did not come back",
    ]
    broker = FaultReport(
        "broker-restart",
        "",
        kafka_intact=False,
        ratings_lost=5,
        recover_s=1.0,
        lost_by_phase={"before": {"accepted": 5, "lost": 5}, "after": {"accepted": 3, "lost": 1}},
        learned=False,
        learn_wait_s=60,
        recovered_by="supervisor",
        details={"published": "rm-0002", "announced_after_restart": False},
    )
    assert verdict(broker) == [
        "1 ratings accepted after the restart lost",
        "no new version within 60 s after recovery",
        "rm-0002 was never announced",
    ]
    lines = table([ok, lost, broker]).splitlines()
    assert len(lines) == 5 and lines[2].rstrip().endswith("ok") and "2 accepted ratings lost" in lines[3]


def test_a_fault_gets_the_services_it_needs_and_their_needs():
    base = StackOptions(services=("inference", "feedback", "gateway"), rollout=False)
    trainer = options_for(FAULTS["trainer-mid-publish"], base, tmpfs_ok=False)
    assert trainer.services == ("inference", "reward", "feedback", "trainer", "gateway")
    canary = options_for(FAULTS["kill-inference-canary"], base, tmpfs_ok=False)
    assert canary.rollout and "inference" in canary.services
    full = options_for(FAULTS["store-full"], base, tmpfs_ok=True)
    assert full.store_on_tmpfs and not options_for(FAULTS["store-full"], base, tmpfs_ok=False).store_on_tmpfs
    assert options_for(FAULTS["broker-restart"], base, tmpfs_ok=False).broker == "embedded"
    assert options_for(FAULTS["kill-feedback"], base, tmpfs_ok=False) == base


def test_store_checks_find_half_written_versions_and_leftover_copies(tmp_path):
    whole = tmp_path / "policy-0001"
    whole.mkdir()
    (whole / "model.safetensors").write_bytes(b"x" * 10)
    (whole / "manifest.json").write_text(json.dumps({"files": {"model.safetensors": {"bytes": 10}}}))
    short = tmp_path / "rm-0002"
    short.mkdir()
    (short / "model.safetensors").write_bytes(b"x" * 3)
    (short / "manifest.json").write_text(json.dumps({"files": {"model.safetensors": {"bytes": 10}}}))
    (tmp_path / "policy-0003").mkdir()  # no manifest
    (tmp_path / ".tmp-abc").mkdir()
    assert half_written_versions(tmp_path) == ["policy-0003", "rm-0002"]
    assert leftover_tmp(tmp_path) == [".tmp-abc"]


def test_line_state_reads_the_pointer_and_the_last_announcement(tmp_path):
    assert _line_state(tmp_path, "rm") == (None, None, False)
    (tmp_path / "rm.current").write_text(json.dumps({"version": "rm-0002"}))
    (tmp_path / "rm.announced").write_text(json.dumps({"version": "rm-0001", "acked": True}))
    assert _line_state(tmp_path, "rm") == ("rm-0002", "rm-0001", True)
    (tmp_path / "rm.announced").write_text(json.dumps({"version": "rm-0002", "acked": False}))
    assert _line_state(tmp_path, "rm") == ("rm-0002", "rm-0002", False)
