"""The scorer (validation, batching, hot-swap, refusing corrupt, unsigned or replayed versions,
loading private copies) and the offline start, on the tiny backbone."""

import json

import pytest
import torch

from services.reward.config import RewardConfig
from services.reward.domain import ScoreItem
from services.reward.offline import (
    RankingsFileError,
    parse_ranking,
    read_rankings,
    split_heldout_rankings,
    train_first_rm,
)
from services.reward.scorer import RewardScorer
from services.reward.training import TrainSettings
from shared.config import ConfigError, ModelStoreConfig, load_config
from shared.errors import InvalidArgument, Unavailable
from shared.events import Message, RewardModelEvent
from shared.model_store import CorruptVersionError
from shared.models.encoding import EncodingLimits
from shared.models.reward_model import WEIGHTS_NAME, RewardModel
from shared.signing import SigningKey
from shared.version_line import REWARD_MODEL, Announcement, VersionLine, VersionRefused
from tests.conftest import test_signing_key, test_versions

Q = [Message("user", "What is 2 plus 3?")]


def publish_rm(
    store, tokenizer, policy_dir, tmp_path, seed: int, offset: float = 0.0, line: VersionLine | None = None
) -> str:
    """Publish a random RM: through ``line`` (signed, when it has a key), else unsigned into the store."""
    torch.manual_seed(seed)
    rm = RewardModel.from_policy_dir(policy_dir, seed=seed)
    rm.set_offset(offset, "test")
    out = tmp_path / f"rm-src-{seed}"
    rm.save(out, tokenizer)
    if line is not None:
        return line.publish(out, parent="policy-0001", make_current=False).version
    return store.publish("rm", out, parent="policy-0001").version


def announcement(store, version, sequence, reason="publish", key: SigningKey | None = None, sha=None):
    """The announcement a publisher holding ``key`` would send (None: unsigned)."""
    a = Announcement("rm", version, sha or store.manifest_sha256(version), reason, sequence).signed_by(key)
    return REWARD_MODEL.make_event(a, None, {})


def make_scorer(store, **overrides) -> RewardScorer:
    cfg = load_config(
        RewardConfig, {}, model_store=ModelStoreConfig(store.root), max_tokens=96, max_response_tokens=32, **overrides
    )
    return RewardScorer(cfg, store)


@pytest.fixture()
def scorer(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path):
    publish_rm(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path, seed=1)
    s = make_scorer(tiny_store, max_items=8, max_batch_size=3, max_response_chars=200, max_message_chars=300)
    s.load()
    return s


def items(*responses, messages=Q):
    return [ScoreItem(list(messages), r) for r in responses]


def test_scores_one_scalar_per_item_with_the_version(scorer):
    result = scorer.score_sync(items("2 plus 3 is 5.", "I am not sure.", "5"))
    assert len(result.scores) == 3 and result.rm_version == "rm-0001"
    assert result.truncated == [False, False, False]
    assert all(isinstance(s, float) for s in result.scores)


def test_batching_and_padding_do_not_change_scores(scorer):
    responses = ["5", "2 plus 3 is 5.", "I am not sure, sorry, I do not know.", "Hello", "7", "2 plus 3 is 6."]
    together = scorer.score_sync(items(*responses)).scores  # 2 forward passes of at most 3
    alone = [scorer.score_sync(items(r)).scores[0] for r in responses]
    assert together == pytest.approx(alone, abs=1e-5)


def test_long_inputs_are_truncated_not_refused(scorer):
    long_prompt = [Message("user", "Hello there, how are you today? " * 9)]
    result = scorer.score_sync(items("ok " * 60, messages=long_prompt))
    assert result.truncated == [True]


@pytest.mark.parametrize(
    "bad, param",
    [
        ([], "items"),
        (items(*["x"] * 9), "items"),
        (items("5", ""), "items[1].response"),
        (items("   "), "items[0].response"),
        (items("x" * 201), "items[0].response"),
        (items("5", messages=[]), "items[0].messages"),
        (items("5", messages=[Message("robot", "hi")]), "items[0].messages[0].role"),
        (items("5", messages=[Message("system", "be nice")]), "items[0].messages"),
        (items("5", messages=[Message("user", "y" * 301)]), "items[0].messages[0].content"),
    ],
)
def test_empty_or_oversized_input_is_invalid_argument_naming_the_field(scorer, bad, param):
    with pytest.raises(InvalidArgument) as err:
        scorer.score_sync(bad)
    assert err.value.param == param
    assert param.split(".")[-1].split("[")[0] in err.value.message


