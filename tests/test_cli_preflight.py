"""`elite-tui run` runs the wizard's pre-flight checks before training: each printed, the first failure stops the run
with its fix before anything trains, and the probe's confirmed config is the one that trains."""

from __future__ import annotations

import json

import pytest

from elite_tui.cli import main

SMALL_RUN = ["--max-steps", "2", "--set", "device=cpu", "--set", "context_tokens=192", "--set", "target_tokens=64",
             "--set", "lora_rank=8", "--set", "eval_every_steps=0", "--set", "compile_eval_prompts=0",
             "--set", "checkpoint_every_seconds=0", "--set", "eval_fraction=0"]


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ELITE_TUI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "runs"


def test_run_prints_every_check_then_trains_with_the_probed_config(tiny_repo, runs, capsys):
    code = main(["run", "--repo", str(tiny_repo), "--output", str(runs), "--run-name", "checked", "--tier", "1",
                 "--preflight", "on", *SMALL_RUN])
    out, err = capsys.readouterr()
    assert code == 0, err
    checks = [line for line in out.splitlines() if line.startswith("pre-flight: ")]
    assert [line.split(": ")[1] for line in checks] == [
        "output directory writable", "model and tokenizer load", "options' libraries installed",
        "dataset has training windows", "memory fits with headroom", "training steps run"]
    assert all(": ok: " in line for line in checks), checks
    assert "tokens/s" in checks[-1]  # the probe measured the rate
    run_dir = runs / "checked"
    probe = json.loads((run_dir / "probe.json").read_text())
    assert probe["micro_batch"] == 1 and probe["tokens_per_s"] > 0
    assert (run_dir / "adapter").is_dir()
    # the probe's scratch directory is gone; the run's own files are there
    assert not (run_dir / "preflight-probe").exists()
    assert "step      2" in out
    assert f"merge the adapter into the base model: elite-tui export {runs / 'checked'}" in out
    # the training planned from the profile the checks planned with, and trained the options the probe ran
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["hardware"] == json.loads((run_dir / "hardware.json").read_text())
    assert probe["options"] == plan["options"]
    report = (run_dir / "report.md").read_text()
    assert f"- hardware profile planned with: `{run_dir / 'hardware.json'}`" in report
    assert f"- pre-flight probe results: `{run_dir / 'probe.json'}`" in report


def test_on_a_cpu_auto_runs_the_checks_without_probe_steps(tiny_repo, runs, capsys):
    code = main(["run", "--repo", str(tiny_repo), "--output", str(runs), "--run-name", "auto", "--tier", "1",
                 *SMALL_RUN])
    out, err = capsys.readouterr()
    assert code == 0, err
    names = [line.split(": ")[1] for line in out.splitlines() if line.startswith("pre-flight: ")]
    assert names == ["output directory writable", "model and tokenizer load", "options' libraries installed",
                     "dataset has training windows", "memory fits with headroom"]
    assert not (runs / "auto" / "probe.json").exists()


