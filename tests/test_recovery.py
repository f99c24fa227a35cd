"""Out of memory and full disks, simulated on CPU through the engine's fault-injection variables."""


from elite_core import protocol
from elite_core.checkpoints import latest_valid, list_checkpoints
from elite_core.config import RunConfig, default_config
from elite_core.runner import SupervisedRun, TrainingProcess, step_down

SMALL = {"context_tokens": 192, "target_tokens": 64, "lora_rank": 8, "lora_alpha": 16, "eval_every_steps": 0,
         "eval_fraction": 0.0, "checkpoint_every_seconds": 0}


def run_to_end(process):
    events = list(process.events())
    assert isinstance(events[-1], (protocol.Finished, protocol.Error))
    return events


def test_step_down_halves_the_micro_batch_then_drops_a_tier():
    config = RunConfig().with_tier(3).replace(micro_batch=4, grad_accum=2)
    ladder = []
    while (change := step_down(config)) is not None:
        config, text = change
        ladder.append((config.micro_batch, config.grad_accum, config.tier))
    assert ladder == [(2, 4, 3), (1, 8, 3), (1, 8, 2), (1, 8, 1)]
    assert config.lora_rank == RunConfig().with_tier(3).lora_rank  # the adapter shape never changes


def test_an_oom_steps_down_and_resumes_with_the_same_tokens_per_update(tiny_repo, tmp_path, monkeypatch):
    # 4 windows of 256 tokens per micro-batch run out of "memory"; 2 fit.
    monkeypatch.setenv("ELITE_FAULT_OOM_ABOVE_TOKENS", "600")
    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"), run_name="oom", max_steps=4,
                            micro_batch=4, grad_accum=1, **SMALL)
    events = run_to_end(SupervisedRun(config))
    notices = [e.message for e in events if isinstance(e, protocol.Warning) and e.message.startswith("out of memory")]
    assert notices == ["out of memory: micro-batch 4 -> 2, gradient accumulation 1 -> 2 (same tokens per update); "
                       "resuming from the last checkpoint"]
    assert isinstance(events[-1], protocol.Finished) and not events[-1].stopped_early
    saved = RunConfig.load(config.run_dir / "config.yaml")
    assert (saved.micro_batch, saved.grad_accum) == (2, 2)
    steps = [e for e in events if isinstance(e, protocol.StepMetrics)]
    assert [s.step for s in steps] == [1, 2, 3, 4]
    assert "out of memory: micro-batch 4 -> 2" in (config.run_dir / "events.jsonl").read_text()


def test_a_full_disk_keeps_the_previous_checkpoint_and_training_goes_on(tiny_repo, tmp_path, monkeypatch):
    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"), run_name="full", max_steps=3, **SMALL)
    first = run_to_end(TrainingProcess.start(config))
    assert isinstance(first[-1], protocol.Finished)
    good = latest_valid(config.run_dir)

    monkeypatch.setenv("ELITE_FAULT_SAVE_ERRNO", "28")  # ENOSPC
    more = config.replace(max_steps=6)
    more.save(config.run_dir / "config.yaml")
    events = run_to_end(TrainingProcess.spawn(config.run_dir, resume=True))
    warnings = [e.message for e in events if isinstance(e, protocol.Warning) and "failed" in e.message]
    assert warnings and "No space left on device" in warnings[0] and f"{good.name} is intact" in warnings[0]
    assert [e.step for e in events if isinstance(e, protocol.StepMetrics)] == [4, 5, 6]
    assert list_checkpoints(config.run_dir)[-1] == good and latest_valid(config.run_dir) == good


def test_a_full_disk_can_stop_the_run_instead(tiny_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("ELITE_FAULT_SAVE_ERRNO", "28")
    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"), run_name="stop", max_steps=100_000,
                            on_save_failure="stop", **{**SMALL, "checkpoint_every_seconds": 1})
    events = run_to_end(TrainingProcess.start(config))
    assert isinstance(events[-1], protocol.Finished) and events[-1].stopped_early
    assert events[-1].step < 100_000
    assert any(isinstance(e, protocol.Warning) and "stopping" in e.message for e in events)


def test_a_full_disk_can_pause_training_until_a_save_lands(tiny_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("ELITE_FAULT_SAVE_ERRNO", "28:2")  # the first two saves fail, the third lands
    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"), run_name="pause", max_steps=6,
                            on_save_failure="pause", save_retry_seconds=1,
                            **{**SMALL, "checkpoint_every_seconds": 1})
    events = run_to_end(TrainingProcess.start(config))
    paused = next(i for i, e in enumerate(events) if isinstance(e, protocol.Warning) and "paused" in e.message)
    saved = next(i for i, e in enumerate(events[paused:], paused) if isinstance(e, protocol.CheckpointSaved))
    # No training step runs between the failed save and the save that lands.
    assert not any(isinstance(e, protocol.StepMetrics) for e in events[paused:saved])
    assert any(isinstance(e, protocol.Warning) and "saved after the pause" in e.message for e in events)
    assert isinstance(events[-1], protocol.Finished) and not events[-1].stopped_early
    assert [e.step for e in events if isinstance(e, protocol.StepMetrics)] == [1, 2, 3, 4, 5, 6]


FILE_SIZE_LIMIT_SCRIPT = r"""
import json, resource, signal, sys
from pathlib import Path
import torch
from peft import LoraConfig, get_peft_model
from elite_core import checkpoints
from elite_core.config import RunConfig

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(512, 512)
    def forward(self, x):
        return self.lin(x)

run_dir = Path(sys.argv[1])
model = get_peft_model(Tiny(), LoraConfig(r=64, target_modules=["lin"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
model(torch.randn(2, 512)).sum().backward()
optimizer.step()
good = checkpoints.save(run_dir, model, optimizer, scheduler, {"step": 1}, RunConfig())
sizes = {p.name: p.stat().st_size for p in good.iterdir()}
results = {"sizes": sizes}
# A file-size limit fails the writes in the kernel, as a full disk does: each writer raises its own exception.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
for label, limit in (("adapter", sizes["adapter.safetensors"] // 2), ("optimizer", sizes["optimizer.pt"] // 2)):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        checkpoints.save(run_dir, model, optimizer, scheduler, {"step": 2}, RunConfig())
        results[label] = "saved"
    except OSError as exc:
        results[label] = f"OSError: {exc.strerror}"  # what the engine's warning shows
    except Exception as exc:
        results[label] = f"{type(exc).__name__} (not an OSError): {exc}"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
results["left"] = sorted(p.name for p in checkpoints.checkpoint_root(run_dir).iterdir())
print(json.dumps(results))
"""


def test_a_real_write_failure_is_an_os_error_whichever_writer_hits_it(tmp_path):
    """safetensors and torch.save report a failed write with their own exceptions; the save raises OSError for both,
    so on_save_failure applies, and the failed save leaves nothing behind."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["sizes"]["optimizer.pt"] > results["sizes"]["adapter.safetensors"] * 1.5
    assert results["adapter"].startswith("OSError: SafetensorError"), results["adapter"]
    assert results["optimizer"].startswith("OSError: RuntimeError"), results["optimizer"]
    assert "File too large" in results["adapter"]
    assert results["left"] == ["step-00000001"]
