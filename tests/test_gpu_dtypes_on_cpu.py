"""A CPU run asked for bf16 has a GPU run's dtypes: bf16 weights, fp32 adapters, and the adapters' inputs shared under
autocast (lean_layers.share_adapter_inputs), so the suite covers what otherwise only a GPU runs. The whole child runs
here: steps, the held-out loss, the compile rate's completions and the report. The completions once ran outside the
training's autocast, which failed every GPU run's compile rate (bench/results/gpu-smoke-h200/) and, the same way,
this run."""

from __future__ import annotations

from elite_core.evaluation import read_evaluation
from elite_tui.cli import main


def test_a_bf16_run_trains_evaluates_and_writes_its_report(tiny_repo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ELITE_TUI_CACHE_DIR", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    settings = ["device=cpu", "precision=bf16", "context_tokens=192", "target_tokens=64", "lora_rank=8",
                "compile_eval_prompts=2", "eval_fraction=0.3", "checkpoint_every_seconds=0"]
    code = main(["run", "--repo", str(tiny_repo), "--output", str(runs), "--run-name", "bf16", "--tier", "1",
                 "--max-steps", "3", "--preflight", "off", *[part for s in settings for part in ("--set", s)]])
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-3000:]
    run_dir = runs / "bf16"
    evaluation = read_evaluation(run_dir)
    assert evaluation["after"]["prompts"] >= 1 and evaluation["after"]["generated_tokens"] > 0
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "## Compile rate on held-out files" in report and "| after training |" in report
    assert "held-out loss:" in report
