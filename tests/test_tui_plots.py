"""The monitor's loss plot keeps the losses readable when the projection's band is wide."""

from __future__ import annotations

import asyncio
import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from textual.app import App

from elite_core.estimates import BAND_MARGIN, loss_axis_range, project_loss
from elite_tui.widgets.training_plots import LossPlot


DEMO_RUNS = Path(__file__).resolve().parents[1] / "bench" / "results" / "projection-cpu-pretrained-demo50-fixture.jsonl"


def _first_fifth_of_a_demo_run():
    """The first 10 steps of a recorded 50-step CPU demo run (seed 14): one window a step, about 20 % apart."""
    run = next(row for row in map(json.loads, DEMO_RUNS.read_text().splitlines())
               if row["run"] == "tier2-steps50-seed14")
    steps, losses, lrs = run["steps"][:10], np.array(run["losses"][:10]), run["lrs"][:10]
    projection = project_loss(steps, losses.tolist(), run["steps"][-1], lrs)
    assert projection is not None
    return steps, losses, projection


def _y_tick_labels(svg: str) -> list[float]:
    """The numbers the plot prints left of its axis ticks (a tick is the '┤' after them)."""
    text = html.unescape(re.sub(r"<[^>]+>", "", svg))
    return [float(value) for value in re.findall(r"(\d+\.\d+)\s*┤", text)]


def test_the_axis_keeps_the_losses_and_cuts_a_band_that_would_squash_them():
    low, high = loss_axis_range([1.0, 2.0, 1.5], [0.1, 0.5], [3.0, 9.9])
    assert (low, high) == pytest.approx((1.0 - BAND_MARGIN, 2.0 + BAND_MARGIN))
    # a narrow band is shown whole
    assert loss_axis_range([1.0, 2.0], [0.9], [2.2]) == pytest.approx((0.9, 2.2))
    # the losses and the curve always are, even where the band lies inside them
    assert loss_axis_range([1.0, 2.0], [1.5], [1.6]) == pytest.approx((1.0, 2.0))


def test_a_wide_band_leaves_the_losses_most_of_the_plot():
    steps, losses, projection = _first_fifth_of_a_demo_run()
    assert projection.final_loss_high > 2 * losses.max(), "the case this guards: a band far wider than the losses"

    class PlotApp(App):
        def compose(self):
            yield LossPlot()

    async def render() -> str:
        app = PlotApp()
        async with app.run_test(size=(90, 30)) as pilot:
            app.query_one(LossPlot).draw(steps, losses.tolist(), [0], [2.0], projection)
            await pilot.pause()
            return app.export_screenshot()

    ticks = _y_tick_labels(asyncio.run(render()))
    values = [*losses, 2.0, *projection.curve_loss]
    expected_low, expected_high = loss_axis_range(values, projection.curve_low, projection.curve_high)
    assert max(ticks) == pytest.approx(expected_high, abs=0.01)
    assert min(ticks) == pytest.approx(expected_low, abs=0.01)
    # the losses keep a good share of the axis (the band's own range would have left them a fifth or less)
    assert (losses.max() - losses.min()) / (max(ticks) - min(ticks)) > 0.3
    assert max(ticks) < projection.final_loss_high
