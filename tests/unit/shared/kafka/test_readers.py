"""Where an assigned reader starts a partition from a stored offset (no broker needed)."""

from shared.kafka.readers import Record, start_offset


def test_a_stored_offset_within_the_partition_is_resumed():
    assert start_offset(7, end=10) == 7
    assert start_offset(10, end=10) == 10  # everything read: resume at the end


def test_no_stored_offset_reads_from_the_beginning():
    assert start_offset(None, end=10) is None


def test_a_stored_offset_beyond_the_end_means_a_recreated_topic_read_from_the_beginning():
    assert start_offset(11, end=10) is None
    assert start_offset(100, end=0) is None


def test_a_record_names_its_parts():
    r = Record("t", 2, 5, b"k", b"v")
    assert (r.topic, r.partition, r.offset, r.key, r.value) == ("t", 2, 5, b"k", b"v")


def test_a_recreated_topic_is_read_from_its_start_whatever_the_offsets():
    from shared.kafka.readers import start_offset

    assert start_offset(7, end=10, recreated=True) is None
    assert start_offset(7, end=10, recreated=False) == 7


def test_partition_identity_prefers_the_topic_id_then_the_first_record():
    from shared.kafka.readers import EMPTY, partition_identity

    assert (
        partition_identity("5f0c6f7e-1d2b-4c3a-9e8f-0a1b2c3d4e5f", (0, 99)) == "id:5f0c6f7e-1d2b-4c3a-9e8f-0a1b2c3d4e5f"
    )
    assert partition_identity("00000000-0000-0000-0000-000000000000", (0, 99)) == "first:0:99", "a zero id is none"
    assert partition_identity(None, (3, 1700000000000)) == "first:3:1700000000000"
    assert partition_identity(None, None) == EMPTY


def test_only_a_known_identity_that_changed_means_recreated():
    from shared.kafka.readers import EMPTY, was_recreated

    assert was_recreated("id:a", "id:b")
    assert was_recreated("first:0:100", "first:0:200")
    assert not was_recreated("id:a", "id:a")
    assert not was_recreated(None, "id:a"), "nothing stored: the offsets decide"
    assert not was_recreated(EMPTY, "first:0:5"), "an empty partition that got records is the same topic"


def test_identities_of_different_kinds_prove_nothing():
    from shared.kafka.readers import EMPTY, was_recreated

    assert not was_recreated("id:a", "first:0:5")
    assert not was_recreated("first:0:5", EMPTY), "a recreated topic without records yet: wait for one"


def test_a_running_reader_keeps_what_it_knew_when_the_broker_cannot_say():
    from shared.kafka.readers import EMPTY, carried_identity

    assert carried_identity("id:a", EMPTY) == "id:a"
    assert carried_identity("id:a", "first:0:5") == "id:a"
    assert carried_identity("first:0:5", "id:a") == "id:a", "a topic id says more: kept from now on"
    assert carried_identity("first:0:5", EMPTY) == "first:0:5"
    assert carried_identity(EMPTY, "first:0:5") == "first:0:5"
    assert carried_identity("id:a", "id:b") == "id:b"
    assert carried_identity(None, EMPTY) == EMPTY