def test_no_reward_model_means_unavailable(tiny_store):
    s = make_scorer(tiny_store)
    with pytest.raises(Unavailable, match="no reward model"):
        s.load()
    with pytest.raises(Unavailable):
        s.score_sync(items("5"))


def test_hot_swap_loads_the_new_version_and_keeps_in_flight_requests_on_the_old(
    scorer, tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path
):
    old = scorer._current
    before = scorer.score_sync(items("2 plus 3 is 5.")).scores
    v2 = publish_rm(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path, seed=2, offset=3.0)
    assert scorer.apply_update(announcement(tiny_store, v2, 1)) is True
    assert scorer.version == v2 and scorer.swaps == 1
    after = scorer.score_sync(items("2 plus 3 is 5."))
    assert after.rm_version == v2 and after.scores != pytest.approx(before)
    # A request that read the old reference before the swap finishes on the old model.
    assert scorer._score(old, items("2 plus 3 is 5.")).scores == pytest.approx(before)
    assert scorer._score(old, items("x")).rm_version == "rm-0001"


def test_a_corrupt_version_is_refused_and_the_old_one_keeps_scoring(
    scorer, tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path
):
    v2 = publish_rm(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path, seed=2)
    sha = tiny_store.manifest_sha256(v2)
    weights = tiny_store.path(v2) / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert scorer.apply_update(announcement(tiny_store, v2, 1, sha=sha)) is False
    assert scorer.version == "rm-0001" and scorer.refused_updates == 1
    with pytest.raises(CorruptVersionError):
        scorer.load(v2)
    assert scorer.score_sync(items("5")).rm_version == "rm-0001"
    # A fresh scorer refuses to start on it at all.
    with pytest.raises(CorruptVersionError):
        make_scorer(tiny_store).load(v2)


def test_an_announcement_with_another_manifest_hash_is_refused(
    scorer, tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path
):
    v2 = publish_rm(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path, seed=2)
    assert scorer.apply_update(announcement(tiny_store, v2, 1, sha="0" * 64)) is False
    assert scorer.version == "rm-0001"
    # An announcement without a sequence number above the last one seen is a replay.
    assert scorer.apply_update(RewardModelEvent(v2, tiny_store.manifest_sha256(v2))) is False
    assert scorer.version == "rm-0001" and scorer.refused_updates == 2


# --- signed versions -------------------------------------------------------------------------------


def refused(reason: str) -> float:
    from services.reward import metrics

    return metrics.SWAP_REFUSED.labels(reason)._value.get()


@pytest.fixture()
def signed(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path):
    """A store whose rm line is published by a signing publisher (rm-0001 current, settled offline),
    and a scorer that verifies with the test rm key and keeps its copies under tmp_path."""
    line = VersionLine(tiny_store, REWARD_MODEL, signer=test_signing_key("rm"))
    v1 = publish_rm(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path, seed=1, line=line)
    line.set_current(v1)
    versions = test_versions(copies_dir=tmp_path / "copies")
    scorer = make_scorer(tiny_store, versions=versions)
    scorer.load()
    return line, scorer


def test_a_verifying_scorer_swaps_only_to_signed_newer_versions_or_signed_rollbacks(
    signed, tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path
):
    line, scorer = signed
    key = test_signing_key("rm")
    assert scorer.version == "rm-0001" and scorer.versions.sequence == 1
    v2 = publish_rm(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path, seed=2, offset=3.0, line=line)
    v3 = publish_rm(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path, seed=3)  # unsigned
    before = refused("bad_signature"), refused("replayed"), refused("not_newer")
    assert not scorer.apply_update(announcement(tiny_store, v2, 2))  # unsigned announcement
    assert not scorer.apply_update(announcement(tiny_store, v2, 2, key=SigningKey.generate()))  # another key
    assert not scorer.apply_update(announcement(tiny_store, v3, 2, key=key))  # unsigned version
    assert refused("bad_signature") == before[0] + 3 and scorer.version == "rm-0001"
    assert scorer.apply_update(announcement(tiny_store, v2, 3, key=key)) and scorer.version == v2
    assert not scorer.apply_update(announcement(tiny_store, "rm-0001", 4, key=key))  # older, as a publish
    assert refused("not_newer") == before[2] + 1 and scorer.version == v2
    assert scorer.apply_update(announcement(tiny_store, "rm-0001", 5, "rollback", key=key))
    assert not scorer.apply_update(announcement(tiny_store, v2, 3, key=key))  # replayed
    assert refused("replayed") == before[1] + 1 and scorer.version == "rm-0001"
    # Served from private copies (the served and the previous one), never from the store.
    held = scorer.versions.private.held
    assert len(held) == 2 and all(tiny_store.root not in p.parents for p in held)
    assert {p.name.rsplit("-", 1)[0] for p in held} == {"rm-0001", v2}


