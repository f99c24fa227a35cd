"""What one decoder layer keeps for backward, measured against the memory model, per architecture, on CPU.

The measurement: the bytes autograd saves (a saved-tensors hook, one count per storage, parameters left out) for the
same small model with 3 layers less with 2, so the first layer's edge (nothing before its first adapter needs a
gradient) drops out. LoRA rank 16 on all linears (and on some only, for two mixtures of experts), no checkpointing, the engine's own layers (training.add_lora), fp32
and bf16 under autocast as the engine trains. Beside the memory model of a baseline revision (default 780718a, the
model before it learned these architectures), run from `git show` of that revision's memory_model.py.

    PYTHONPATH=. python3 bench/memory_autograd_cpu.py [--baseline REV] [--seq 256]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def small_config(architecture: str, layers: int, dense: int = 0):
    """The small models of tests/test_memory_model.py: 128 wide, 4 heads of 32 (2 key/value heads), vocabulary 300.
    `dense`: a mixture of experts' first layers with a dense MLP instead of experts (DeepSeek, Qwen-MoE)."""
    import transformers

    qwen_dense = dict(mlp_only_layers=list(range(dense)))

    common = dict(vocab_size=300, hidden_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32)
    no_head_dim = {k: v for k, v in common.items() if k != "head_dim"}
    moe = dict(intermediate_size=256, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2)
    return {
        "llama": lambda: transformers.LlamaConfig(**common, intermediate_size=384),
        "qwen2": lambda: transformers.Qwen2Config(**common, intermediate_size=384),
        "mistral": lambda: transformers.MistralConfig(**common, intermediate_size=384),
        "granite": lambda: transformers.GraniteConfig(**common, intermediate_size=384),
        "gemma": lambda: transformers.GemmaConfig(**common, intermediate_size=384),
        "qwen3": lambda: transformers.Qwen3Config(**common, intermediate_size=384),
        "olmo2": lambda: transformers.Olmo2Config(**common, intermediate_size=384, eos_token_id=None, pad_token_id=1),
        "gemma2": lambda: transformers.Gemma2Config(**common, intermediate_size=384),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(**common, intermediate_size=384),
        "phi3": lambda: transformers.Phi3Config(**no_head_dim, intermediate_size=384, pad_token_id=0),
        "gpt_oss": lambda: transformers.GptOssConfig(**common, intermediate_size=64, num_local_experts=8,
                                                     num_experts_per_tok=2),
        "starcoder2": lambda: transformers.Starcoder2Config(**no_head_dim, intermediate_size=384, bos_token_id=0,
                                                           eos_token_id=0),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**common, **moe, **qwen_dense),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=256,
                                                         **qwen_dense),
        "mixtral": lambda: transformers.MixtralConfig(**common, intermediate_size=256, num_local_experts=8,
                                                     num_experts_per_tok=2),
        "deepseek_v2": lambda: transformers.DeepseekV2Config(
            **{**no_head_dim, "num_key_value_heads": 4}, intermediate_size=384, moe_intermediate_size=64,
            n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=dense, kv_lora_rank=32,
            q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32),
    }[architecture]()


MOE_TARGET_SETS = [("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"), ("down_proj",)]
ARCHITECTURES = ["llama", "qwen2", "mistral", "granite", "gemma", "qwen3", "olmo2", "gemma2", "gemma3_text", "phi3",
                 "starcoder2", "qwen3_moe", "gpt_oss", "qwen2_moe", "mixtral", "deepseek_v2"]


