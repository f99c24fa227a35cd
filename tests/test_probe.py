"""Pre-flight probes of real steps: the batch-size finder in a real child, the measured rate, and epoch times per tier."""

from __future__ import annotations

import asyncio
import re

import pytest
from rich.text import Text

from elite_core import protocol
from elite_core.config import default_config
from elite_core.dataset import build_dataset
from elite_core.estimates import EpochTokens, RateCalibration, epoch_tokens_from_repo, epoch_tokens_from_summary
from elite_core.model_loading import load_model_shape
from elite_core.planner import estimated_tokens_per_s, grad_accum_for, plan_for_config, plan_tiers, with_epoch_times
from elite_core.preflight import check_training_step
from elite_core.probe import (MAX_PROBES, PROBE_FILE, ProbeRequest, ProbeResult, ProbeStep, config_with_micro_batch,
                              micro_batch_limit, options_mismatch, probe_request, probe_training,
                              saved_calibration)
from elite_core.units import format_bytes, format_coarse_duration

DURATION = re.compile(r"^(\d+ s|\d+ m \d+ s|\d+ h \d+ m|\d+ d \d+ h)$")


def demo_config(tmp_path, repo, **overrides):
    values = {"run_name": "r", "eval_fraction": 0.0, "warmup_steps": 1, **overrides}
    return default_config("demo", str(repo), str(tmp_path / "runs"), **values)