def test_a_failed_check_stops_the_run_before_training_and_keeps_the_dataset(tiny_repo, runs, capsys):
    # Tier 7's window (about 295K tokens) at micro-batch 64: over 300 GiB predicted (micro-batch 4 came within the RAM
    # of an idle 24-GiB machine, and then trained: the check must not depend on what else runs)
    code = main(["run", "--repo", str(tiny_repo), "--output", str(runs), "--run-name", "too-big", "--tier", "7",
                 "--max-steps", "2", "--set", "device=cpu", "--set", "micro_batch=64"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "pre-flight: memory fits with headroom: FAILED: predicted" in out
    assert "pre-flight check failed (memory fits with headroom): pick a lower tier" in err
    assert "--preflight off" in err
    run_dir = runs / "too-big"
    assert (run_dir / "dataset" / "manifest.json").exists()  # what was built is kept
    assert not (run_dir / "events.jsonl").exists() and not (run_dir / "adapter").exists()
    # no run started there, so the same name may train there once the config fits
    assert main(["run", "--repo", str(tiny_repo), "--output", str(runs), "--run-name", "too-big", "--tier", "1",
                 *SMALL_RUN]) == 0
    assert (run_dir / "adapter").is_dir()


def _files(run_dir):
    return {path.relative_to(run_dir): path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}


def test_a_new_run_never_starts_where_one_did_and_a_kept_config_trains_beside_it(tiny_repo, runs, capsys):
    # A second run into the same directory appended its events to the first's and overwrote its checkpoints (seen
    # on the H200: two `--run-name tier-2` runs, one events.jsonl).
    first = ["run", "--repo", str(tiny_repo), "--output", str(runs), "--run-name", "first", "--tier", "1", *SMALL_RUN]
    assert main(first) == 0
    capsys.readouterr()
    run_dir = runs / "first"
    kept = _files(run_dir)
    assert main(first) == 2
    out, err = capsys.readouterr()
    assert f"{run_dir} already holds a run (finished, step 2 of 2)" in err
    assert "give it another --run-name" in err
    assert "run directory:" not in out  # refused before anything was built or written
    assert _files(run_dir) == kept
    # lr-find writes a dataset and its result into the run directory too
    assert main(["lr-find", "--repo", str(tiny_repo), "--output", str(runs), "--run-name", "first"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _files(run_dir) == kept
    # the kept config trains again under another name, beside the first
    assert main(["run", "--config", str(run_dir / "config.yaml"), "--run-name", "second"]) == 0
    assert (runs / "second" / "adapter").is_dir() and _files(run_dir) == kept


def test_the_memory_check_of_a_cpu_run_on_a_gpu_machine_reads_the_ram(h100_profile):
    from elite_core.config import default_config
    from elite_core.demo_model import demo_model_config
    from elite_core.memory_model import shape_from_hf_config
    from elite_core.preflight import check_memory
    from elite_core.units import format_bytes

    shape = shape_from_hf_config(demo_model_config(), name="demo")
    on_the_cpu = check_memory(default_config().replace(device="cpu"), h100_profile, shape)
    assert f"of {format_bytes(h100_profile.ram_available_bytes)} RAM" in on_the_cpu.message
    on_the_gpu = check_memory(default_config(), h100_profile, shape)
    assert f"of {format_bytes(h100_profile.gpus[0].usable_bytes)} GPU" in on_the_gpu.message


def test_the_memory_check_names_what_other_processes_held_on_the_gpu(h100_profile):
    import dataclasses

    from elite_core.config import default_config
    from elite_core.demo_model import demo_model_config
    from elite_core.memory_model import shape_from_hf_config
    from elite_core.preflight import check_memory
    from elite_core.units import format_bytes

    # An H200 whose earlier run's detached child still held 65 GiB: tier 3's budget came out at 73.9 of 139.5 GiB
    # (bench/results/probe-vs-training-h200/qwen-1.5b-qlora), with nothing in the check to say why
    shape = shape_from_hf_config(demo_model_config(), name="demo")
    gpu = h100_profile.gpus[0]
    held = 40 * 1024**3
    busy = dataclasses.replace(h100_profile, gpus=(dataclasses.replace(
        gpu, free_bytes=gpu.total_bytes - held, usable_bytes=gpu.usable_bytes - held),))
    assert "other processes" not in check_memory(default_config(), h100_profile, shape).message  # the idle driver's reserve
    fits = check_memory(default_config(), busy, shape)
    assert fits.ok and f"other processes held {format_bytes(held)} of the GPU's {format_bytes(gpu.total_bytes)}" in fits.message
    too_big = check_memory(default_config().replace(tier=7, micro_batch=4096), busy, shape)
    assert not too_big.ok and "free the GPU" in too_big.fix_hint


def test_a_finished_run_is_not_resumed_or_attached_and_says_so(tiny_repo, runs, capsys):
    assert main(["run", "--repo", str(tiny_repo), "--output", str(runs), "--run-name", "done", "--tier", "1",
                 "--preflight", "off", *SMALL_RUN]) == 0
    report = (runs / "done" / "report.md").read_text()
    capsys.readouterr()
    assert main(["resume", str(runs / "done")]) == 2
    assert f"finished at step 2: nothing to resume (its report: {(runs / 'done').resolve() / 'report.md'})" in \
        capsys.readouterr().err
    assert main(["attach", str(runs / "done")]) == 2
    assert "it finished at step 2" in capsys.readouterr().err
    assert (runs / "done" / "report.md").read_text() == report  # nothing rewritten
