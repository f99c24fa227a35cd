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


def test_a_run_with_scaled_rope_exports_the_model_it_trained_and_no_folder_is_overwritten(tmp_path, tiny_repo):
    """A 256-token window on a model of 128 positions trains with RoPE scaled x2: the merged model must carry that
    scaling (without it the logits differ by up to 5). A non-empty folder that is no earlier export is refused."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from elite_core.demo_model import demo_model, demo_tokenizer
    from elite_core.model_loading import load_causal_lm
    from elite_core.training import TrainingEngine

    short = demo_model(seed=0)
    short.config.max_position_embeddings = 128
    short.save_pretrained(tmp_path / "short-model")
    demo_tokenizer().save_pretrained(tmp_path / "short-model")
    config = default_config(str(tmp_path / "short-model"), str(tiny_repo), str(tmp_path / "runs"), run_name="rope",
                            **{**SMALL, "context_tokens": 192, "target_tokens": 64})
    config.run_dir.mkdir(parents=True)
    config.save(config.run_dir / "config.yaml")
    TrainingEngine(config, config.run_dir, emit=lambda e: None, poll_commands=lambda: []).run()
    assert "rope-x2" in (config.run_dir / "plan.json").read_text()

    merged = AutoModelForCausalLM.from_pretrained(export_merged(config.run_dir), dtype=torch.float32).eval()
    base = load_causal_lm(config.model, dtype=torch.float32, device="cpu", seed=config.seed, rope_scaling_factor=2.0)
    adapted = PeftModel.from_pretrained(base, str(config.run_dir / "adapter")).eval()
    ids = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, expected = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
    # A local model merges in bf16: its rounding moves logits by up to ~0.2; unscaled RoPE moved them by 5 and changed
    # one next-token choice in nine.
    assert (got - expected).abs().max() < 0.5
    assert merged.config.rope_parameters["rope_type"] == "yarn" and merged.config.rope_parameters["factor"] == 2.0
    export_merged(config.run_dir)  # an earlier export is replaced

    project = tmp_path / "my-project"
    project.mkdir()
    (project / "config.json").write_text('{"mine": true}')
    with pytest.raises(ExportError, match="is not empty and holds no earlier export"):
        export_merged(config.run_dir, project)
    assert (project / "config.json").read_text() == '{"mine": true}'