def test_a_restarted_scorer_keeps_refusing_old_announcements(
    signed, tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path
):
    # ``signed``: rm-0001 published and settled by a signing publisher, one scorer serving it.
    class Recording:
        def announce(self, event):
            pass

    publisher = VersionLine(tiny_store, REWARD_MODEL, Recording(), signer=test_signing_key("rm"))
    v2 = publish_rm(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path, seed=2, line=publisher)
    publisher.set_current(v2)
    first = publisher.announce_pending()
    publisher.set_current("rm-0001")
    publisher.announce_pending()  # a signed rollback: the store's record says rm-0001, sequence 3
    restarted = make_scorer(tiny_store, versions=test_versions(copies_dir=tmp_path / "copies2"))
    restarted.load()
    assert (restarted.version, restarted.versions.sequence) == ("rm-0001", 3)
    assert not restarted.apply_update(first)  # the old publish of rm-0002, replayed after the restart
    assert restarted.version == "rm-0001"


def test_a_verifying_scorer_refuses_to_start_on_an_unsigned_store(
    tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path
):
    publish_rm(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path, seed=1)  # unsigned, no record
    scorer = make_scorer(tiny_store, versions=test_versions(copies_dir=tmp_path / "copies"))
    with pytest.raises(VersionRefused, match="no signed announcement"):
        scorer.load()
    with pytest.raises(VersionRefused, match="rm-0001 is unsigned"):
        scorer.load("rm-0001")
    assert not scorer.ready


def test_the_learners_own_version_is_verified_and_copied_before_it_is_loaded(
    signed, tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path
):
    line, scorer = signed
    v2 = publish_rm(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path, seed=2, line=line)
    assert scorer.load(v2) == v2 and scorer.version == v2  # what on_published does
    v3 = publish_rm(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path, seed=3)  # unsigned
    with pytest.raises(VersionRefused, match="unsigned"):
        scorer.load(v3)
    assert scorer.version == v2 and len(scorer.versions.private.held) == 2


def test_off_loopback_the_reward_service_needs_its_keys():
    with pytest.raises(ConfigError, match="RLHF_VERSIONS_RM_VERIFY_KEY_FILE") as err:
        load_config(RewardConfig, {"RLHF_REWARD_HOST": "0.0.0.0", "RLHF_AUTH_ALLOW_PLAINTEXT": "1"})
    assert "RLHF_VERSIONS_RM_SIGNING_KEY_FILE" in str(err.value)
    load_config(
        RewardConfig,
        {"RLHF_REWARD_HOST": "0.0.0.0", "RLHF_AUTH_ALLOW_PLAINTEXT": "1", "RLHF_VERSIONS_ALLOW_UNSIGNED": "1"},
    )


def test_config_limits_are_checked():
    with pytest.raises(ConfigError, match="MAX_RESPONSE_TOKENS"):
        load_config(RewardConfig, {"RLHF_REWARD_MAX_TOKENS": "100", "RLHF_REWARD_MAX_RESPONSE_TOKENS": "100"})
    with pytest.raises(ConfigError, match="RLHF_REWARD_MAX_ITEMS"):
        load_config(RewardConfig, {"RLHF_REWARD_MAX_ITEMS": "0"})
    cfg = load_config(RewardConfig, {})
    assert (cfg.grpc_port, cfg.metrics_port) == (50053, 9103)


# --- offline start ----------------------------------------------------------------------------


def test_parse_ranking_orders_responses_best_first():
    g = parse_ranking({"prompt": "What is 2 plus 3?", "responses": ["no idea", "5", "6"], "ranking": [1, 2, 0]})
    assert [s.response for s in g.responses] == ["5", "6", "no idea"]
    assert g.responses[0].messages == (Message("user", "What is 2 plus 3?"),)
    assert g.pairs == ((0, 1), (0, 2), (1, 2))


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "Expecting value"),
        ('{"prompt": "", "responses": ["a", "b"], "ranking": [0, 1]}', "prompt"),
        ('{"prompt": "q", "responses": ["a", ""], "ranking": [0, 1]}', "non-empty strings"),
        ('{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}', "distinct"),
        ('{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 2]}', "below 2"),
        ('{"prompt": [{"role": "bot", "content": "q"}], "responses": ["a", "b"], "ranking": [0, 1]}', "role"),
    ],
)
def test_a_bad_rankings_line_is_reported_with_its_line_number(tmp_path, line, message):
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "q", "responses": ["a", "b"], "ranking": [1, 0]}\n\n' + line + "\n")
    with pytest.raises(RankingsFileError, match=f"r.jsonl:3: .*{message}"):
        read_rankings(path)


