"""Each wizard screen opened on fixed, realistic data: for snapshot tests and `scripts/make_screenshots.py`.

Everything is deterministic (fake H100 profile, Qwen2.5-Coder-1.5B's shape, synthetic but plausible training events, paths
relative to the working directory), so a screenshot changes only when the UI does.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from elite_core import protocol
from elite_core.config import default_config
from elite_tui.app import EliteApp
from elite_tui.state import WizardState

SHOWCASE_MODEL = "Qwen/Qwen2.5-Coder-1.5B"
SHOWCASE_STEPS = 120
SHOWCASE_RUN_NAME = "run-1"


def showcase_shape():
    from elite_core.memory_model import ModelShape, count_params

    shape = ModelShape(
        name=SHOWCASE_MODEL, architecture="qwen2", hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2,
        head_dim=128, vocab=151936, tied_embeddings=True, max_position_embeddings=32768, total_params=0, known=True,
        attention_bias=True,
    )
    return dataclasses.replace(shape, total_params=count_params(shape))


def showcase_state(workdir: Path) -> WizardState:
    """A wizard state as it stands after the user picked tier 3 on an H100; `workdir` must be the current directory."""
    from elite_core.hardware import fake_profile

    (workdir / "repo").mkdir(exist_ok=True)
    (workdir / "repo" / "main.py").write_text("print('hello')\n", encoding="utf-8")
    config = default_config(SHOWCASE_MODEL, "repo", "runs", run_name=SHOWCASE_RUN_NAME).with_tier(3)
    return WizardState(config=config, profile=fake_profile("h100"), shape=showcase_shape())


def showcase_events(total_steps: int = SHOWCASE_STEPS, done_steps: int = 80, finished: bool = False) -> list[Any]:
    run_dir = f"runs/{SHOWCASE_RUN_NAME}"
    events: list[Any] = [
        protocol.Started(run_dir=run_dir, pid=4242, device="cuda", total_steps=total_steps, tokens_per_step=18432,
                         trainable_params=18_464_768, total_params=1_562_179_072,
                         predicted_peak_bytes=int(38.2 * 1024**3), time=0.0)
    ]
    for step in range(1, done_steps + 1):
        loss = 0.62 + 1.1 * math.exp(-step / 25) + 0.04 * math.sin(step * 1.7)
        memory = int((35.1 + 0.6 * min(step, 5) / 5 + 0.05 * math.sin(step)) * 1024**3)
        events.append(protocol.StepMetrics(step=step, epoch=step / 200, loss=loss, lr=2e-4 * min(1.0, step / 10),
                                           tokens_per_s=14100.0, memory_bytes=memory, elapsed_s=1.3 * step, time=0.0))
        if step % 50 == 0:
            events.append(protocol.EvalMetrics(step=step, loss=loss + 0.08, perplexity=math.exp(loss + 0.08), time=0.0))
            events.append(protocol.CheckpointSaved(step=step, path=f"{run_dir}/checkpoints/step-{step:06d}",
                                                   reason="periodic", seconds=2.4, time=0.0))
    if finished:
        events.append(protocol.Finished(step=done_steps, final_loss=events[-1].loss if done_steps else 0.0,
                                        adapter_path=f"{run_dir}/adapter", report_path=f"{run_dir}/report.md",
                                        stopped_early=False, elapsed_s=1.3 * done_steps, time=0.0))
    return events


def crash_events() -> list[Any]:
    events = showcase_events(done_steps=12)
    traceback = (
        "Traceback (most recent call last):\n"
        '  File "elite_core/child.py", line 88, in main\n'
        "    trainer.run()\n"
        '  File "elite_core/training.py", line 330, in train_step\n'
        "    loss.backward()\n"
        "RuntimeError: CUDA error: an illegal memory access was encountered"
    )
    events.append(protocol.Error(message="the training process exited with code -11 without reporting an error",
                                 traceback=traceback, kind="crash", time=0.0))
    return events


def preflight_results() -> list[Any]:
    from elite_core.preflight import CheckResult

    return [
        CheckResult("output directory writable", True, "runs/run-1 (500.0 GiB free)"),
        CheckResult("model and tokenizer load", True, f"{SHOWCASE_MODEL}: Qwen2Config, vocabulary 151,665"),
        CheckResult("options' libraries installed", True, "no option needs one"),
        CheckResult("dataset has training windows", True, "412 windows of 18,432 tokens from 1,204 files"),
        CheckResult("memory fits with headroom", True, "predicted 38.2 GiB of 78.4 GiB GPU, headroom 40.2 GiB"),
        CheckResult("training steps run", False, "CUDA out of memory. Tried to allocate 9.3 GiB",
                    "lower the tier or micro-batch"),
    ]


def write_showcase_run(workdir: Path, state: WizardState) -> Any:
    """A finished run directory (config, events, report) as the child leaves it."""
    from elite_core.report import write_report

    import json

    from elite_core.dataset import MANIFEST_NAME

    run_dir = workdir / state.config.run_dir
    (run_dir / "dataset").mkdir(parents=True, exist_ok=True)
    state.config.save(run_dir / "config.yaml")
    # The report reads the dataset summary from the dataset's manifest; only the summary part is needed.
    manifest = {"summary": showcase_summary().to_dict()}
    (run_dir / "dataset" / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    events = showcase_events(done_steps=SHOWCASE_STEPS, finished=True)
    (run_dir / "events.jsonl").write_text("".join(protocol.encode(e) + "\n" for e in events), encoding="utf-8")
    finished = events[-1]
    write_report(Path(state.config.run_dir), finished)
    return finished


def showcase_app(screen: str, workdir: Path, variant: str = "") -> EliteApp:
    """The app opened on `screen` with showcase data. `workdir` must be the current directory (paths are relative)."""
    state = showcase_state(workdir)
    config = state.config
    replay = None
    if screen == "setup":
        state.config = config.replace(run_name="run")
    elif screen in ("tiers", "overrides"):
        state.summary = showcase_summary()  # the epoch column counts this dataset's tokens
    elif screen == "dataset":
        state.summary = showcase_summary()
    elif screen == "preflight":
        state.summary = showcase_summary()
        state.preflight_results = preflight_results()
        state.preflight_config = config
    elif screen == "monitor":
        replay = crash_events() if variant == "crash" else showcase_events()
    elif screen == "report":
        state.finished = write_showcase_run(workdir, state)
    return EliteApp(config, start_at=screen, state=state, replay_events=replay)


SHOWCASE_SCREENS: tuple[tuple[str, str, str], ...] = (
    ("01-setup", "setup", ""),
    ("02-hardware", "hardware", ""),
    ("03-tiers", "tiers", ""),
    ("04-overrides", "overrides", ""),
    ("05-dataset", "dataset", ""),
    ("06-preflight", "preflight", ""),
    ("07-monitor", "monitor", ""),
    ("08-report", "report", ""),
    ("09-monitor-crash", "monitor", "crash"),
)


def showcase_summary() -> Any:
    from elite_core.dataset import DatasetSummary, LanguageStats, SkippedFile

    return DatasetSummary(
        dataset_dir="runs/run-1/dataset",
        files=1204,
        bytes=9_876_543,
        tokens=2_854_112,
        train_tokens=2_711_406,
        eval_tokens=142_706,
        train_files=1144,
        eval_files=60,
        languages=(LanguageStats("Python", 812, 6_502_331, 1_903_554), LanguageStats("TypeScript", 240, 2_101_877, 640_120),
                   LanguageStats("Markdown", 98, 912_004, 221_880), LanguageStats("YAML", 54, 360_331, 88_558)),
        skipped=(SkippedFile("assets/logo.png", "binary file"),
                 SkippedFile("vendor/big.min.js", "minified (line length 48,112)"),
                 SkippedFile("data/dump.sql", "larger than 2 MiB")),
        secrets_excluded=(SkippedFile("deploy/.env.prod", "AWS Access Key on line 3"),),
        duplicates_removed=17,
        rebuilt=True,
        tokenizer_source=SHOWCASE_MODEL,
        elapsed_s=4.2,
    )