def baseline_memory_model(revision: str):
    source = subprocess.run(["git", "show", f"{revision}:elite_core/memory_model.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_memory_model.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_memory_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def saved_bytes(architecture: str, layers: int, dtype: str, seq: int, attention: str,
                targets: tuple[str, ...] = ("all-linear",), dense: int = 0) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from elite_core import training
    from elite_core.config import default_config
    from elite_core.memory_model import TrainingSetup

    setup = TrainingSetup(device="cpu", seq_tokens=seq, target_tokens=64, lora_rank=16, weight_dtype=dtype,
                          compute_dtype=dtype, checkpointing="off", attention=attention, lora_targets=",".join(targets))
    config = default_config().replace(lora_rank=16, lora_alpha=32, lora_target_modules=targets)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(small_config(architecture, layers, dense), dtype=training.torch_dtype(dtype),
                                             attn_implementation=attention)
    model = training.add_lora(model, config, setup)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    input_ids = torch.randint(0, 300, (1, seq), generator=torch.Generator().manual_seed(1))
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if setup.autocast else contextlib.nullcontext()
    with cast, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.get_base_model().model(input_ids=input_ids, use_cache=False)
    return sum(saved.values())


def predicted_bytes(module, architecture: str, dtype: str, seq: int, attention: str, counted: bool,
                    targets: tuple[str, ...] = ("all-linear",)) -> float:
    hf_config = small_config(architecture, 2)
    shape = module.shape_from_hf_config(hf_config)
    if counted and shape.experts > 1:
        from elite_core.model_loading import count_on_meta_device

        shape = count_on_meta_device(shape, hf_config)
    setup = module.TrainingSetup(device="cpu", seq_tokens=seq, target_tokens=64, lora_rank=16, weight_dtype=dtype,
                                 compute_dtype=dtype, checkpointing="off", attention=attention,
                                 lora_targets=",".join(targets))
    per_layer = module.layer_activation_bytes_per_token(shape, setup) * seq
    fixed = getattr(module, "layer_fixed_activation_bytes", None)
    return per_layer + (fixed(shape, setup) if fixed else 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="780718a")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dense-baseline", default="9a52bf4", help="the revision before dense layers were counted")
    args = parser.parse_args()

    import torch
    import transformers

    import peft
    from elite_core import memory_model
    from elite_core.hardware import fake_profile
    from elite_core.planner import attention_for

    baseline = baseline_memory_model(args.baseline)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"{args.seq} tokens, rank 16, all linears; bytes one decoder layer keeps for backward")
    print(f"{'architecture':<12} {'dtype':<5} {'attention':<9} {'measured':>10} {'baseline':>10} {'ours':>10} "
          f"{'baseline err':>12} {'ours err':>9}")
    worst_baseline = worst_ours = 0.0
    cases = [(architecture, ("all-linear",)) for architecture in ARCHITECTURES]
    cases += [(architecture, targets) for architecture in ("qwen3_moe", "qwen2_moe") for targets in MOE_TARGET_SETS]
    for architecture, targets in cases:
        shape = memory_model.shape_from_hf_config(small_config(architecture, 2))
        attention = attention_for(fake_profile("cpu"), shape)
        name = architecture if targets == ("all-linear",) else f"{architecture} LoRA on {','.join(targets)}"
        for dtype in ("fp32", "bf16"):
            measured = saved_bytes(architecture, 3, dtype, args.seq, attention, targets) - saved_bytes(
                architecture, 2, dtype, args.seq, attention, targets)
            old = predicted_bytes(baseline, architecture, dtype, args.seq, attention, False, targets)
            new = predicted_bytes(memory_model, architecture, dtype, args.seq, attention, True, targets)
            old_error, new_error = 100 * (old / measured - 1), 100 * (new / measured - 1)
            worst_baseline = max(worst_baseline, abs(old_error))
            worst_ours = max(worst_ours, abs(new_error))
            print(f"{name:<12} {dtype:<5} {attention:<9} {measured:>10,} {old:>10,.0f} {new:>10,.0f} "
                  f"{old_error:>+11.1f}% {new_error:>+8.1f}%", flush=True)
    print(f"largest error: baseline {worst_baseline:.1f} %, ours {worst_ours:.1f} %")
    dense_layers(memory_model, args.seq, args.dense_baseline)
    score_backward(memory_model, args.dense_baseline)
    return 0


