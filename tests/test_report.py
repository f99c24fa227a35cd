"""The report of a real (short, in-process) demo run: sections, PNG plots, compile rate, TensorBoard event files."""

import re

import pytest

from elite_core import protocol
from elite_core.config import default_config
from elite_core.evaluation import evaluate_run
from elite_core.metric_sinks import TENSORBOARD_DIR, FanOut, default_sinks, read_scalars
from elite_core.report import PLOT_FILES, PLOTS_DIR, write_report

SMALL = {"context_tokens": 96, "target_tokens": 32, "lora_rank": 4, "lora_alpha": 8, "warmup_steps": 2,
         "eval_every_steps": 5, "checkpoint_every_seconds": 0, "eval_fraction": 0.2, "max_steps": 12}


def test_a_finished_run_gets_plots_estimates_evaluation_and_tensorboard(tmp_path, tiny_repo):
    from elite_core.training import TrainingEngine

    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"), run_name="r", **SMALL)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True)
    config.save(run_dir / "config.yaml")
    events: list = []
    sinks = default_sinks(run_dir)
    assert sinks, "the tensorboard package is missing"
    emit = FanOut(events.append, sinks)
    engine = TrainingEngine(config, run_dir, emit=emit, poll_commands=lambda: [])
    finished = engine.run()
    emit(finished)
    emit.close()
    evaluation = evaluate_run(engine, prompts=2)
    # the child appends events to events.jsonl; this test runs the engine in-process, so it writes them itself
    (run_dir / "events.jsonl").write_text("".join(protocol.encode(e) + "\n" for e in events), encoding="utf-8")

    report = write_report(run_dir, finished).read_text(encoding="utf-8")
    for heading in ("## Results", "## Plots", "## Compile rate on held-out files", "## Hardware and plan",
                    "## Configuration", "## Dataset", "## Artefacts"):
        assert heading in report, heading
    for file_name in PLOT_FILES.values():
        png = run_dir / PLOTS_DIR / file_name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({PLOTS_DIR}/{file_name})" in report and str(png) in report
    assert "held-out loss" in report and "peak memory" in report
    # The base model's held-out loss (step 0) beside the last one: what the fine-tune changed
    assert re.search(r"held-out loss: [0-9.]+ .* at step 12; before training [0-9.]+ \(perplexity [0-9.]+\) "
                     r"\([0-9.]+ % (lower|higher)\)", report), report
    assert f"| before training | {evaluation.before.prompts} |" in report
    # 12 steps are too few to project from their first fifth, enough to fit the whole curve
    assert "## Estimates against what happened" in report and "recommended epochs" in report
    assert "no falling curve" not in report  # too few steps is not a failed fit

    scalars = read_scalars(run_dir / TENSORBOARD_DIR)
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 13))
    losses = [e.loss for e in events if isinstance(e, protocol.StepMetrics)]
    assert [value for _, value in scalars["train/loss"]] == pytest.approx(losses, rel=1e-6)
    # 0: the base model, before training; every 2 steps, not 5: a 12-step run evaluates at least min_evaluations times
    assert [step for step, _ in scalars["eval/loss"]] == [0, 2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("noise,says_why", [(0.2, True), (0.01, False)])
def test_a_wide_projection_band_says_why_and_what_narrows_it(noise, says_why):
    """One window per step scatters the loss by about 20 % (the default CPU demo, bench/results/
    projection-cpu-pretrained-demo50.txt); a large batch by a few percent. 200 steps: the first fifth's 40 fall
    clearly enough to project at 20 % noise (at 50 steps 10 points often do not: the report then says so)."""
    import numpy as np

    from elite_core.report import _estimates_section
    from elite_core.schedule import LrSchedule

    rng = np.random.default_rng(3)
    total = 200
    schedule = LrSchedule(warmup_steps=5, total_steps=total)
    numbers = np.arange(1, total + 1)
    losses = 1.6 * numbers ** -0.1 * np.exp(rng.normal(0, noise, len(numbers)))
    # Training reports the rate the next update will use: factor(step).
    steps = [protocol.StepMetrics(step=int(n), epoch=n / 600, loss=float(loss), lr=3e-3 * float(factor),
                                  tokens_per_s=4000.0, memory_bytes=2**30, elapsed_s=2.5 * float(n))
             for n, loss, factor in zip(numbers, losses, schedule.factors(numbers))]
    started = protocol.Started(run_dir="r", pid=1, device="cpu", total_steps=total, tokens_per_step=10240,
                               trainable_params=1, total_params=1, predicted_peak_bytes=2**30)
    section = "\n".join(_estimates_section(steps, [], started))
    assert "loss projected from the first 20% of steps" in section
    assert "recommended epochs: " in section and "from the first epoch's training loss" in section
    assert ("the band is wide" in section) == says_why
    if says_why:
        scatter = int(re.search(r"scatters (\d+)%", section).group(1))
        assert 15 <= scatter <= 25, section


def test_the_recommended_epochs_say_when_the_held_out_loss_rose():
    from elite_core.report import _estimates_section

    steps = [protocol.StepMetrics(step=n, epoch=n / 50, loss=2.0 * n ** -0.2, lr=1e-3, tokens_per_s=4000.0,
                                  memory_bytes=2**30, elapsed_s=float(n)) for n in range(1, 201)]
    held_out = [1.30, 1.20, 1.15, 1.12, 1.14, 1.18, 1.22]  # lowest at step 80, in the second 50-step epoch
    evals = [protocol.EvalMetrics(step=20 * (i + 1), loss=loss, perplexity=2.0) for i, loss in enumerate(held_out)]
    evals.append(protocol.EvalMetrics(step=200, loss=1.25, perplexity=2.0))
    started = protocol.Started(run_dir="r", pid=1, device="cpu", total_steps=200, tokens_per_step=10240,
                               trainable_params=1, total_params=1, predicted_peak_bytes=2**30)
    section = "\n".join(_estimates_section(steps, evals, started))
    assert ("- recommended epochs: 2 (the held-out loss was lowest at step 80 and rose after it: later steps overfit)"
            in section), section


def test_a_resumed_run_reports_its_surviving_steps_on_one_clock_and_a_diverged_step_does_not_break_it(tmp_path):
    """Steps 1-10, a kill after the step-7 checkpoint, then a resume that trains 8-50 again (their records replace the
    first 8-10), its clock going on from the checkpoint's; step 6 diverged to inf. Steps alternate 1,000 and 3,000
    tokens/s: 2,000 tokens a step, 1 s each on average... so tokens over time is their harmonic mean, 1,500."""
    from elite_core.report import render_report

    config = default_config("demo", str(tmp_path), str(tmp_path / "runs"), run_name="resumed", max_steps=50)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True)
    config.save(run_dir / "config.yaml")

    def step(number, elapsed):
        loss = float("inf") if number == 6 else 2.0 * number ** -0.2
        return protocol.StepMetrics(step=number, epoch=number / 100, loss=loss, lr=1e-3,
                                    tokens_per_s=1000.0 if number % 2 else 3000.0, memory_bytes=2**30,
                                    elapsed_s=elapsed, windows=(number,))

    def started(start_step):
        return protocol.Started(run_dir=str(run_dir), pid=1, device="cpu", total_steps=50, tokens_per_step=1000,
                                trainable_params=1, total_params=2, predicted_peak_bytes=2**30, start_step=start_step)

    events = [started(0), *(step(n, float(n)) for n in range(1, 11)),
              started(7), *(step(n, 12.0 + n - 7) for n in range(8, 51)),
              protocol.Finished(step=50, final_loss=1.0, adapter_path="", report_path="", stopped_early=False,
                                elapsed_s=55.0)]
    (run_dir / "events.jsonl").write_text("".join(protocol.encode(e) + "\n" for e in events), encoding="utf-8")

    report = render_report(run_dir)
    assert "Run finished after 50 steps in 55 s." in report
    assert "- mean throughput: 1,500 tokens/s" in report
    assert "in steps 46-50" in report and "1 step with a non-finite loss (inf or NaN) left out" in report
    # the ETA at 30 s into the last start, from that start's steps: 1 s a step, 12 steps left
    assert "- time: at 43 s the ETA said 12.0 s to go; the rest took 12.0 s (+0.0 %)" in report
