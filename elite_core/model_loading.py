"""Where models and tokenizers come from: the built-in demo, a local directory, or a Hugging Face hub id."""

from __future__ import annotations

import re
from pathlib import Path

from elite_core.config import DEMO_MODEL

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


DEQUANTIZED_ON_LOAD = {"mxfp4": "Mxfp4Config", "fp8": "FineGrainedFP8Config"}
"""Checkpoint quantisations the engine loads as bf16 (transformers' config class for each, with dequantize=True)."""


class ModelSourceError(ValueError):
    """The model could not be found or read; the message says what to fix."""


def check_model_source(source: str) -> str | None:
    """A cheap check (no imports of transformers, no network): an error message, or None if the source looks usable."""
    source = source.strip()
    if not source:
        return "name a model: a hub id such as Qwen/Qwen2.5-Coder-1.5B, a local directory, or 'demo'"
    if source == DEMO_MODEL:
        return None
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"{source} is a file; give the model's directory (the one with config.json)"
        if not (path / "config.json").is_file():
            return f"{source} has no config.json: is it a Hugging Face model directory?"
        return None
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        return f"no such directory: {source}"
    if not _HUB_ID.match(source):
        return f"{source!r} is neither a local directory nor a hub id of the form owner/name"
    return None


def load_hf_config(source: str, trust_remote_code: bool = False):
    if source == DEMO_MODEL:
        from elite_core.demo_model import demo_model_config

        return demo_model_config()
    problem = check_model_source(source)
    if problem:
        raise ModelSourceError(problem)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError or hub errors depending on the cause
        raise ModelSourceError(f"cannot read the model config of {source}: {_first_line(exc)}") from exc


def load_model_shape(source: str, trust_remote_code: bool = False):
    """The model's shape for the memory model, from its config alone (no weights are read)."""
    from elite_core.memory_model import shape_from_hf_config

    hf_config = load_hf_config(source, trust_remote_code)
    shape = shape_from_hf_config(hf_config, name=source)
    if shape.experts > 1 or getattr(hf_config, "text_config", None) is not None:
        return count_on_meta_device(shape, hf_config, trust_remote_code)
    return shape


def count_on_meta_device(shape, hf_config, trust_remote_code: bool = False):
    """What the formulas cannot know, counted as transformers and the installed peft build the model on the meta device
    (no memory; a few seconds for 30B): a mixture of experts' all-linear adapter size (peft adapts the fused experts
    and the router its own way, which changes between releases), and a multimodal checkpoint's parameters and
    adapters outside the text decoder (Gemma 3's vision tower: AutoModelForCausalLM loads it, peft adapts it). The
    shape unchanged where building fails."""
    import dataclasses

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from elite_core.memory_model import lora_param_count

    rank = 8
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
        total = sum(p.numel() for p in model.parameters())
        adapted = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear"))
        adapters = sum(p.numel() for p in adapted.parameters() if p.requires_grad) // rank
    except Exception:
        return shape
    outside = max(0, total - shape.total_params)
    shape = dataclasses.replace(shape, outside_params=outside, total_params=shape.total_params + outside)
    if shape.experts > 1:  # the experts' share is what the linears leave (memory_model._expert_adapters_per_rank)
        return dataclasses.replace(shape, lora_params_per_rank=adapters)
    return dataclasses.replace(shape, outside_adapters_per_rank=max(0, adapters - lora_param_count(shape, 1)))


def load_tokenizer(source: str, trust_remote_code: bool = False):
    if source == DEMO_MODEL:
        from elite_core.demo_model import demo_tokenizer

        return demo_tokenizer()
    problem = check_model_source(source)
    if problem:
        raise ModelSourceError(problem)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelSourceError(f"cannot load the tokenizer of {source}: {_first_line(exc)}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelSourceError(f"{source} has no fast tokenizer (tokenizer.json); elite-tui needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def scale_rope(hf_config, factor: float) -> None:
    """Stretch RoPE (YaRN) so windows longer than the model's native context keep distinct positions."""
    if factor <= 1:
        return
    native = hf_config.max_position_embeddings
    parameters = dict(getattr(hf_config, "rope_parameters", None) or {})
    parameters.update(rope_type="yarn", factor=float(factor), original_max_position_embeddings=native)
    hf_config.rope_parameters = parameters
    hf_config.max_position_embeddings = int(native * factor)


def load_causal_lm(source: str, *, dtype, device: str, trust_remote_code: bool = False, attn_implementation: str = "sdpa",
                   quantization_config=None, seed: int = 0, rope_scaling_factor: float = 1.0):
    """The model for training. The demo is built from its config and loads its shipped weights; others load with
    from_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    from elite_core.memory_model import shipped_quantization, supports_sdpa

    hf_config = load_hf_config(source, trust_remote_code)
    scale_rope(hf_config, rope_scaling_factor)
    if attn_implementation == "sdpa" and not supports_sdpa(hf_config):
        attn_implementation = "eager"  # Gemma 2; the planner plans it so (planner.attention_for)
    if source == DEMO_MODEL:
        hf_config._attn_implementation = attn_implementation
        from elite_core.demo_model import load_demo_weights

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        load_demo_weights(model)
        return model.to(device)
    kwargs = {"config": hf_config, "dtype": dtype, "trust_remote_code": trust_remote_code,
              "attn_implementation": attn_implementation}
    shipped = shipped_quantization(hf_config)
    if quantization_config is not None:
        if shipped:
            raise ModelSourceError(f"{source} ships {shipped} weights, which QLoRA cannot quantise again: train it "
                                   "with qlora off, or give its bf16 checkpoint")
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    elif shipped in DEQUANTIZED_ON_LOAD:
        # transformers cannot train these (gpt-oss's MXFP4 experts, DeepSeek/Qwen FP8 checkpoints): bf16, as the
        # memory model counts them
        import transformers

        kwargs["quantization_config"] = getattr(transformers, DEQUANTIZED_ON_LOAD[shipped])(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise ModelSourceError(f"cannot load the model {source}: {_first_line(exc)}") from exc
    return model if quantization_config is not None else model.to(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
