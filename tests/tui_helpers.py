"""Helpers for pilot tests: wait for a condition while the app keeps running, without fixed sleeps."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any, Callable, Coroutine


async def wait_until(pilot, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    started = time.monotonic()
    deadline = started + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; screen: "
                                 f"{type(pilot.app.screen).__name__}")
        await pilot.pause(0.1)
    if time.monotonic() - started > 1.0:
        print(f"waited {time.monotonic() - started:.1f} s for {what}")


def screen_name(pilot) -> str:
    return type(pilot.app.screen).__name__


def error_text(pilot) -> str:
    from elite_tui.widgets.error_panel import ErrorPanel

    panels = pilot.app.screen.query(ErrorPanel)
    return str(panels.first().render()) if panels and panels.first().shown else ""


EXIT_PRESS_TIMEOUT_S = 10.0


async def press_to_exit(pilot, key: str) -> None:
    """Press a key that exits the app, then check that it did.

    Two fresh-clone CI runs of the wizard walk hung after training; in the second, run_pilot's task stacks ended at
    the `pilot.press("ctrl+n")` that quits from the Report screen. After the key, textual 8's Pilot.press waits for
    the app's animations to complete (Animator.wait_until_complete), the one wait in it without a timeout. The likely
    cause (not reproduced): the app stops its animator as its message loop ends, and an animation started after
    that, as the screens close, leaves the wait unset for good. So the press is bounded here; whether the app itself
    shuts down is still checked by the `async with app.run_test()` that follows, under the same watchdog."""
    try:
        await asyncio.wait_for(pilot.press(key), EXIT_PRESS_TIMEOUT_S)
    except asyncio.TimeoutError:
        print(f"pilot.press({key!r}) still waited for the animator {EXIT_PRESS_TIMEOUT_S:.0f} s after the key; "
              f"the app's return code: {pilot.app.return_code}")
    assert pilot.app.return_code is not None, f"{key!r} did not exit the app"


def run_pilot(scenario: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
    """asyncio.run(scenario), but a scenario still pending after timeout_s fails with every pending task's stack.
    pytest-timeout's dump shows only the threads, and a stuck pilot test sits idle in the event loop's select: what it
    waits for is in the tasks (one CI run of the wizard walk hung there after its training had ended)."""

    async def watched():
        task = asyncio.ensure_future(scenario)
        done, _ = await asyncio.wait([task], timeout=timeout_s)
        if task in done:
            return task.result()
        stacks = io.StringIO()
        for pending in asyncio.all_tasks():
            if pending is not asyncio.current_task():
                pending.print_stack(limit=12, file=stacks)
        print(stacks.getvalue(), flush=True)  # captured in the report even if the shutdown below hangs too
        task.cancel()
        raise AssertionError(f"the pilot scenario did not end in {timeout_s:.0f} s; pending tasks above")

    return asyncio.run(watched())
