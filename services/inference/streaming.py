"""How GenerateStream groups tokens into messages: pure rules, no engine, no gRPC.

vLLM already merges the outputs of a request that the consumer has not taken yet (its per-request
collector aggregates DELTA outputs), so whatever is ready when the stream asks for more comes as one
output: "only what is ready" costs nothing. A short window on top lets a fast engine fill a message
with several tokens: after each message (never before the first: TTFT is not touched) the stream
waits until ``window_s`` after the output it holds was taken from the engine, or less when the stream's own pace says
``max_tokens`` tokens will be ready sooner, and then takes everything produced meanwhile as one
message. Each message costs the gateway a protobuf parse, a JSON encoding and an HTTP write, so
fewer, fuller messages are what make the path per token cheap.
"""

from __future__ import annotations


def coalesce_delay(
    now: float, last_taken: float, window_s: float, max_tokens: int, last_tokens: int, last_span_s: float
) -> float:
    """Seconds to wait before taking the engine's next output of a stream.

    ``last_taken``: when the previous output was taken (its message has been sent since);
    ``last_tokens`` tokens it held, produced over ``last_span_s`` seconds (the time since the output
    before it; 0 for the first output, whose pace is the prompt's, not the stream's). The target is
    the window, shortened to the time ``max_tokens`` tokens take at that pace::

        target = min(window_s, max_tokens * last_span_s / last_tokens)   (max_tokens > 0)
        delay  = max(0, last_taken + target - now)

    With a count bound and no pace known yet (after the first output) there is no wait: the next
    output, taken as soon as it is ready, gives the pace. ``window_s <= 0`` means no wait (only
    what is ready); ``max_tokens <= 0`` means no count bound (the window alone).
    """
    if window_s <= 0:
        return 0.0
    target = window_s
    if max_tokens > 0:
        if last_tokens <= 0 or last_span_s <= 0:
            return 0.0
        target = min(target, max_tokens * last_span_s / last_tokens)
    return max(0.0, last_taken + target - now)
