"""The serving benchmark's report (tests/benchmarks/bench_serving.py) on made-up results: the
`bench serve`-style figures per level, the ratios against vLLM's server, the issue's targets, the
trainer's table and the plot, without starting any server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "tests" / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # the scripts import their helpers by bare name
    try:
        import bench_serving

        yield bench_serving
    finally:
        sys.path.remove(str(BENCH))


def results(bench, n: int, gap_s: float, tokens: int, ttft_s: float, version: str | None = None) -> list:
    """``n`` requests, each sent at i, first content after ``ttft_s``, then one chunk of 2 tokens every
    ``gap_s``."""
    out = []
    chunks = tokens // 2
    for i in range(n):
        r = bench.RequestResult(idx=i, client=i % 4, max_tokens=tokens, prompt_chars=10)
        r.t_send = float(i)
        r.content_times = [i + ttft_s + k * gap_s for k in range(chunks)]
        r.t_first = r.content_times[0]
        r.t_end = r.content_times[-1] + 0.001
        r.completion_tokens = tokens
        r.content_chunks = chunks
        r.ok = True
        r.served_by = version
        out.append(r)
    return out


def level(bench, n: int, gap_s: float, ttft_s: float, wall: float, version: str | None = None) -> dict:
    return bench.summarise(results(bench, n, gap_s, 16, ttft_s, version), wall, n)


def test_summarise_has_the_bench_serve_figures(bench) -> None:
    m = level(bench, 8, gap_s=0.02, ttft_s=0.1, wall=10.0, version="policy-0001")
    assert m["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert m["ttft_ms"]["p99"] == pytest.approx(100.0)
    assert m["itl_ms"]["p90"] == pytest.approx(20.0)  # one gap per chunk
    assert m["tpot_ms"]["p50"] == pytest.approx(7 * 20.0 / 15)  # (last - first chunk) / (16 - 1) tokens
    assert m["e2el_ms"]["n"] == 8
    assert m["tokens_per_s"] == pytest.approx(8 * 16 / 10.0)
    assert m["tokens_per_content_chunk"] == pytest.approx(2.0)
    assert m["policy_versions_served"] == {"policy-0001": 8}


def test_servers_parse_into_run_order(bench) -> None:
    assert bench.parse_servers("vllm,ours") == ["ours-serving", "ours-loop", "vllm"]
    assert bench.parse_servers("naive, ours-loop,ours-loop") == ["ours-loop", "naive"]
    with pytest.raises(ValueError, match="unknown servers"):
        bench.parse_servers("ours,theirs")


def make_report(bench) -> dict:
    trainer = {"wall_s": 10.0, "rollouts": 32.0, "rollouts_per_s": 3.2, "steps": 2.0, "steps_per_min": 12.0}
    trainer |= {"published": 0.0, "cpu_s": 6.0, "deltas": {}, "gauges_after": {}}
    report = {
        "settings": {"concurrency": [8, 64], "client": "openai.AsyncOpenAI, closed loop"},
        "machine": {"cpu_count": 2},
        "servers": {
            # vLLM: 128 tok/s at 8, 256 at 64; the loop at 0.8x and 0.9x; the serving path at 1x
            "vllm": {"levels": {"8": level(bench, 8, 0.02, 0.1, 1.0), "64": level(bench, 16, 0.02, 0.1, 1.0)}},
            "ours-loop": {
                "levels": {
                    "8": level(bench, 8, 0.03, 0.1, 1.25) | {"trainer": trainer},
                    "64": level(bench, 16, 0.03, 0.3, 1.0 / 0.9) | {"trainer": trainer},
                },
                "trainer_no_users": trainer | {"rollouts_per_s": 6.4},
                "process_cpu_s": {"64": {"gateway": 1.0, "inference": 2.0, "trainer": 3.0}},
                "client_cpu_s": {"64": 0.5},
            },
            "ours-serving": {"levels": {"64": level(bench, 16, 0.02, 0.1, 1.0, "policy-0001")}},
        },
        "hot_swap": {"default": {"server_pause_max_s": 0.4, "server_pause_mean_s": 0.3, "mode": "default (bounded)"}},
    }
    report["servers"]["ours-loop"]["levels"]["64"]["policy_versions_served"] = {"policy-0001": 10, "policy-0002": 6}
    for srv in report["servers"].values():
        srv.setdefault("label", "")
    return report


def test_targets_are_ratios_against_vllm(bench) -> None:
    report = make_report(bench)
    t = bench.targets(report)
    assert t["ours-loop_tokens_per_s_64"]["ratio"] == pytest.approx(0.9)
    assert t["ours-loop_tokens_per_s_64"]["pass"] is True
    assert t["ours-loop_tokens_per_s_8"]["ratio"] == pytest.approx(0.8)
    assert t["ours-loop_tokens_per_s_8"]["pass"] is True  # >= 0.7 at 8 clients
    assert t["ours-loop_ttft_p50_64"]["ratio"] == pytest.approx(3.0)
    assert t["ours-loop_ttft_p50_64"]["pass"] is False  # TTFT p50 at most 2x
    assert t["ours-serving_tokens_per_s_64"]["pass"] is True
    assert "ours-serving_tokens_per_s_8" not in t  # not measured: not judged
    assert t["hot_swap_pause_default"]["pass"] is True
    json.dumps(t)  # goes into the JSON as it is


def test_tables_and_plot(bench, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    report = make_report(bench)
    report["targets"] = bench.targets(report)
    bench.print_table(report)
    bench.print_targets(report)
    out = capsys.readouterr().out
    main_table = out.split("`vllm bench serve`-style")[0]
    rows = {" ".join(line.split()[:2]): line for line in main_table.splitlines() if line.startswith("ours-")}
    assert rows["ours-loop 64"].split()[5] == "0.90"  # tokens/s x vllm
    # p99 latency x vllm: (0.3 s TTFT + 7 gaps of 30 ms) against (0.1 s + 7 of 20 ms), + 1 ms each
    assert rows["ours-loop 64"].split()[9] == f"{0.511 / 0.241:.2f}"
    assert "TPOT p50" in out and "ITL p99" in out
    assert "no users" in out and "6.40" in out  # the trainer's rollouts/s with no users
    assert "ours-loop at 64 clients, ttft_p50 / vLLM's <= 2.0: 3.00x  FAIL" in out
    assert "ours-loop served several policy versions" in out
    png = tmp_path / "serving.png"
    bench.plot(report, png)
    assert png.stat().st_size > 10_000


def test_the_first_chunk_gap_shows_a_first_chunk_that_came_with_the_second(bench) -> None:
    paced = level(bench, 4, gap_s=0.02, ttft_s=0.1, wall=1.0)
    late = results(bench, 4, gap_s=0.02, tokens=16, ttft_s=0.1)
    for r in late:  # the first chunk read together with the second
        r.content_times[0] = r.content_times[1] - 0.0001
    assert paced["first_chunk_gap_ms_p50"] == pytest.approx(20.0)
    assert bench.summarise(late, 1.0, 4)["first_chunk_gap_ms_p50"] == pytest.approx(0.1)


def test_the_gateway_hop_is_the_ttft_difference_between_the_two_paths(bench, capsys) -> None:
    out = {
        "http": (results(bench, 10, gap_s=0.02, tokens=8, ttft_s=0.050), 5.0),
        "grpc": (results(bench, 10, gap_s=0.02, tokens=8, ttft_s=0.015), 5.0),
    }
    hop = bench.gateway_hop_figures(out)
    assert hop["gateway_adds_ttft_ms"]["p50"] == pytest.approx(35.0)
    assert hop["http"]["requests_done"] == hop["grpc"]["requests_done"] == 10
    bench.print_gateway_hop({"8": hop})
    printed = capsys.readouterr().out
    assert "The gateway hop alone" in printed and "35.0" in printed
