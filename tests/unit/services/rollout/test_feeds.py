"""Where the evidence feed starts reading each partition (the Kafka side is tested with a real
broker in tests/integration/test_rollout.py)."""

from services.rollout.feeds import start_offsets


def test_each_partition_starts_where_the_time_index_points_or_at_the_end():
    ends = {("rlhf.feedback", 0): 10, ("rlhf.feedback", 1): 7, ("rlhf.completions", 0): 5}
    found = {("rlhf.feedback", 0): 4, ("rlhf.feedback", 1): None, ("rlhf.completions", 0): 9}
    assert start_offsets(ends, found) == {
        ("rlhf.feedback", 0): 4,  # the first record since the time
        ("rlhf.feedback", 1): 7,  # none since: the end
        ("rlhf.completions", 0): 5,  # never beyond the end
    }
    assert start_offsets(ends, {}) == ends
