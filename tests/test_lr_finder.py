"""The learning-rate range test: real sweeps in a real child on the demo model, the suggestion rule, and the
pre-flight screen's key that runs a sweep and hands its rate to the run."""

from __future__ import annotations

import argparse
import asyncio
import math
import os

import pytest
import torch

from elite_core import protocol
from elite_core.config import RunConfig, default_config
from elite_core.dataset import build_dataset
from elite_core.lr_finder import (DIVERGENCE_FACTOR, LR_FIND_DIR, LR_FIND_FILE, MAX_STEPS, LrFindRequest,
                                  LrFindResult, has_diverged, round_rate, smoothed_losses, suggest_learning_rate)
from elite_core.preflight import find_learning_rate
from tui_helpers import error_text, screen_name, wait_until


@pytest.fixture(scope="module", autouse=True)
def shared_profile_cache(tmp_path_factory):
    """One hardware profile for the module's children, measured once, outside the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ELITE_TUI_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        # One torch thread per child: two spinning OpenMP threads beside another torch process on 2 cores are 30x slower.
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def small_demo_config(tmp_path, repo, **overrides) -> RunConfig:
    """256-token windows of the demo: a sweep step takes tens of milliseconds on a CPU core."""
    values = {"run_name": "r", "eval_fraction": 0.0, "context_tokens": 192, "target_tokens": 64, "lora_rank": 8,
              "lora_alpha": 16, **overrides}
    return default_config("demo", str(repo), str(tmp_path / "runs"), **values)


def assert_well_formed(result: LrFindResult, request: LrFindRequest) -> None:
    steps = len(result.lrs)
    assert 1 <= steps <= request.steps and len(result.losses) == len(result.smoothed) == steps
    assert all(later > earlier for earlier, later in zip(result.lrs, result.lrs[1:])), "rates not strictly rising"
    assert result.lrs == pytest.approx(request.learning_rates()[:steps], rel=1e-6), "the optimizer ran other rates"
    assert result.smoothed == pytest.approx(smoothed_losses(result.losses))
    assert math.isfinite(result.suggested_lr) and result.lrs[0] <= result.suggested_lr <= result.lrs[-1]
    best = min(range(steps), key=lambda index: result.smoothed[index])
    assert result.min_loss_lr == result.lrs[best]
    assert result.suggested_lr == min(max(round_rate(result.min_loss_lr / 10), result.lrs[0]), result.lrs[-1])


# Real sweeps in a child process


def test_a_sweep_on_the_demo_records_one_loss_per_rising_rate(tmp_path, tiny_repo):
    config = small_demo_config(tmp_path, tiny_repo)
    # Up to 3e-2: the pretrained demo diverges in the last two steps of a sweep to 1e-1 (the test below covers that)
    request = LrFindRequest(steps=30, min_lr=1e-6, max_lr=3e-2)
    events = []
    result = find_learning_rate(config, request, timeout_s=120, on_event=events.append)

    assert not result.stopped_early and result.stop_reason == "", result.stop_reason
    assert len(result.lrs) == request.steps
    assert_well_formed(result, request)
    assert all(math.isfinite(loss) for loss in result.losses)
    # The pretrained demo starts far below chance (ln 259 = 5.56) and learns the tiny repository at the higher rates:
    # the sweep really trained.
    assert result.losses[0] < 2.0
    assert min(result.smoothed) < result.smoothed[0] - 0.5
    assert result.suggested_lr < result.min_loss_lr
    on_this_machine = "cuda" if torch.cuda.is_available() else "cpu"
    assert (result.model, result.device, result.window_tokens, result.tokens_per_update) == ("demo", on_this_machine,
                                                                                             256, 256)
    assert 0 < result.elapsed_s < 60

    steps = [event for event in events if isinstance(event, protocol.StepMetrics)]
    assert [(event.lr, event.loss) for event in steps] == list(zip(result.lrs, result.losses))
    assert isinstance(events[-1], protocol.Finished) and events[-1].step == request.steps
    assert LrFindResult.load(config.run_dir / LR_FIND_FILE) == result
    assert not (config.run_dir / LR_FIND_DIR).exists(), "the sweep's scratch directory stayed behind"
    assert not (config.run_dir / "checkpoints").exists() and not (config.run_dir / "adapter").exists()
    print(f"demo sweep: suggested {result.suggested_lr:.1e} (lowest smoothed loss at {result.min_loss_lr:.1e}), "
          f"{result.elapsed_s:.1f} s of steps")


def test_a_sweep_up_to_an_absurd_rate_stops_when_the_loss_diverges(tmp_path, tiny_repo):
    config = small_demo_config(tmp_path, tiny_repo)
    request = LrFindRequest(steps=20, min_lr=1e-4, max_lr=10.0)
    events = []
    result = find_learning_rate(config, request, timeout_s=120, on_event=events.append)

    assert result.stopped_early and result.stop_reason == "diverged"
    assert len(result.lrs) < request.steps and result.lrs[-1] < request.max_lr
    assert_well_formed(result, request)
    assert has_diverged(result.smoothed) and not has_diverged(result.smoothed[:-1]), "it ran past the divergence"
    finite = [value for value in result.smoothed if math.isfinite(value)]
    assert not math.isfinite(result.smoothed[-1]) or result.smoothed[-1] > DIVERGENCE_FACTOR * min(finite)
    assert result.suggested_lr < result.lrs[-1] / 10
    assert isinstance(events[-1], protocol.Finished) and events[-1].stopped_early
    print(f"diverged at {result.lrs[-1]:.2g} after {len(result.lrs)} steps; suggested {result.suggested_lr:.1e}")


def test_the_time_bound_ends_a_sweep_after_its_first_step(tmp_path, tiny_repo):
    """In this process, on the engine itself: the first step always runs, so even a spent bound leaves a result."""
    from elite_core.lr_finder import run_lr_find
    from elite_core.training import TrainingEngine

    config = small_demo_config(tmp_path, tiny_repo)
    request = LrFindRequest(steps=10, deadline_s=1e-9)
    events = []
    engine = TrainingEngine(config, config.run_dir, emit=events.append, poll_commands=lambda: [],
                            probe_steps=request.steps)
    result = run_lr_find(engine, request, events.append)
    assert result.stop_reason == "deadline" and len(result.lrs) == 1 and result.lrs[0] == request.min_lr
    assert result.suggested_lr == request.min_lr and "never fell" in result.note
    assert [type(event) for event in events] == [protocol.StepMetrics]


# The parts around the child


def test_a_request_travels_on_the_child_command_line():
    request = LrFindRequest(steps=12, min_lr=3e-7, max_lr=0.25, deadline_s=42.5)
    parser = argparse.ArgumentParser()
    LrFindRequest.add_arguments(parser)
    assert LrFindRequest.from_args(parser.parse_args(request.child_args())) == request
    assert LrFindRequest.from_args(parser.parse_args([])) is None
    rates = request.learning_rates()
    assert rates[0] == 3e-7 and rates[-1] == pytest.approx(0.25) and len(rates) == 12
    ratios = [later / earlier for earlier, later in zip(rates, rates[1:])]
    assert ratios == pytest.approx([ratios[0]] * 11), "not evenly spaced on a log scale"
    for bad in ({"steps": MAX_STEPS + 1}, {"steps": 1}, {"min_lr": 1e-2, "max_lr": 1e-3}, {"deadline_s": 0}):
        with pytest.raises(ValueError):
            LrFindRequest(**bad)


def test_the_suggestion_is_a_tenth_of_the_rate_at_the_lowest_smoothed_loss():
    lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    suggested, at_min, note = suggest_learning_rate(lrs, [5.0, 4.0, 2.0, 3.0, 9.0], diverged=True)
    assert (suggested, at_min, note) == (1e-4, 1e-3, "")
    # Falling to the end: a tenth of the top rate, with a note that a wider range may do better.
    suggested, at_min, note = suggest_learning_rate(lrs, [5.0, 4.0, 3.0, 2.0, 1.0])
    assert (suggested, at_min) == (1e-2, 1e-1) and "still fell" in note
    # Rising from the start: clamped to the lowest rate swept, and said so.
    suggested, _, note = suggest_learning_rate(lrs, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert suggested == 1e-5 and "never fell" in note
    # A non-finite loss never wins, and a suggestion is rounded to two significant digits.
    suggested, at_min, _ = suggest_learning_rate([3.16e-4, 3.16e-3, 3.16e-2], [4.0, 1.0, math.nan])
    assert (suggested, at_min) == (3.2e-4, 3.16e-3)
    with pytest.raises(ValueError):
        suggest_learning_rate([1e-3], [math.inf])


def test_smoothing_and_divergence():
    assert smoothed_losses([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0]), "bias correction keeps a flat curve"
    smoothed = smoothed_losses([4.0, 2.0])
    assert smoothed[0] == 4.0 and 2.0 < smoothed[1] < 4.0
    assert not has_diverged([]) and not has_diverged([3.0, 1.0, 3.9])
    assert has_diverged([3.0, 1.0, 4.1]) and has_diverged([3.0, math.nan]) and has_diverged([3.0, math.inf])


# The pre-flight screen


def test_the_preflight_key_sweeps_and_the_run_takes_the_found_rate(tmp_path, tiny_repo, cpu_profile):
    """Real checks (the probe's child), a real sweep (a second child) from key l, key a, then the run itself: its
    config.yaml carries the found rate, and so does the config the wizard holds."""
    from elite_core.model_loading import load_model_shape
    from elite_tui.app import EliteApp
    from elite_tui.state import WizardState

    config = small_demo_config(tmp_path, tiny_repo, max_steps=1, compile_eval_prompts=0, eval_every_steps=0)
    summary = build_dataset(config.repo, config.run_dir / "dataset", tokenizer_source=config.model,
                            eval_fraction=config.eval_fraction, seed=config.seed)
    state = WizardState(config=config, profile=cpu_profile, shape=load_model_shape("demo"), summary=summary)

    async def scenario():
        app = EliteApp(config, start_at="preflight", state=state)
        async with app.run_test(size=(100, 40)) as pilot:
            screen = app.screen
            await wait_until(pilot, lambda: not screen.running, 90, "the pre-flight checks")
            assert screen.passed, [(r.name, r.message) for r in state.preflight_results if not r.ok]
            assert not screen.can_use_lr()
            await pilot.press("l")
            assert screen.finding_lr and not screen.can_advance()
            await wait_until(pilot, lambda: not screen.finding_lr, 90, "the learning-rate sweep")
            assert not error_text(pilot), error_text(pilot)
            result = screen.lr_result
            panel = str(screen.query_one("#lr-find").render())
            assert f"Suggested learning rate {result.suggested_lr:.1e}" in panel and "press a" in panel
            await pilot.pause()
            assert screen.query_one("#lr-find").display and screen.query_one("#lr-find-plot").display
            await pilot.press("a")
            await pilot.pause()
            assert "The run uses it" in str(screen.query_one("#lr-find").render())
            assert not screen.can_use_lr(), "the rate is taken: nothing left to accept"
            await pilot.press("ctrl+n")
            await wait_until(pilot, lambda: screen_name(pilot) == "MonitorScreen", 5, "the monitor")
            await wait_until(pilot, lambda: state.finished is not None or state.training_error is not None, 90,
                             "the one-step run")
            return result

    result = asyncio.run(scenario())
    assert state.training_error is None, state.training_error
    assert math.isfinite(result.suggested_lr) and result.lrs[0] <= result.suggested_lr <= result.lrs[-1]
    assert result.suggested_lr != config.learning_rate, "the test cannot tell the found rate from the default"
    assert state.config.learning_rate == result.suggested_lr
    assert RunConfig.load(config.run_dir / "config.yaml").learning_rate == result.suggested_lr
    assert LrFindResult.load(config.run_dir / LR_FIND_FILE) == result
    assert os.path.isdir(state.finished.adapter_path)


# On a CUDA GPU


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
def test_a_sweep_on_a_real_gpu(tmp_path, tiny_repo):
    """The same sweep under the GPU's precision, autocast and fused AdamW: the rates reach the fused optimizer too."""
    config = small_demo_config(tmp_path, tiny_repo, context_tokens=3584, target_tokens=512)
    request = LrFindRequest()
    result = find_learning_rate(config, request, timeout_s=300)
    print(f"GPU sweep: {len(result.lrs)} steps in {result.elapsed_s:.1f} s, suggested {result.suggested_lr:.1e}, "
          f"stop {result.stop_reason or 'none'}, note {result.note or 'none'}")
    assert result.device == "cuda"
    assert_well_formed(result, request)
    assert result.stop_reason in ("", "diverged")


def test_cli_refuses_a_sweep_it_cannot_run(capsys):
    from elite_tui.cli import main

    assert main(["lr-find", "--steps", "99"]) == 2
    assert "the sweep takes 2 to 40 steps, not 99" in capsys.readouterr().err
    assert main(["lr-find", "--min-lr", "0.1", "--max-lr", "0.01"]) == 2
    assert "0 < min_lr < max_lr" in capsys.readouterr().err


def test_the_cli_suggestion_is_a_run_line_that_trains_what_was_swept(tiny_repo, tmp_path, monkeypatch, capsys):
    """Copied as printed, the suggestion must train the swept repository at the swept tier and settings, not the
    demo on the current directory."""
    import shlex

    from elite_tui.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ELITE_TUI_CACHE_DIR", str(tmp_path / "cache"))
    sets = ["--set", "device=cpu", "--set", "context_tokens=192", "--set", "target_tokens=64", "--set", "lora_rank=8",
            "--set", "eval_every_steps=0", "--set", "compile_eval_prompts=0", "--set", "eval_fraction=0"]
    assert main(["lr-find", "--repo", str(tiny_repo), "--output", "sweeps", "--tier", "1", "--steps", "6", *sets]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("use it: "))
    words = shlex.split(line.removeprefix("use it: ").split("  (kept in")[0])
    assert words[:2] == ["elite-tui", "run"]
    assert words[words.index("--repo") + 1] == str(tiny_repo) and words[words.index("--tier") + 1] == "1"
    suggested = float(words[-1].removeprefix("learning_rate="))
    assert main([*words[1:], "--output", "runs", "--run-name", "copied", "--max-steps", "1", "--preflight", "off"]) == 0
    trained = RunConfig.load(tmp_path / "runs" / "copied" / "config.yaml")
    assert trained.repo == str(tiny_repo) and trained.context_tokens == 192 and trained.tier == 1
    assert trained.learning_rate == pytest.approx(suggested)
