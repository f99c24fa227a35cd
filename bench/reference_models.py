"""The public architectures the benchmarks build with random weights, sized as in their published configs.

One owner for these numbers: the memory, engine and multi-GPU benchmarks all read them from here.
"""

from __future__ import annotations

from pathlib import Path

REFERENCE_MODELS = {
    "Qwen2.5-Coder-1.5B": dict(kind="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                               num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                               tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6),
    "Llama-3.1-8B": dict(kind="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=5e5),
    "Qwen2.5-Coder-7B": dict(kind="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                             num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                             tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=1e6),
    # Held out of every fit so far (the step-time constants included): other shapes to check the planner on.
    "Llama-3.2-3B": dict(kind="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                         tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=5e5),
    "Qwen2.5-Coder-14B": dict(kind="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                              num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                              tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=1e6),
    # Architectures the memory model learned from autograd on CPU only (q/k norms; mixtures of experts).
    "Qwen3-8B": dict(kind="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                     max_position_embeddings=40960, rope_theta=1e6),
    "Qwen1.5-MoE-A2.7B": dict(kind="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                              moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
                              num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                              tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=1e6),
    # Qwen3-Coder-30B-A3B at half its 48 layers: the whole one (61 GB of bf16 weights, 1 G adapter parameters at rank
    # 16) leaves an 80 GB GPU nothing to measure.
    "Qwen3-Coder-30B-A3B-24-layers": dict(kind="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                          moe_intermediate_size=768, num_hidden_layers=24, num_attention_heads=32,
                                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                          tie_word_embeddings=False, max_position_embeddings=262144, rope_theta=1e7),
    # DeepSeek-V2-Lite (DeepSeek-Coder-V2-Lite's shape) at 12 of its 27 layers: latent attention, a dense first layer.
    "DeepSeek-V2-Lite-12-layers": dict(kind="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                                       moe_intermediate_size=1408, num_hidden_layers=12, num_attention_heads=16,
                                       num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
                                       num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512,
                                       q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
                                       tie_word_embeddings=False, max_position_embeddings=163840),
    # gpt-oss-20b at 12 of its 24 layers: attention sinks (eager), clamped-GLU experts, a router that is no Linear.
    "gpt-oss-20b-12-layers": dict(kind="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                                  num_hidden_layers=12, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                                  num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                                  tie_word_embeddings=False, max_position_embeddings=131072),
    "StarCoder2-3B": dict(kind="starcoder2", vocab_size=49152, hidden_size=3072, intermediate_size=12288,
                          num_hidden_layers=30, num_attention_heads=24, num_key_value_heads=2, use_bias=True,
                          tie_word_embeddings=True, max_position_embeddings=16384, rope_theta=999999.4420358813),
}


def reference_config(name: str, values: dict | None = None):
    """A transformers config for a reference model (or for `values` in the same form), with the KV cache off."""
    from transformers import (DeepseekV2Config, GptOssConfig, LlamaConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
                              Qwen3MoeConfig, Starcoder2Config)

    values = dict(values if values is not None else REFERENCE_MODELS[name])
    kind = values.pop("kind")
    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "qwen2_moe": Qwen2MoeConfig,
               "qwen3_moe": Qwen3MoeConfig, "deepseek_v2": DeepseekV2Config, "gpt_oss": GptOssConfig,
               "starcoder2": Starcoder2Config}
    return classes[kind](**values, use_cache=False)


def saved_random_model(name: str, config) -> Path:
    """The directory of a random-weight model saved once with save_pretrained (ELITE_BENCH_MODELS, default
    /tmp/elite-bench-models). QLoRA quantises while loading, so its benchmarks load this the engine's way."""
    import os
    import time

    import torch
    from transformers import AutoModelForCausalLM

    root = Path(os.environ.get("ELITE_BENCH_MODELS", "/tmp/elite-bench-models")) / name
    if not (root / "config.json").exists():
        started = time.perf_counter()
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(root, max_shard_size="4GB")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"saved a random {name} to {root} in {time.perf_counter() - started:.0f} s", flush=True)
    return root


def random_model_loader(name: str, layers: int = 0):
    """Stands in for elite_core.training.load_causal_lm: the reference model (first `layers` decoder layers only, when
    given) built from its config with random weights, so a benchmark runs the engine's own model build on it."""
    config = reference_config(name)
    if layers:
        config.num_hidden_layers = layers

    def load(source, *, dtype, device, trust_remote_code=False, attn_implementation="sdpa", quantization_config=None,
             seed=0, rope_scaling_factor=1.0):
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)

    return load, config
