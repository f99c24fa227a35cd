"""Checkpoints that ship their own quantisation: FP8 (DeepSeek, Qwen "-FP8") and MXFP4 (gpt-oss) load as bf16, which
transformers can train and the memory model counts; QLoRA cannot quantise them again, and the plan says so."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

BLOCK = 32


def fp8_checkpoint(root: Path) -> Path:
    """The demo model saved as a block-wise FP8 checkpoint (DeepSeek-V3's format: float8_e4m3fn weights and one
    fp32 weight_scale_inv per 32x32 block), written by hand: transformers quantises to FP8 only on a GPU."""
    import torch
    from safetensors.torch import save_file

    from elite_core.demo_model import demo_model, demo_tokenizer

    model = demo_model()
    model.save_pretrained(root)
    demo_tokenizer().save_pretrained(root)
    tensors = {}
    for name, weight in model.state_dict().items():
        if ".layers." in name and name.endswith("proj.weight"):
            rows, columns = weight.shape
            blocks = weight.float().reshape(rows // BLOCK, BLOCK, columns // BLOCK, BLOCK)
            scale = blocks.abs().amax(dim=(1, 3)) / 448.0
            tensors[name] = (blocks / scale[:, None, :, None]).reshape(rows, columns).to(torch.float8_e4m3fn)
            tensors[name.removesuffix("weight") + "weight_scale_inv"] = scale
        else:
            tensors[name] = weight.contiguous()
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_an_fp8_checkpoint_loads_as_bf16_linears(tmp_path):
    import torch

    from elite_core.demo_model import demo_model
    from elite_core.model_loading import load_causal_lm, load_model_shape

    source = str(fp8_checkpoint(tmp_path / "demo-fp8"))
    assert load_model_shape(source).shipped_quantization == "fp8"
    model = load_causal_lm(source, dtype=torch.bfloat16, device="cpu")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.bfloat16
    original = demo_model().model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(q_proj.weight.float(), original, atol=0.08)  # FP8's rounding, no more


def test_qlora_is_not_planned_on_a_checkpoint_that_ships_its_own_quantisation(tmp_path):
    import torch
    from transformers import BitsAndBytesConfig

    from elite_core.config import default_config
    from elite_core.hardware import Capability, fake_profile
    from elite_core.model_loading import ModelSourceError, load_causal_lm, load_model_shape
    from elite_core.planner import plan_tiers

    source = str(fp8_checkpoint(tmp_path / "demo-fp8"))
    h100 = fake_profile("h100")
    with_bnb = dataclasses.replace(h100, capabilities=tuple(
        Capability(c.name, True, "installed", c.fallback) if c.name == "bitsandbytes" else c for c in h100.capabilities))
    plans = plan_tiers(load_model_shape(source), with_bnb, default_config(model=source, qlora=True))
    assert all(plan.setup.weight_dtype == "bf16" for plan in plans)
    assert all("fp8 weights load as bf16" in plan.note and "QLoRA is off" in plan.note for plan in plans)
    with pytest.raises(ModelSourceError, match="ships fp8 weights"):
        load_causal_lm(source, dtype=torch.bfloat16, device="cpu", quantization_config=BitsAndBytesConfig())


def test_an_fp8_checkpoint_trains_through_the_child(tmp_path, tiny_repo):
    from elite_core import protocol
    from elite_core.config import default_config
    from elite_core.runner import TrainingProcess

    source = str(fp8_checkpoint(tmp_path / "demo-fp8"))
    config = default_config(source, str(tiny_repo), str(tmp_path / "runs"), run_name="fp8", max_steps=2,
                            context_tokens=192, target_tokens=64, grad_accum=1, eval_every_steps=0,
                            checkpoint_every_seconds=0, eval_fraction=0.0, compile_eval_prompts=0)
    events = list(TrainingProcess.start(config).events())
    assert isinstance(events[-1], protocol.Finished), events[-3:]
    assert (config.run_dir / "adapter" / "adapter_model.safetensors").is_file()
