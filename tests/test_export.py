"""Export: the adapter merged into the rebuilt demo base gives the same logits as base + adapter."""

import subprocess
import sys

import pytest
import torch

from elite_core.config import default_config
from elite_core.export import ExportError, export_merged

SMALL = {"context_tokens": 96, "target_tokens": 32, "lora_rank": 4, "lora_alpha": 8, "warmup_steps": 1,
         "eval_every_steps": 0, "checkpoint_every_seconds": 0, "eval_fraction": 0.0, "max_steps": 3}


def test_merged_model_matches_the_adapter_and_the_cli_exports(tmp_path, tiny_repo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from elite_core.model_loading import load_causal_lm
    from elite_core.training import TrainingEngine

    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"), run_name="r", **SMALL)
    config.run_dir.mkdir(parents=True)
    config.save(config.run_dir / "config.yaml")
    TrainingEngine(config, config.run_dir, emit=lambda e: None, poll_commands=lambda: []).run()

    out_dir = export_merged(config.run_dir)
    assert out_dir == config.run_dir / "merged"
    merged = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = load_causal_lm("demo", dtype=torch.float32, device="cpu", seed=config.seed)
    adapted = PeftModel.from_pretrained(base, str(config.run_dir / "adapter")).eval()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        got = merged.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (out_dir / "tokenizer.json").is_file()

    result = subprocess.run([sys.executable, "-m", "elite_tui.cli", "export", str(config.run_dir), "--out",
                             str(tmp_path / "cli-merged")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cli-merged" / "model.safetensors").is_file()


def test_export_of_an_unfinished_run_says_why(tmp_path):
    config = default_config("demo", ".", str(tmp_path / "runs"), run_name="r")
    config.run_dir.mkdir(parents=True)
    config.save(config.run_dir / "config.yaml")
    with pytest.raises(ExportError, match="no final adapter"):
        export_merged(config.run_dir)
