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
