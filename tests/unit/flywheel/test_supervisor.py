"""The supervisor's rules without processes (stand-in units), then with real child processes through
the launcher's service units: a dead process is restarted with backoff, counted and logged; a
crash loop gives up naming the process and quoting its last lines; a set stop restarts nothing."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY

from flywheel.supervisor import (
    CrashHistory,
    GiveUp,
    OutputTail,
    RestartPolicy,
    Supervisor,
    backoff_s,
    tail_lines,
)

FAST = RestartPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, max_restarts=3, window_s=60.0, poll_s=0.01)


def restarts(name: str) -> float:
    return REGISTRY.get_sample_value("rlhf_up_restarts_total", {"service": name}) or 0.0


class FakeUnit:
    """Dies ``deaths`` times (each restart brings it back), then runs; ``fail_restarts`` restarts raise."""

    def __init__(self, name: str, deaths: int, fail_restarts: int = 0, lines: list[str] | None = None):
        self.name = name
        self.deaths = deaths
        self.fail_restarts = fail_restarts
        self.alive = False
        self.restarted_at: list[float] = []
        self.lines = lines or []

    def exit_code(self) -> int | None:
        return None if self.alive else 3

    def restart(self, stop: threading.Event) -> None:
        self.restarted_at.append(time.monotonic())
        if self.fail_restarts:
            self.fail_restarts -= 1
            raise RuntimeError("not healthy in time")
        self.deaths -= 1
        self.alive = self.deaths <= 0

    def last_lines(self) -> list[str]:
        return self.lines


def run_until(supervisor: Supervisor, done: Callable[[], bool], timeout_s: float = 5.0) -> GiveUp | None:
    stop = threading.Event()
    result: list[GiveUp | None] = []
    thread = threading.Thread(target=lambda: result.append(supervisor.run(stop)))
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and not done() and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    return result[0]


def test_backoff_doubles_per_recent_restart_up_to_the_cap():
    assert [backoff_s(n, 1.0, 30.0) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_s(10_000, 0.5, 10.0) == 10.0  # no overflow on a huge count


def test_crash_history_counts_restarts_in_the_window_only():
    history = CrashHistory(max_restarts=2, window_s=10.0)
    history.record(0.0)
    history.record(5.0)
    assert history.recent(9.0) == 2 and history.crash_looping(9.0)
    assert history.recent(12.0) == 1 and not history.crash_looping(12.0)  # the first left the window
    assert history.recent(20.0) == 0


def test_a_dead_unit_is_restarted_counted_and_logged(caplog):
    unit = FakeUnit("feedback-fake", deaths=1)
    before = restarts("feedback-fake")
    with caplog.at_level(logging.INFO):
        gave_up = run_until(Supervisor([unit], FAST), lambda: unit.alive)
    assert gave_up is None and unit.alive and len(unit.restarted_at) == 1
    assert restarts("feedback-fake") == before + 1
    logged = {r.getMessage(): r.fields for r in caplog.records if r.name == "flywheel.supervisor"}
    died = logged["process died; restarting it"]
    assert (died["service"], died["exit_code"], died["restarts_in_window"]) == ("feedback-fake", 3, 0)
    assert logged["process restarted"]["service"] == "feedback-fake"


def test_backoff_grows_between_restarts_of_one_unit():
    policy = RestartPolicy(initial_backoff_s=0.05, max_backoff_s=1.0, max_restarts=5, window_s=60.0, poll_s=0.01)
    unit = FakeUnit("grows", deaths=3)
    assert run_until(Supervisor([unit], policy), lambda: unit.alive) is None
    gaps = [b - a for a, b in zip(unit.restarted_at, unit.restarted_at[1:], strict=False)]
    # waits of 0.05, 0.1, 0.2 s: the second gap holds the 0.2 s wait, the first the 0.1 s one
    assert len(gaps) == 2 and gaps[0] >= 0.1 and gaps[1] >= 0.2


def test_a_crash_loop_gives_up_naming_the_unit_and_quoting_its_last_lines():
    unit = FakeUnit("looper", deaths=100, lines=["starting", "ValueError: bad config"])
    steady = FakeUnit("steady", deaths=0)
    steady.alive = True
    gave_up = run_until(Supervisor([steady, unit], FAST), lambda: False)
    assert gave_up is not None and gave_up.name == "looper" and gave_up.exit_code == 3
    assert len(unit.restarted_at) == FAST.max_restarts and gave_up.restarts == FAST.max_restarts
    message = gave_up.message()
    assert "looper keeps dying" in message and "restarted 3 times within 60 s" in message
    assert "  | ValueError: bad config" in message


def test_a_restart_that_fails_counts_as_another_crash():
    unit = FakeUnit("slow-start", deaths=1, fail_restarts=1)
    before = restarts("slow-start")
    assert run_until(Supervisor([unit], FAST), lambda: unit.alive) is None
    assert unit.alive and len(unit.restarted_at) == 2 and restarts("slow-start") == before + 2


def test_nothing_is_restarted_once_stop_is_set():
    unit = FakeUnit("stopping", deaths=1)
    stop = threading.Event()
    stop.set()
    assert Supervisor([unit], FAST).run(stop) is None
    # a death seen while the stop comes in: the backoff wait returns at once, no restart
    slow = RestartPolicy(initial_backoff_s=5.0, max_backoff_s=5.0, max_restarts=3, window_s=60.0, poll_s=0.01)
    supervisor = Supervisor([unit], slow)
    threading.Timer(0.1, stop.set).start()
    stop.clear()
    started = time.monotonic()
    assert supervisor.handle_exit(unit, 3, stop) is None
    assert time.monotonic() - started < 2 and unit.restarted_at == []


def test_tail_lines_reads_the_end_of_a_file(tmp_path):
    log = tmp_path / "svc.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)) + "x" * 5000 + "\n")
    lines = tail_lines(log, n=3)
    assert lines[:2] == ["line 998", "line 999"] and len(lines[2]) == 400  # cut to TAIL_LINE_CHARS
    assert tail_lines(tmp_path / "missing.log") == []


def test_output_tail_copies_lines_and_keeps_the_last_ones():
    read, write = os.pipe()
    sink_read, sink_write = os.pipe()
    tail = OutputTail(n=2)
    with open(sink_write, "wb") as sink:
        thread = tail.pump(open(read, "rb"), sink)  # noqa: SIM115 - the pump closes it
        with open(write, "wb") as w:
            w.write(b"one\ntwo\nthree\n")
        thread.join(5)
    assert tail.last() == ["two", "three"]
    with open(sink_read, "rb") as copied:
        assert copied.read() == b"one\ntwo\nthree\n"


# --- with real processes: the launcher's service units -------------------------------------------


@pytest.mark.parametrize("to_files", [True, False], ids=["log-dir", "terminal"])
def test_a_real_process_that_keeps_exiting_is_restarted_then_given_up(tmp_path, to_files, capfd):
    from flywheel.launcher import ServiceProcess, Stack, UpConfig
    from shared.config import load_config

    env = {"RLHF_UP_RESTART_MAX": "2", "RLHF_UP_RESTART_BACKOFF_S": "0.05", "RLHF_UP_RESTART_MAX_BACKOFF_S": "0.1"}
    if to_files:
        env["RLHF_UP_LOG_DIR"] = str(tmp_path / "logs")
    stack = Stack(load_config(UpConfig, env), {"PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join(sys.path)})
    # `python -m this` prints the Zen of Python and exits 0: healthy at once, dead right after.
    svc = ServiceProcess("zen", "this", ready=lambda: True, endpoints={})
    stack._spawn(svc)
    first_pid = svc.proc.pid
    before = restarts("zen")
    stop = threading.Event()
    threading.Timer(30, stop.set).start()  # a bound, should the give-up never come
    gave_up = stack.supervise(stop)
    stop.set()
    assert gave_up is not None and gave_up.name == "zen" and gave_up.exit_code == 0
    assert svc.proc.pid != first_pid and restarts("zen") == before + 2
    assert "Namespaces are one honking great idea" in gave_up.message()
    if not to_files:  # its output still reached the terminal
        assert "Beautiful is better than ugly." in capfd.readouterr().out
    stack.stop()
