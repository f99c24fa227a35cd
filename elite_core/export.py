"""Export: the base model with the run's LoRA adapter merged in, as one save_pretrained directory."""

from __future__ import annotations

import json
from pathlib import Path

from elite_core.config import RunConfig

MERGED_DIR = "merged"
EXPORT_MARKER = "elite-export.json"
"""Written beside an export: a later export may replace the directory it marks, and no other non-empty one."""


class ExportError(RuntimeError):
    pass


def export_merged(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Merge RUN_DIR/adapter into its base model (peft merge_and_unload) and save model and tokenizer to out_dir
    (default RUN_DIR/merged). The demo's base is built as training built it (its shipped weights, the run's seed)."""
    import torch
    from peft import PeftModel

    from elite_core.model_loading import load_causal_lm, load_model_shape, load_tokenizer
    from elite_core.planner import rope_scaling_factor

    run_dir = Path(run_dir)
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{run_dir} has no final adapter (adapter/adapter_config.json): the run did not finish")
    config = RunConfig.load(run_dir / "config.yaml")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / MERGED_DIR
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / EXPORT_MARKER).is_file():
        raise ExportError(f"{out_dir} is not empty and holds no earlier export: its files would be overwritten; "
                          "choose another --out")
    # On the CPU, so it needs no GPU that training may still hold; the tiny demo merges in fp32, real models in bf16.
    dtype = torch.float32 if config.is_demo else torch.bfloat16
    # Where the window outgrew the model's positions, training scaled RoPE (planner.rope_scaling_factor); the merged
    # model is that model, so its saved config carries the same scaling.
    rope_factor = rope_scaling_factor(load_model_shape(config.model, config.trust_remote_code), config.window_tokens)
    base = load_causal_lm(config.model, dtype=dtype, device="cpu", trust_remote_code=config.trust_remote_code,
                          seed=config.seed, rope_scaling_factor=rope_factor)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    load_tokenizer(config.model, config.trust_remote_code).save_pretrained(out_dir)
    (out_dir / EXPORT_MARKER).write_text(json.dumps({"run_dir": str(run_dir.resolve()), "rope_scaling_factor": rope_factor,
                                                     "base_model": config.model}, indent=1), encoding="utf-8")
    return out_dir
