"""Export: the base model with the run's LoRA adapter merged in, as one save_pretrained directory."""

from __future__ import annotations

from pathlib import Path

from elite_core.config import RunConfig

MERGED_DIR = "merged"


class ExportError(RuntimeError):
    pass


def export_merged(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Merge RUN_DIR/adapter into its base model (peft merge_and_unload) and save model and tokenizer to out_dir
    (default RUN_DIR/merged). The demo's base is built as training built it (its shipped weights, the run's seed)."""
    import torch
    from peft import PeftModel

    from elite_core.model_loading import load_causal_lm, load_tokenizer

    run_dir = Path(run_dir)
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{run_dir} has no final adapter (adapter/adapter_config.json): the run did not finish")
    config = RunConfig.load(run_dir / "config.yaml")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / MERGED_DIR
    # On the CPU, so it needs no GPU that training may still hold; the tiny demo merges in fp32, real models in bf16.
    dtype = torch.float32 if config.is_demo else torch.bfloat16
    base = load_causal_lm(config.model, dtype=dtype, device="cpu", trust_remote_code=config.trust_remote_code,
                          seed=config.seed)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    load_tokenizer(config.model, config.trust_remote_code).save_pretrained(out_dir)
    return out_dir
