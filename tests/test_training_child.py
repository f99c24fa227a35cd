"""The training child end to end on CPU: a real tiny model, a real child process, a real pipe."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from elite_core import protocol
from elite_core.checkpoints import verify
from elite_core.config import default_config
from elite_core.runner import TrainingProcess
from elite_core.runs import list_runs, read_events

# Small windows keep each CPU step well under a second; the engine is the same as for the real tiers.
SMALL = {"context_tokens": 192, "target_tokens": 64, "lora_rank": 8, "lora_alpha": 16, "warmup_steps": 2,
         "eval_every_steps": 0, "checkpoint_every_seconds": 0, "eval_fraction": 0.0}


def small_config(tmp_path, repo, **overrides):
    values = {"run_name": "r", **SMALL, **overrides}
    return default_config("demo", str(repo), str(tmp_path / "runs"), **values)


def collect(process, on_event=None, timeout_s=240):
    events = []
    deadline = time.monotonic() + timeout_s
    for event in process.events():
        events.append(event)
        if on_event:
            on_event(event, process)
        assert time.monotonic() < deadline, "the child did not finish in time"
    return events


def test_loss_falls_by_a_third_and_the_adapter_is_saved(tmp_path, tiny_repo):
    config = small_config(tmp_path, tiny_repo, max_steps=30, learning_rate=3e-3)
    events = collect(TrainingProcess.start(config))
    steps = [e for e in events if isinstance(e, protocol.StepMetrics)]
    finished = events[-1]
    assert isinstance(finished, protocol.Finished), events[-3:]
    assert [s.step for s in steps] == list(range(1, 31))
    assert steps[-1].loss <= 0.7 * steps[0].loss, (steps[0].loss, steps[-1].loss)
    # each step names the windows it trained on: within the first epoch (a fifth of it here) none twice
    stream = [window for s in steps for window in s.windows]
    windows = round(steps[-1].step * config.micro_batch * config.grad_accum / steps[-1].epoch)
    assert len(stream) == 30 * config.micro_batch * config.grad_accum and steps[-1].epoch < 1
    assert len(set(stream)) == len(stream) and all(0 <= window < windows for window in stream)
    adapter = config.run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    report = (config.run_dir / "report.md").read_text()
    assert "final adapter" in report and "training loss" in report
    # events.jsonl holds the same stream, one JSON object a line with a type
    lines = [json.loads(line) for line in (config.run_dir / "events.jsonl").read_text().splitlines()]
    assert [line["type"] for line in lines] == [e.type for e in events]
    assert all("step" in line and "loss" in line for line in lines if line["type"] == "step")
    assert list_runs(tmp_path / "runs")[0].status == "finished"


def test_checkpoint_now_lands_while_training_goes_on(tmp_path, tiny_repo):
    config = small_config(tmp_path, tiny_repo, max_steps=12)
    asked = []

    def on_event(event, process):
        if isinstance(event, protocol.StepMetrics) and event.step == 2 and not asked:
            asked.append(process.checkpoint_now())

    events = collect(TrainingProcess.start(config), on_event)
    requested = [e for e in events if isinstance(e, protocol.CheckpointSaved) and e.reason == "requested"]
    assert asked == [True] and len(requested) == 1
    saved_at = events.index(requested[0])
    assert any(isinstance(e, protocol.StepMetrics) for e in events[saved_at:]), "training stopped after the checkpoint"
    assert isinstance(events[-1], protocol.Finished) and not events[-1].stopped_early
    verify(Path(requested[0].path))


def test_stop_checkpoints_then_ends_and_resume_repeats_the_same_losses(tmp_path, tiny_repo):
    straight = small_config(tmp_path, tiny_repo, max_steps=6, run_name="straight", lora_dropout=0.1)
    reference_steps = [e for e in collect(TrainingProcess.start(straight)) if isinstance(e, protocol.StepMetrics)]
    reference = [e.loss for e in reference_steps]

    interrupted = small_config(tmp_path, tiny_repo, max_steps=6, run_name="interrupted", lora_dropout=0.1)

    def stop_at_three(event, process):
        if isinstance(event, protocol.StepMetrics) and event.step == 3:
            process.stop()

    first = collect(TrainingProcess.start(interrupted), stop_at_three)
    assert isinstance(first[-1], protocol.Finished) and first[-1].stopped_early
    assert any(isinstance(e, protocol.CheckpointSaved) and e.reason == "stop" for e in first)
    # A report closes the stopped run too
    assert f"Run stopped early after {first[-1].step} steps" in Path(first[-1].report_path).read_text(encoding="utf-8")
    assert list_runs(tmp_path / "runs")[0].resumable

    # The repository is edited before the resume, as it usually is: the run goes on with its own windows.
    (tiny_repo / "added_meanwhile.py").write_text("def later():\n    return 1\n" * 200, encoding="utf-8")
    second = collect(TrainingProcess.spawn(interrupted.run_dir, resume=True))
    assert any(isinstance(e, protocol.Warning) and "changed since this run's dataset was built" in e.message
               for e in second)
    losses = {e.step: e.loss for e in first + second if isinstance(e, protocol.StepMetrics)}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    # One clock for the run: the resumed steps' elapsed time goes on from the first session's
    elapsed = {e.step: e.elapsed_s for e in first + second if isinstance(e, protocol.StepMetrics)}
    assert elapsed[4] > elapsed[3] and second[-1].elapsed_s > elapsed[6]
    assert [losses[s] for s in range(1, 7)] == pytest.approx(reference, rel=1e-5)
    windows = {e.step: e.windows for e in first + second if isinstance(e, protocol.StepMetrics)}
    assert [windows[s] for s in range(1, 7)] == [e.windows for e in reference_steps]


def test_the_child_plans_with_the_profile_its_preflight_kept(tmp_path, tiny_repo):
    """The pre-flight keeps the profile it planned with in RUN_DIR/hardware.json. The child (and its resumes) plan from
    it, not from the free memory at their own start; one from another machine is replaced by this machine's."""
    import dataclasses

    from elite_core.hardware import PLANNING_PROFILE_FILE, fake_profile, profile_hardware, save_planning_profile

    config = small_config(tmp_path, tiny_repo, max_steps=2)
    live = profile_hardware(config.output_dir)
    # memory scarcer at the pre-flight than now: the budget is the first GPU's usable memory, or RAM on a CPU
    if live.has_gpu:
        first = dataclasses.replace(live.gpus[0], usable_bytes=live.gpus[0].usable_bytes // 3)
        kept = dataclasses.replace(live, gpus=(first, *live.gpus[1:]))
    else:
        kept = dataclasses.replace(live, ram_available_bytes=live.ram_available_bytes // 3)
    save_planning_profile(kept, config.run_dir)
    assert isinstance(collect(TrainingProcess.start(config))[-1], protocol.Finished)
    plan = json.loads((config.run_dir / "plan.json").read_text())
    assert plan["hardware"] == json.loads(json.dumps(kept.to_dict())) and plan["budget_bytes"] == kept.memory_budget_bytes

    elsewhere = small_config(tmp_path, tiny_repo, max_steps=2, run_name="elsewhere")
    save_planning_profile(fake_profile("h100"), elsewhere.run_dir)
    assert isinstance(collect(TrainingProcess.start(elsewhere))[-1], protocol.Finished)
    plan = json.loads((elsewhere.run_dir / "plan.json").read_text())
    saved = json.loads((elsewhere.run_dir / PLANNING_PROFILE_FILE).read_text())
    assert plan["hardware"] == saved
    assert [gpu["uuid"] for gpu in saved["gpus"]] == [gpu.uuid for gpu in live.gpus]
    assert (saved["cpu_name"], saved["cpu_cores"]) == (live.cpu_name, live.cpu_cores)


def test_a_run_that_trains_other_options_than_its_probe_says_so(tmp_path, tiny_repo):
    """probe.json records the options the probe's layers ran with; a run planned to other ones warns that the probe's
    memory and rate do not apply to it."""
    from elite_core.probe import PROBE_FILE, ProbeResult, ProbeStep

    config = small_config(tmp_path, tiny_repo, max_steps=1)
    probed = ProbeResult(model="demo", device="cpu", tier=1, window_tokens=config.window_tokens, predicted_micro_batch=1,
                         micro_batch=1, searched=False, probes=(ProbeStep(1, True, 256, 0.1, 10),), tokens_per_s=1.0,
                         step_s=0.1, peak_bytes=10, loss=5.0, options=("ckpt-offload", "chunked-loss"))
    config.run_dir.mkdir(parents=True)
    probed.save(config.run_dir / PROBE_FILE)
    events = collect(TrainingProcess.start(config))
    assert isinstance(events[-1], protocol.Finished)
    plan = json.loads((config.run_dir / "plan.json").read_text())
    warnings = [e.message for e in events if isinstance(e, protocol.Warning)]
    assert (f"the pre-flight probe ran ckpt-offload, chunked-loss; this run trains {', '.join(plan['options'])}: "
            "its confirmed memory and rate do not apply") in warnings, warnings


def test_a_child_that_fails_reports_an_error_event(tmp_path, tiny_repo):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    config = small_config(tmp_path, tiny_repo, max_steps=2).replace(model=str(broken))
    events = collect(TrainingProcess.start(config), timeout_s=120)
    assert isinstance(events[-1], protocol.Error)
    assert "broken-model" in events[-1].message and events[-1].traceback


def test_a_killed_child_is_reported_as_a_crash(tmp_path, tiny_repo):
    config = small_config(tmp_path, tiny_repo, max_steps=500)

    def kill_at_first_step(event, process):
        if isinstance(event, protocol.StepMetrics):
            os.kill(process.process.pid, signal.SIGKILL)

    events = collect(TrainingProcess.start(config), kill_at_first_step)
    assert isinstance(events[-1], protocol.Error) and events[-1].kind == "crash"
    assert "-9" in events[-1].message
    assert any(isinstance(e, protocol.StepMetrics) for e in read_events(config.run_dir))


def test_a_config_edited_before_resume_applies_its_rate_and_refuses_another_adapter_shape(tmp_path, tiny_repo):
    config = small_config(tmp_path, tiny_repo, max_steps=3, run_name="edited")
    assert isinstance(collect(TrainingProcess.start(config))[-1], protocol.Finished)

    config.replace(lora_rank=16).save(config.run_dir / "config.yaml")
    refused = collect(TrainingProcess.spawn(config.run_dir, resume=True))
    assert isinstance(refused[-1], protocol.Error)
    assert "lora_rank: 8 -> 16 since the checkpoint" in refused[-1].message and "keeps its adapter's shape" in refused[-1].message

    # The optimizer and scheduler state hold the old peak rate; the edited one applies from the resumed step on,
    # exactly as in a run started with it.
    edited = config.replace(max_steps=6, learning_rate=config.learning_rate / 100)
    edited.save(config.run_dir / "config.yaml")
    resumed = collect(TrainingProcess.spawn(config.run_dir, resume=True))
    notice = next(e.message for e in resumed if isinstance(e, protocol.Warning) and "settings changed" in e.message)
    assert f"learning_rate {config.learning_rate} -> {edited.learning_rate}" in notice and "max_steps 3 -> 6" in notice
    started_with_it = small_config(tmp_path, tiny_repo, max_steps=6, run_name="reference",
                                   learning_rate=edited.learning_rate)
    reference = {e.step: e.lr for e in collect(TrainingProcess.start(started_with_it))
                 if isinstance(e, protocol.StepMetrics)}
    assert {e.step: e.lr for e in resumed if isinstance(e, protocol.StepMetrics)} == pytest.approx(
        {step: reference[step] for step in (4, 5, 6)}, rel=1e-6)


@pytest.mark.parametrize("architecture", ["gpt_oss", "deepseek_v2", "starcoder2", "qwen3_moe"])
def test_architectures_beyond_llama_train_through_the_child(tmp_path, tiny_repo, architecture):
    """The mixtures of experts (one with a dense first layer and latent attention), gpt-oss's sinks and Starcoder2's
    LayerNorms, built small from their configs and saved as a user's model directory, train three steps through the
    real child with the engine's own layers, loss and checkpoints."""
    import math

    from transformers import AutoModelForCausalLM

    from bench.memory_autograd_cpu import small_config as architecture_config
    from elite_core.demo_model import demo_tokenizer

    model_dir = tmp_path / architecture
    hf_config = architecture_config(architecture, 2, dense=1 if architecture == "deepseek_v2" else 0)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(model_dir)
    demo_tokenizer().save_pretrained(model_dir)
    config = small_config(tmp_path, tiny_repo, max_steps=3, grad_accum=1, learning_rate=1e-3).replace(
        model=str(model_dir))
    events = collect(TrainingProcess.start(config), timeout_s=180)
    assert isinstance(events[-1], protocol.Finished), events[-3:]
    losses = [e.loss for e in events if isinstance(e, protocol.StepMetrics)]
    assert len(losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert (config.run_dir / "adapter" / "adapter_model.safetensors").is_file()
