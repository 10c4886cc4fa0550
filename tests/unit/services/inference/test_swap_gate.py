import asyncio
import time

from services.inference.swap_gate import SwapGate


def test_swap_waits_for_requests_in_flight_and_holds_new_ones():
    async def scenario():
        gate = SwapGate()
        order: list[str] = []
        release_first = asyncio.Event()

        async def request(name: str, hold: asyncio.Event | None = None):
            async with gate.admit():
                order.append(f"{name} start")
                if hold:
                    await hold.wait()
                order.append(f"{name} end")

        async def swap():
            async with gate.exclusive():
                order.append("swap")

        first = asyncio.create_task(request("a", release_first))
        await asyncio.sleep(0)
        swapping = asyncio.create_task(swap())
        await asyncio.sleep(0)
        late = asyncio.create_task(request("b"))
        await asyncio.sleep(0.01)
        assert gate.swapping and gate.in_flight == 1
        assert order == ["a start"], "neither the swap nor the late request may start while a runs"
        release_first.set()
        await asyncio.gather(first, swapping, late)
        return order

    assert asyncio.run(scenario()) == ["a start", "a end", "swap", "b start", "b end"]


def test_swap_with_nothing_in_flight_is_immediate_and_gate_reopens_after_error():
    async def scenario():
        gate = SwapGate()
        try:
            async with gate.exclusive():
                raise RuntimeError("reload failed")
        except RuntimeError:
            pass
        assert not gate.swapping
        async with gate.admit():
            return gate.in_flight

    assert asyncio.run(scenario()) == 1


def test_wait_idle_admits_new_requests_and_is_bounded():
    async def scenario():
        gate = SwapGate()
        assert await gate.wait_idle(0.01) is True
        release = asyncio.Event()

        async def request():
            async with gate.admit():
                await release.wait()

        running = asyncio.create_task(request())
        await asyncio.sleep(0)
        waiting = asyncio.create_task(gate.wait_idle(5))
        await asyncio.sleep(0.01)
        async with gate.admit():  # the gate stays open while waiting for idle
            admitted = gate.in_flight
        release.set()
        idle = await waiting
        await running
        timed_out = asyncio.create_task(request())
        release.clear()
        await asyncio.sleep(0)
        bounded = await gate.wait_idle(0.05)
        release.set()
        await timed_out
        return admitted, idle, bounded

    assert asyncio.run(scenario()) == (2, True, False)


def test_a_bounded_drain_waits_at_most_its_budget_and_says_what_still_runs():
    async def scenario():
        gate = SwapGate()
        release = asyncio.Event()

        async def request(hold_s: float | None):
            async with gate.admit():
                if hold_s is None:
                    await release.wait()
                else:
                    await asyncio.sleep(hold_s)

        short = asyncio.create_task(request(0.02))
        await asyncio.sleep(0)
        async with gate.exclusive(5.0) as idle_after_short:  # ends well inside the budget
            pass
        await short
        slow = asyncio.create_task(request(None))
        await asyncio.sleep(0)
        started = time.monotonic()
        async with gate.exclusive(0.1) as idle_after_budget:
            waited = time.monotonic() - started
            held = gate.swapping and gate.in_flight == 1
        async with gate.exclusive(0) as idle_at_once:
            pass
        release.set()
        await slow
        return idle_after_short, idle_after_budget, waited, held, idle_at_once

    idle_after_short, idle_after_budget, waited, held, idle_at_once = asyncio.run(scenario())
    assert idle_after_short is True
    assert idle_after_budget is False and held and 0.09 <= waited < 1.0
    assert idle_at_once is False