def test_heldout_split_is_seeded_and_disjoint():
    groups = list(range(10))
    train, held = split_heldout_rankings(groups, 0.2, seed=0)
    assert len(held) == 2 and sorted(train + held) == groups
    assert split_heldout_rankings(groups, 0.2, seed=0) == (train, held)
    assert split_heldout_rankings(groups[:1], 0.2, seed=0) == ([0], [])


def test_train_first_rm_publishes_rm_0001_from_the_policy(tiny_store, tmp_path):
    path = tmp_path / "rankings.jsonl"
    lines = [
        {
            "prompt": [{"role": "user", "content": f"What is {a} plus 3?"}],
            "responses": ["I am not sure, sorry.", f"{a} plus 3 is {a + 3}."],
            "ranking": [1, 0],
        }
        for a in range(10)
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    settings = TrainSettings(epochs=2, lr=1e-3, limits=EncodingLimits(96, 32))
    result = train_first_rm(tiny_store, path, settings=settings, heldout_fraction=0.2)
    assert result.version == "rm-0001" and tiny_store.current("rm") == "rm-0001"
    manifest = tiny_store.verify("rm-0001")
    assert manifest.parent == "policy-0001"
    assert {"heldout_accuracy", "heldout_accuracy_before", "train_loss", "offset"} <= manifest.metrics.keys()
    assert manifest.metrics["heldout_rankings"] == 2 and manifest.extra["base_policy"] == "policy-0001"
    # Normalised: the file's responses average 0 under the published model.
    scorer = make_scorer(tiny_store)
    scorer.load()
    everything = [
        ScoreItem(list(g.responses[0].messages), s.response) for g in read_rankings(path) for s in g.responses
    ]
    assert sum(scorer.score_sync(everything).scores) / len(everything) == pytest.approx(0.0, abs=1e-4)


def test_the_app_trains_its_first_rm_when_the_store_has_none_then_serves(tiny_store, tmp_path):
    from services.reward.app import RewardApp
    from tests.conftest import LoopThread

    path = tmp_path / "rankings.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"What is {a} plus 3?", "responses": ["no idea", f"{a + 3}"], "ranking": [1, 0]})
            + "\n"
            for a in range(6)
        )
    )
    cfg = load_config(
        RewardConfig,
        {},
        grpc_port=0,
        metrics_port=0,
        model_store=ModelStoreConfig(tiny_store.root),
        max_tokens=96,
        max_response_tokens=32,
        bootstrap_rankings=path,
        versions=test_versions(copies_dir=tmp_path / "copies"),  # signs the first RM, verifies it to serve
    )
    loop = LoopThread()

    async def make():  # gRPC aio servers belong to the loop that makes them
        return RewardApp(cfg)

    app = loop.run(make())
    try:
        loop.run(app.start(), timeout=60)
        assert app.scorer.version == "rm-0001" and tiny_store.manifest("rm-0001").extra["rankings_file"] == path.name
        assert app.scorer.versions.line.enforced and app.scorer.versions.sequence == 1
        assert tiny_store.read_manifest("rm-0001").signature is not None
        assert app.scorer.score_sync(items("4")).rm_version == "rm-0001"
    finally:
        loop.run(app.stop(), timeout=30)
        loop.close()


def test_bf16_scoring_stays_close_to_float32(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path):
    publish_rm(tiny_store, tiny_tokenizer, tiny_policy_dir, tmp_path, seed=1)
    responses = ["5", "2 plus 3 is 5.", "I am not sure."]
    exact, bf16 = make_scorer(tiny_store), make_scorer(tiny_store, precision="bf16")
    exact.load()
    bf16.load()
    want = exact.score_sync(items(*responses)).scores
    got = bf16.score_sync(items(*responses)).scores
    assert all(isinstance(s, float) for s in got)
    assert got == pytest.approx(want, abs=0.05)
    assert got != want  # it did compute in bf16 (float32 scores would be bit-identical)