def backward_peak_bytes(architecture: str, attention: str, dtype: str, seq: int) -> int:
    """One decoder layer's backward: the peak resident set over what its forward left (Linux's VmHWM, reset before
    backward), the second of two passes."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from elite_core import training
    from elite_core.config import default_config
    from elite_core.memory_model import TrainingSetup
    from elite_core.training import peak_rss_bytes, reset_peak_rss

    setup = TrainingSetup(device="cpu", seq_tokens=seq, target_tokens=64, lora_rank=16, weight_dtype=dtype,
                          compute_dtype=dtype, checkpointing="off", attention=attention)
    model = AutoModelForCausalLM.from_config(small_config(architecture, 1), dtype=training.torch_dtype(dtype),
                                             attn_implementation=attention)
    model = training.add_lora(model, default_config().replace(lora_rank=16, lora_alpha=32), setup)
    process, peak = psutil.Process(), 0
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if setup.autocast else contextlib.nullcontext()
    for _ in range(2):
        with cast:
            hidden = model.get_base_model().model(input_ids=torch.randint(0, 300, (1, seq)), use_cache=False)
        loss = hidden.last_hidden_state.float().pow(2).mean()
        before = process.memory_info().rss
        reset_peak_rss()
        loss.backward()
        peak = peak_rss_bytes() - before
        model.zero_grad(set_to_none=True)
        del hidden, loss
    return peak


def score_backward(memory_model, revision: str, seq: int = 2048) -> None:
    """Eager attention's backward (and latent attention's on CPU, whose SDPA takes the math path for unequal head
    widths): what one layer's backward needs over its forward, against the transient of `revision`, which counted no
    score-sized buffers."""
    import os

    if not os.access("/proc/self/clear_refs", os.W_OK):
        print("\n(no resettable peak RSS here: the backward table needs Linux)")
        return
    baseline = baseline_memory_model(revision)
    print()
    print(f"one layer's backward over its forward (peak resident set), {seq} tokens; baseline {revision}")
    print(f"{'architecture':<12} {'dtype':<5} {'attention':<9} {'measured':>12} {'baseline':>12} {'ours':>12} "
          f"{'baseline err':>12} {'ours err':>9}")
    for architecture, attention in (("gpt_oss", "eager"), ("gemma2", "eager"), ("deepseek_v2", "sdpa")):
        for dtype in ("fp32", "bf16"):
            measured = backward_peak_bytes(architecture, attention, dtype, seq)
            values = []
            for module in (baseline, memory_model):
                shape = module.shape_from_hf_config(small_config(architecture, 1))
                setup = module.TrainingSetup(device="cpu", seq_tokens=seq, target_tokens=64, lora_rank=16,
                                             weight_dtype=dtype, compute_dtype=dtype, checkpointing="off",
                                             attention=attention)
                values.append(module.backward_transient_bytes_per_token(shape, setup, module.DEFAULT_CONSTANTS) * seq)
            old, new = values
            print(f"{architecture:<12} {dtype:<5} {attention:<9} {measured:>12,} {old:>12,.0f} {new:>12,.0f} "
                  f"{100 * (old / measured - 1):>+11.1f}% {100 * (new / measured - 1):>+8.1f}%", flush=True)


def dense_layer_shape(module, architecture: str, layers: int, dense: int):
    from elite_core.model_loading import count_on_meta_device

    hf_config = small_config(architecture, layers, dense)
    return count_on_meta_device(module.shape_from_hf_config(hf_config), hf_config)


def dense_layers(memory_model, seq: int, revision: str) -> None:
    """Mixtures of experts whose first layers have a dense MLP (DeepSeek's first_k_dense_replace, Qwen-MoE's
    mlp_only_layers): 4 layers, 2 of them dense. Parameters and all-linear adapters of the whole model, and what its
    layers after the first keep (4 layers less a 1-layer model: the first layer's edge drops out), against the
    memory model of `revision` (which counts every layer as an expert layer)."""
    import transformers  # noqa: F401  (small_config)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    baseline = baseline_memory_model(revision)
    print()
    print(f"mixtures of experts with dense layers: 4 layers, the first 2 dense; baseline {revision}")
    print(f"{'architecture':<12} {'what':<22} {'measured':>10} {'baseline':>10} {'ours':>10} {'baseline err':>12} "
          f"{'ours err':>9}")

    def row(name, what, measured, old, new):
        print(f"{name:<12} {what:<22} {measured:>10,.0f} {old:>10,.0f} {new:>10,.0f} "
              f"{100 * (old / measured - 1):>+11.1f}% {100 * (new / measured - 1):>+8.1f}%", flush=True)

    for architecture in ("deepseek_v2", "qwen2_moe", "qwen3_moe"):
        model = AutoModelForCausalLM.from_config(small_config(architecture, 4, 2))
        real_params = sum(p.numel() for p in model.parameters())
        adapted = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
        real_adapters = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        ours, old = dense_layer_shape(memory_model, architecture, 4, 2), dense_layer_shape(baseline, architecture, 4, 2)
        row(architecture, "parameters", real_params, old.total_params, ours.total_params)
        row(architecture, "adapters, rank 16", real_adapters, baseline.lora_param_count(old, 16),
            memory_model.lora_param_count(ours, 16))
        for dtype in ("fp32", "bf16"):
            setup = memory_model.TrainingSetup(device="cpu", seq_tokens=seq, target_tokens=64, lora_rank=16,
                                               weight_dtype=dtype, compute_dtype=dtype, checkpointing="off")
            old_setup = baseline.TrainingSetup(device="cpu", seq_tokens=seq, target_tokens=64, lora_rank=16,
                                               weight_dtype=dtype, compute_dtype=dtype, checkpointing="off")
            measured = (saved_bytes(architecture, 4, dtype, seq, "sdpa", dense=2)
                        - saved_bytes(architecture, 1, dtype, seq, "sdpa", dense=1))
            one = dense_layer_shape(memory_model, architecture, 1, 1)
            new = (memory_model.decoder_activation_bytes(ours, setup)
                   - memory_model.decoder_activation_bytes(one, setup))
            old_layer = (baseline.layer_activation_bytes_per_token(old, old_setup) * seq
                         + baseline.layer_fixed_activation_bytes(old, old_setup))
            row(architecture, f"layers 2-4 keep, {dtype}", measured, 3 * old_layer, new)


if __name__ == "__main__":
    sys.exit(main())
