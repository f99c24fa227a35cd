"""Loss per step (with the projected curve and its band to the last step) and memory per step (GiB, with the
predicted peak as a line), redrawn on demand."""

from __future__ import annotations

from textual_plotext import PlotextPlot

from elite_core.estimates import loss_axis_range
from elite_tui.format import bytes_to_gib


class LossPlot(PlotextPlot):
    def on_mount(self) -> None:
        self.draw([], [], [], [])

    def draw(self, steps: list[int], losses: list[float], eval_steps: list[int], eval_losses: list[float],
             projection=None) -> None:
        """`projection` is an elite_core.estimates.LossProjection, or None before there are enough steps to fit."""
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("loss" if projection is None else f"loss (projected final {projection.final_loss:.3f})")
        plt.xlabel("step")
        if steps:
            plt.plot(steps, losses, marker="braille", label="train")
        if eval_steps:
            plt.scatter(eval_steps, eval_losses, marker="o", label="eval")
        if projection is not None and len(projection.curve_steps) > 1:
            curve_steps = list(projection.curve_steps)
            plt.plot(curve_steps, list(projection.curve_loss), marker="braille", color="orange", label="projected")
            # plotext has no filled band: its edges as two dotted lines
            plt.plot(curve_steps, list(projection.curve_low), marker="dot", color="gray")
            plt.plot(curve_steps, list(projection.curve_high), marker="dot", color="gray")
            plt.ylim(*loss_axis_range([*losses, *eval_losses, *projection.curve_loss], projection.curve_low,
                                      projection.curve_high))
        self.refresh()


class MemoryPlot(PlotextPlot):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.memory_name = "memory"

    def on_mount(self) -> None:
        self.draw([], [], None)

    def draw(self, steps: list[int], memory_bytes: list[int], predicted_peak_bytes: int | None) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(f"{self.memory_name} GiB (line: predicted peak)")
        plt.xlabel("step")
        if steps:
            plt.plot(steps, [bytes_to_gib(count) for count in memory_bytes], marker="braille")
        if predicted_peak_bytes:
            peak_gib = bytes_to_gib(predicted_peak_bytes)
            plt.hline(peak_gib, "red")
            values = [peak_gib, *(bytes_to_gib(count) for count in memory_bytes)]
            # Zoom on the band where measured and predicted meet; from 0 both lines would merge into one.
            plt.ylim(min(values) * 0.9, max(values) * 1.05)
        self.refresh()