@pytest.fixture
def one_thread_children(monkeypatch):
    """Children run torch on one thread: beside another torch process on 2 cores (a benchmark, a second suite), two
    spinning OpenMP threads made the demo's steps 30x slower (4 s instead of 0.13 s); these tests time nothing."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def built(config):
    return build_dataset(config.repo, config.run_dir / "dataset", tokenizer_source=config.model,
                         eval_fraction=config.eval_fraction, seed=config.seed)


# Real child processes on the demo model


def test_probe_on_cpu_measures_the_rate_and_the_probed_tier_shows_it(tmp_path, tiny_repo, cpu_profile,
                                                                     one_thread_children, monkeypatch, capsys):
    """Tier 1 as the wizard runs it: no search on a CPU, three real steps, and the tier table calibrated from them."""
    monkeypatch.setenv("ELITE_TUI_CACHE_DIR", str(tmp_path / "cache"))
    config = demo_config(tmp_path, tiny_repo, device="cpu").with_tier(1)  # the CPU run it plans, on any machine
    summary = built(config)
    shape = load_model_shape("demo")
    result = check_training_step(config, cpu_profile, shape, summary)

    assert result.ok, (result.message, result.fix_hint)
    probe = result.probe
    assert not probe.searched and probe.micro_batch == config.micro_batch and len(probe.probes) == 1
    assert probe.tokens_per_s > 0 and probe.step_s > 0 and probe.peak_bytes > 0
    assert "only on a CUDA GPU" in result.message and "one epoch" in result.message
    predicted = plan_for_config(shape, cpu_profile, config).breakdown.total_bytes
    assert f"(predicted {format_bytes(predicted)} at micro-batch {config.micro_batch}, " in result.message
    assert result.config == config, "a CPU keeps the planner's micro-batch"
    saved = ProbeResult.load(config.run_dir / PROBE_FILE)
    assert saved == probe and saved.estimated_tokens_per_s == pytest.approx(
        estimated_tokens_per_s(plan_for_config(shape, cpu_profile, config)))
    assert not (config.run_dir / "preflight-probe").exists(), "the probe's scratch directory stays behind"
    # The run checks that it trains what the probe ran.
    options = plan_for_config(shape, cpu_profile, config).options
    assert saved.options == options and options_mismatch(config.run_dir, options) is None
    other = ("ckpt",) + options[1:]
    assert options_mismatch(config.run_dir, other) == (
        f"the pre-flight probe ran {', '.join(options)}; this run trains {', '.join(other)}: "
        "its confirmed memory and rate do not apply")

    epoch_tokens = epoch_tokens_from_summary(summary)
    calibration = probe.calibration()
    plans = with_epoch_times(plan_tiers(shape, cpu_profile, config), epoch_tokens, calibration)
    probed = plans[0]
    assert probed.rate_source == "probe" and probed.tokens_per_s == probe.tokens_per_s
    assert probed.epoch_s == pytest.approx(epoch_tokens.tokens_per_epoch(config.window_tokens) / probe.tokens_per_s)
    for plan in plans[1:]:
        assert plan.rate_source == "calibrated"
        assert plan.tokens_per_s == pytest.approx(estimated_tokens_per_s(plan) * calibration.ratio)
    print(f"demo tier 1 on this CPU: measured {probe.tokens_per_s:,.0f} tokens/s, estimated "
          f"{probe.estimated_tokens_per_s:,.0f} (ratio {calibration.ratio:.2f})")

    # `elite-tui plan --run-dir` prints the same table from the run's dataset and probe.
    from elite_tui.cli import main

    capsys.readouterr()
    assert main(["plan", "--run-dir", str(config.run_dir), "--output", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[-3:] == ["tok/s", "epoch", "options"]
    tier_1 = lines[2][2:].split()  # after the selection mark
    assert tier_1[0] == "1" and tier_1[tier_1.index("yes") + 1] == f"{probe.tokens_per_s:,.0f}"
    assert "*" in lines[2] and all("*" not in line for line in lines[3:9])
    assert lines[-1].startswith(f"epoch: {summary.train_tokens:,} tokens in the dataset; * tier 1 measured")


def test_finder_in_one_child_converges_under_a_simulated_oom(tmp_path, tiny_repo, h100_profile, monkeypatch,
                                                              one_thread_children):
    """The search as pre-flight runs it on a GPU, in one real child on this CPU, with out-of-memory injected above
    5 windows: from the prediction (the limit of 32, the demo being tiny for an H100) it confirms 5 in at most 6
    probes, the failed probes do not end the child, and accumulation keeps the tokens per update."""
    window = 1024
    config = demo_config(tmp_path, tiny_repo, context_tokens=window - 256, target_tokens=256, lora_rank=8,
                         lora_alpha=16, grad_accum=20)
    built(config)
    monkeypatch.setenv("ELITE_FAULT_OOM_ABOVE_TOKENS", str(5 * window))
    shape = load_model_shape("demo")
    request = probe_request(config, h100_profile, shape)
    assert request.search and request.max_micro_batch == micro_batch_limit(config) == 32
    result = check_training_step(config, h100_profile, shape)

    assert result.ok, (result.message, result.fix_hint)
    probe = result.probe
    tried = [(step.micro_batch, step.fits) for step in probe.probes]
    assert probe.searched and probe.micro_batch == 5, tried
    assert len(probe.probes) <= MAX_PROBES
    assert all(fits == (batch <= 5) for batch, fits in tried) and any(not fits for _, fits in tried)
    assert probe.tokens_per_s > 0
    assert result.config.micro_batch == 5
    assert result.config.grad_accum == grad_accum_for(window, 5, 20 * window) == 4
    assert "micro-batch 5 confirmed" in result.message and "out of memory" in result.message


def test_nothing_fits_when_one_window_runs_out_or_peaks_inside_the_margin(tmp_path, tiny_repo, monkeypatch,
                                                                          one_thread_children):
    """Two windows run out of memory; one runs but peaks above max_peak_bytes (here 1 byte): no size is confirmed."""
    config = demo_config(tmp_path, tiny_repo, context_tokens=192, target_tokens=64, lora_rank=8, lora_alpha=16)
    built(config)
    monkeypatch.setenv("ELITE_FAULT_OOM_ABOVE_TOKENS", str(config.window_tokens))
    events = []
    request = ProbeRequest(predicted_micro_batch=2, max_micro_batch=8, search=True, max_peak_bytes=1)
    result = probe_training(config, request, config.run_dir / "probe", config.run_dir / "dataset",
                            on_event=events.append)
    assert result.micro_batch == 0 and result.tokens_per_s == 0.0
    assert [(step.micro_batch, step.failure) for step in result.probes] == [(2, "out of memory"), (1, "over the margin")]
    assert [isinstance(e, protocol.Warning) for e in events] == [True, False, True, False]
    assert isinstance(events[-1], protocol.Finished), "a failed probe ended the child"


# The parts around the child


def test_epoch_tokens_from_the_repository_are_close_to_the_built_dataset(tmp_path, tiny_repo):
    config = demo_config(tmp_path, tiny_repo)
    estimate = epoch_tokens_from_repo(tiny_repo, "demo", config.eval_fraction)
    counted = epoch_tokens_from_summary(built(config))
    assert estimate.estimated and not counted.estimated and estimate.bytes_per_token == 1.0
    assert estimate.train_tokens == pytest.approx(counted.train_tokens, rel=0.03)
    assert epoch_tokens_from_repo(tiny_repo, "Qwen/Qwen2.5-Coder-1.5B").bytes_per_token == 3.5


def test_an_epoch_reads_every_window_whole():
    tokens = EpochTokens(train_tokens=10_000, estimated=False)
    assert tokens.tokens_per_epoch(4096) == 3 * 4096
    assert tokens.tokens_per_epoch(300_000) == 300_000, "a stream shorter than one window still fills one"
    assert EpochTokens(0, True).tokens_per_epoch(4096) == 0


def test_epoch_times_before_and_after_a_probe(qwen_shape, h100_profile):
    config = default_config("Qwen/Qwen2.5-Coder-1.5B", ".", "runs")
    plans = plan_tiers(qwen_shape, h100_profile, config)
    tokens = EpochTokens(train_tokens=2_711_406, estimated=True, source_bytes=9_876_543, bytes_per_token=3.5)
    estimated = with_epoch_times(plans, tokens)
    for plan in estimated:
        assert plan.rate_source == "estimate" and plan.tokens_per_epoch_estimated
        assert plan.tokens_per_s == pytest.approx(estimated_tokens_per_s(plan)) and plan.tokens_per_s > 0
        assert plan.epoch_s == pytest.approx(plan.tokens_per_epoch / plan.tokens_per_s)
    # The probe ran 20 % slower than estimated at tier 3: every other tier is expected 20 % slower too.
    measured = estimated[2].tokens_per_s * 0.8
    calibration = RateCalibration(tier=3, measured_tokens_per_s=measured, estimated_tokens_per_s=estimated[2].tokens_per_s)
    calibrated = with_epoch_times(plans, tokens, calibration)
    assert calibrated[2].tokens_per_s == measured and calibrated[2].rate_source == "probe"
    assert calibrated[2].epoch_s == pytest.approx(calibrated[2].tokens_per_epoch / measured)
    assert calibrated[0].tokens_per_s == pytest.approx(estimated[0].tokens_per_s * 0.8)
    assert calibrated[6].epoch_s == pytest.approx(estimated[6].epoch_s / 0.8)


def test_micro_batch_changes_keep_tokens_per_update():
    config = default_config("demo", ".", "runs", context_tokens=3584, target_tokens=512, grad_accum=8)
    assert micro_batch_limit(config) == 8
    wider = config_with_micro_batch(config, 4)
    assert (wider.micro_batch, wider.grad_accum) == (4, 2)
    assert config_with_micro_batch(config, 1) is config and config_with_micro_batch(config, 0) is config
    # One micro-batch beyond the tokens per update: accumulation bottoms out at 1.
    assert config_with_micro_batch(config.replace(grad_accum=1), 6).grad_accum == 1


def test_request_searches_only_on_a_gpu(cpu_profile, h100_profile, qwen_shape):
    config = default_config("Qwen/Qwen2.5-Coder-1.5B", ".", "runs").with_tier(3)
    on_cpu = probe_request(config, cpu_profile, qwen_shape)
    assert not on_cpu.search and on_cpu.predicted_micro_batch == config.micro_batch
    on_gpu = probe_request(config, h100_profile, qwen_shape)
    assert on_gpu.search and 1 <= on_gpu.predicted_micro_batch <= on_gpu.max_micro_batch
    assert ProbeRequest.from_args(_parsed(on_gpu.child_args())) == on_gpu
    assert not probe_request(config.replace(device="cpu"), h100_profile, qwen_shape).search


def test_a_cpu_probe_calibrates_the_cpu_run_of_a_gpu_machine(tmp_path, cpu_profile, h100_profile):
    """`device: cpu` on a GPU machine: its probe ran on the CPU and times that run's epochs; a GPU plan of the same
    model gets no calibration from it (found on an H200, where `plan --run-dir` printed GPU rates for such a run)."""
    probe = ProbeResult(model="demo", device="cpu", tier=1, window_tokens=4608, predicted_micro_batch=1,
                        micro_batch=1, searched=False, probes=(ProbeStep(1, True, 4608, 0.5, 10),),
                        tokens_per_s=9_000.0, step_s=0.5, peak_bytes=10, loss=5.5, estimated_tokens_per_s=6_000.0)
    probe.save(tmp_path / PROBE_FILE)
    config = default_config("demo", ".", str(tmp_path))
    assert saved_calibration(tmp_path, config.replace(device="cpu"), h100_profile).ratio == pytest.approx(1.5)
    assert saved_calibration(tmp_path, config, cpu_profile).ratio == pytest.approx(1.5)
    assert saved_calibration(tmp_path, config, h100_profile) is None
    assert saved_calibration(tmp_path, config.replace(model="other"), cpu_profile) is None


def _parsed(args):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--probe-steps", type=int, default=0)
    ProbeRequest.add_arguments(parser)
    return parser.parse_args(args)


def test_coarse_durations():
    assert [format_coarse_duration(s) for s in (42, 750, 12_000, 446_400)] == ["42 s", "12 m 30 s", "3 h 20 m",
                                                                              "5 d 4 h"]
    assert format_coarse_duration(float("inf")) == "-"


def test_report_shows_the_probe_beside_the_training_rate(tmp_path):
    from elite_core.report import probe_lines

    probe = ProbeResult(model="demo", device="cpu", tier=1, window_tokens=4608, predicted_micro_batch=1,
                        micro_batch=1, searched=False, probes=(ProbeStep(1, True, 4608, 0.5, 10),),
                        tokens_per_s=9_000.0, step_s=0.5, peak_bytes=10, loss=5.5)
    probe.save(tmp_path / PROBE_FILE)
    expected = "- pre-flight probe: 9,000 tokens/s at micro-batch 1 (-10.0 % against the training's mean)"
    assert probe_lines(tmp_path, 10_000.0) == [expected]


# The tier table


def test_tier_table_shows_epoch_times_and_the_probe(tmp_path, monkeypatch, tiny_repo, h100_profile, qwen_shape):
    from elite_tui.app import EliteApp
    from elite_tui.state import WizardState

    monkeypatch.chdir(tmp_path)
    config = default_config("Qwen/Qwen2.5-Coder-1.5B", str(tiny_repo), "runs", run_name="r").with_tier(3)
    state = WizardState(config=config, profile=h100_profile, shape=qwen_shape)

    async def walk():
        app = EliteApp(config, start_at="tiers", state=state)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()
            before = _table(app)
            probe = ProbeResult(model=config.model, device="cuda", tier=3, window_tokens=config.window_tokens,
                                predicted_micro_batch=2, micro_batch=2, searched=True, probes=(), tokens_per_s=9_000.0,
                                step_s=4.1, peak_bytes=1, loss=1.0, estimated_tokens_per_s=12_000.0)
            config.run_dir.mkdir(parents=True)
            probe.save(config.run_dir / PROBE_FILE)
            app.screen.refresh_plans()
            await app.workers.wait_for_complete()
            await pilot.pause()
            return before, _table(app), app.screen.query_one("#tiers-help").render()

    (header, rows, plans), (_, rows_after, plans_after), help_text = asyncio.run(walk())
    assert header[-1] == "epoch est."
    assert all(DURATION.match(row[-1]) for row in rows), rows
    estimate = epoch_tokens_from_repo(tiny_repo, config.model)
    for row, plan in zip(rows, plans):
        assert row[-1] == format_coarse_duration(estimate.tokens_per_epoch(plan.setup.seq_tokens) / plan.tokens_per_s)
    assert plans_after[2].rate_source == "probe" and plans_after[2].tokens_per_s == 9_000.0
    assert rows_after[2][-1] == format_coarse_duration(plans_after[2].epoch_s)
    assert plans_after[0].tokens_per_s == pytest.approx(plans[0].tokens_per_s * 0.75)
    assert "tier 3 probe 9,000 tok/s" in str(help_text) and "calibrated x0.75" in str(help_text)


def _table(app):
    table = app.screen.query_one("#tiers")
    header = [str(column.label) for column in table.ordered_columns]
    rows = [[str(cell) if not isinstance(cell, Text) else cell.plain for cell in table.get_row_at(index)]
            for index in range(table.row_count)]
    return header, rows, app.state.plans


# On a CUDA GPU


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_real_cuda_oom_in_a_probe_is_freed_and_the_search_goes_on(tmp_path, monkeypatch):
    """A GPU capped at a few GiB: probes that really run out of memory are recorded, their memory is freed, and the
    timed steps run afterwards at the largest size that fitted."""
    import torch

    from elite_core.hardware import profile_hardware
    from elite_core.probe import run_probes
    from elite_core.training import TrainingEngine

    # Profiled before the cap and in a cache of its own: a profile measured under the cap must not reach other tests.
    monkeypatch.setenv("ELITE_TUI_CACHE_DIR", str(tmp_path / "cache"))
    profile_hardware()

    repo = tmp_path / "repo"
    repo.mkdir()
    for index in range(8):  # about 6 M byte-level tokens: enough 32K windows for micro-batches up to 64
        (repo / f"big_{index}.py").write_text("\n".join(f"value_{index}_{n} = {n} * {n}" for n in range(30_000)))
    config = demo_config(tmp_path, repo, context_tokens=32_768 - 512, target_tokens=512)
    built(config)
    torch.cuda.set_per_process_memory_fraction(4 * 1024**3 / torch.cuda.get_device_properties(0).total_memory)
    try:
        events = []
        engine = TrainingEngine(config, config.run_dir, emit=events.append, poll_commands=lambda: [], probe_steps=2)
        result = run_probes(engine, ProbeRequest(predicted_micro_batch=2, max_micro_batch=64, search=True), events.append)
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    tried = [(step.micro_batch, step.fits) for step in result.probes]
    print("probes", tried, f"confirmed {result.micro_batch}, {result.tokens_per_s:,.0f} tokens/s, "
          f"peak {result.peak_bytes / 2**30:.2f} GiB, allocated after {allocated / 2**30:.2f} GiB")
    assert any(not fits for _, fits in tried) and result.micro_batch >= 1, tried
    assert all(fits == (batch <= result.micro_batch) for batch, fits in tried), tried
    assert len(result.probes) <= MAX_PROBES and result.tokens_per_s > 0
    assert allocated < 2 * 1024**3, "a failed probe's memory was not freed"


@pytest.mark.gpu
@needs_cuda
def test_preflight_searches_on_a_real_gpu(tmp_path, tiny_repo):
    """The whole check on this machine's GPU: a real profile, the planner's prediction, one child, real steps."""
    from elite_core.hardware import profile_hardware

    config = demo_config(tmp_path, tiny_repo, context_tokens=3584, target_tokens=512)
    summary = built(config)
    profile = profile_hardware(config.output_dir)
    shape = load_model_shape("demo")
    result = check_training_step(config, profile, shape, summary)
    print(result.message)
    assert result.ok, (result.message, result.fix_hint)
    probe = result.probe
    assert probe.searched and probe.device == "cuda" and 1 <= probe.micro_batch <= micro_batch_limit(config)
    assert probe.tokens_per_s > 0 and probe.estimated_tokens_per_s > 0
    print(f"measured/estimated {probe.calibration().ratio:.2f}")
