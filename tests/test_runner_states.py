"""The runner's loops as one state machine: the routes table in docs/architecture.md is
the code's, and loops move as it says (no server needed)."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import re
import threading
from pathlib import Path

import pytest

import neopool
from forking import checks_in_a_forked_child
from neopool import _fork, runner
from neopool.runner import MOVES, LoopState, Route

pytestmark = pytest.mark.timeout(60)

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def routes_table() -> dict[str, set[tuple[str, str]]]:
    """``{route: {(from, to), ...}}`` as the table in docs/architecture.md has them."""
    section = ARCHITECTURE.read_text().split("### How a runner loop ends")[1].split("\n#")[0]
    table = {}
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        moves = set()
        for chain in re.findall(r"[A-Z_]+(?: → [A-Z_]+)+", cells[2]):
            states = chain.split(" → ")
            moves.update(itertools.pairwise(states))
        table[cells[0].strip("`")] = moves
    return table


def test_the_routes_table_lists_every_route_and_every_move_the_machine_makes() -> None:
    table = routes_table()
    assert set(table) == {route.name for route in Route}
    allowed = {(before.name, after.name) for before, after in MOVES}
    for route, moves in table.items():
        assert moves, f"{route}: no moves in the table"
        assert moves <= allowed, f"{route}: moves the machine does not make: {moves - allowed}"
    assert set().union(*table.values()) == allowed, "a move no route makes"


def test_every_route_is_taken_somewhere_in_the_runner() -> None:
    source = inspect.getsource(runner)
    for route in Route:
        assert f"Route.{route.name}" in source, route


def test_a_move_the_machine_does_not_make_changes_nothing() -> None:
    loop = runner._ThreadLoop(threading.current_thread())
    try:
        assert loop.state is LoopState.OPEN
        assert loop.close(1, Route.CLOSE_THREAD_LOOP)
        assert loop.state is LoopState.CLOSED
        assert not runner._move(loop, LoopState.CLOSING, Route.CLOSE_ALL_LOOPS)
        assert not runner._move(loop, LoopState.OPEN, Route.CLOSE_ALL_LOOPS)
        assert loop.state is LoopState.CLOSED
    finally:
        loop.close(1, Route.CLOSE_THREAD_LOOP)


def test_a_close_inside_a_call_is_requested_and_done_when_the_call_returns() -> None:
    seen: list[LoopState] = []

    async def close_from_inside() -> None:
        neopool.runner.close_thread_loop()
        seen.append(runner._thread_loop().state)

    neopool.run(close_from_inside())
    holder = runner._local.holder
    assert seen == [LoopState.CLOSE_REQUESTED]
    assert holder is None or holder.state.state is LoopState.CLOSED
    assert neopool.run(asyncio.sleep(0, "a new loop")) == "a new loop"
    runner.close_thread_loop()


def test_the_process_loop_moves_to_closed_whichever_way_it_ends() -> None:
    runner.use_process_loop()
    try:
        first = runner._the_process_loop()
        assert first.state is LoopState.OPEN
        assert runner.close_process_loop(5)
        assert first.state is LoopState.CLOSED
        assert first.ending is Route.CLOSE_PROCESS_LOOP

        async def stop() -> None:
            asyncio.get_running_loop().stop()
            await asyncio.sleep(30)

        second = runner._the_process_loop()
        with pytest.raises(neopool.CallCancelled):
            neopool.run(stop())
        assert second.finished.wait(5)
        assert second.state is LoopState.CLOSED
        assert second.ending is Route.LOOP_STOPPED
    finally:
        runner.use_process_loop(False)
        runner.close_process_loop(5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_sees_the_parents_loops_inherited_and_starts_empty() -> None:
    parent_loop = runner.thread_loop()

    def in_the_child() -> list[bool]:
        (state,) = [s for s in [runner._local.holder.state] if s.loop is parent_loop]
        return [
            state._state is LoopState.INHERITED,  # moved by the fork hook's step
            not runner._rt.threads,
            runner.calls_in_flight() == 0,
            neopool.run(asyncio.sleep(0, 1)) == 1,
            runner.thread_loop() is not parent_loop,
            not parent_loop.is_closed(),
        ]

    assert checks_in_a_forked_child(in_the_child) == [True] * 6
    assert runner.thread_loop() is parent_loop  # the parent's is its own still
    runner.close_thread_loop()


def test_the_fork_hook_runs_its_steps_in_their_named_order() -> None:
    import neopool.database  # noqa: F401  (adds its step)

    assert _fork.steps()[:3] == [_fork.Step.POOLS, _fork.Step.LOOPS, _fork.Step.DATABASE]
    assert list(_fork.Step) == sorted(_fork.Step)


def test_the_registry_does_not_import_the_runner() -> None:
    source = inspect.getsource(neopool.registry)
    assert "import runner" not in source
    assert "neopool.runner" not in source


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_lightrags_state_is_made_anew_by_its_step_of_the_one_fork_hook() -> None:
    pytest.importorskip("lightrag")
    from neopool.integrations import lightrag as integration

    assert _fork.Step.LIGHTRAG in _fork.steps()
    assert "register_at_fork" not in inspect.getsource(integration)
    with integration._dropped.lock:  # held by a parent thread at the moment of fork
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child answers by its exit code
            os._exit(0 if integration._dropped.lock.acquire(timeout=5) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
