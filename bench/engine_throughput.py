"""Engine benchmark: hand-written transformers + peft (the baseline) against elite-tui's engine, in one run.

Random-initialised real architectures from their configs (weights' values do not change speed or memory). Per model
and sequence length: one warm-up step, then timed steps; tokens/s, peak memory (torch peak reserved), the loss on the
same batch before any update. `--longest` doubles the sequence until a step fails (OOM), then bisects.

    python bench/engine_throughput.py --models qwen1.5b llama8b --seqs 4096 16384 --out results.jsonl
    python bench/engine_throughput.py --models llama8b --engines elite --longest 32768 --max-seq 294912
    python bench/engine_throughput.py --smoke     # tiny config on CPU: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

# Both engines run on the allocator the training child gets (elite_core.runner): with torch's default one the
# 1.5B's 524,288-token step reserved 121.5 GiB for 107.4 allocated, with expandable segments 110.3
# (bench/results/engine-long-h200.txt).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elite_core.config import RunConfig  # noqa: E402
from elite_core.memory_model import TrainingSetup, shape_from_hf_config  # noqa: E402
from elite_core.lean_layers import use_lean_norms  # noqa: E402
from elite_core.model_loading import load_causal_lm  # noqa: E402
from elite_core.training import (  # noqa: E402
    add_lora,
    compile_decoder_layers,
    forward_context,
    model_loss,
    prefer_sdpa_backends,
    quantization_config_for,
    torch_dtype,
)

from bench.reference_models import reference_config, saved_random_model  # noqa: E402

MODELS = {"qwen1.5b": "Qwen2.5-Coder-1.5B", "llama8b": "Llama-3.1-8B", "tiny": None}
"""Short names on the command line and in the results; "tiny" checks the script on a CPU."""
TINY = dict(kind="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=256)
LORA_RANK = 16
COMPILE = False
QLORA = False
GPU_CHECKPOINT_LAYERS = -1
"""-1: as many as the planner keeps on the GPU for this host's RAM; else this many layers' checkpoints stay on the GPU."""


def hf_config(name: str):
    config = reference_config(MODELS[name], TINY if name == "tiny" else None)
    config._attn_implementation = "sdpa"
    return config


def random_model(name: str, device: str, dtype: torch.dtype, rope_factor: float = 1.0):
    from transformers import AutoModelForCausalLM

    from elite_core.model_loading import scale_rope

    config = hf_config(name)
    scale_rope(config, rope_factor)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def batch(vocab: int, seq: int, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (1, seq), generator=generator).to(device)
    return input_ids


def baseline_model(name: str, device: str, seq: int):
    """What a user writes by hand: bf16, LoRA r=16 on all linear layers, non-reentrant checkpointing, SDPA, AdamW,
    the model's own loss."""
    from peft import LoraConfig, get_peft_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(name, device, dtype)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(input_ids):
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step, ("ckpt", "full-loss")


def elite_setup(name: str, device: str, seq: int, target: int, qlora: bool = False) -> TrainingSetup:
    """The planner's choice for this model and window on this device's measured memory."""
    from elite_core.hardware import profile_hardware
    from elite_core.planner import plan_for_config

    profile = profile_hardware(None)
    config = RunConfig(model="bench", context_tokens=seq - target, target_tokens=target, lora_rank=LORA_RANK,
                       lora_alpha=2 * LORA_RANK, qlora=qlora)
    plan = plan_for_config(shape_from_hf_config(hf_config(name)), profile, config)
    return plan.setup, plan


def elite_model(name: str, device: str, seq: int, target: int, qlora: bool = False, setup: TrainingSetup | None = None):
    if setup is None:
        setup, _ = elite_setup(name, device, seq, target, qlora)
    if GPU_CHECKPOINT_LAYERS >= 0:
        setup = dataclasses.replace(setup, gpu_checkpoint_layers=GPU_CHECKPOINT_LAYERS)
    if setup.weight_dtype in ("nf4", "int8"):
        model = load_causal_lm(str(saved_random_model(name, hf_config(name))), dtype=torch_dtype(setup.compute_dtype), device=device,
                               quantization_config=quantization_config_for(setup),
                               rope_scaling_factor=setup.rope_scaling_factor)
    else:
        model = random_model(name, device, torch_dtype(setup.weight_dtype), setup.rope_scaling_factor)
    config = RunConfig(model="bench", lora_rank=LORA_RANK, lora_alpha=2 * LORA_RANK,
                       context_tokens=seq - target, target_tokens=target)
    model = add_lora(model, config, setup)
    if COMPILE:
        compile_decoder_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if setup.adamw_8bit:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")

    def step(input_ids):
        labels = input_ids.clone()
        labels[:, : seq - target] = -100
        with forward_context(setup, model.config.hidden_size):
            loss = model_loss(model, input_ids, labels, "chunked")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    options = [o for o in (
        f"ckpt-{setup.checkpointing}", "chunked-loss", "target-only-loss",
        "tiled-mlp" if setup.tiled_mlp else "", "8bit-adam" if setup.adamw_8bit else "",
        "qlora" if setup.weight_dtype == "nf4" else "",
        f"{setup.gpu_checkpoint_layers}-ckpt-on-gpu" if setup.checkpointing == "offload" and setup.gpu_checkpoint_layers else "",
        "lean-layers",
        f"rope-x{setup.rope_scaling_factor:g}" if setup.rope_scaling_factor > 1 else "",
        "compiled-layers" if COMPILE else "") if o]
    return model, step, tuple(options), setup


def same_batch_losses(name: str, device: str, seq: int) -> tuple[float, float]:
    """The math never changes: the baseline's loss and the engine's chunked loss on one batch, same weights."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = random_model(name, device, dtype)
    input_ids = batch(model.config.vocab_size, seq, device, seed=1)
    with torch.no_grad():
        plain = model(input_ids=input_ids, labels=input_ids).loss.float().item()
        if COMPILE:
            compile_decoder_layers(model)  # the check then covers the compiled layers' numerics too
        else:
            use_lean_norms(model)  # the engine's lean RMSNorm, as add_lora applies it
        setup = TrainingSetup(device=device, seq_tokens=seq, target_tokens=seq, compute_dtype="bf16" if device == "cuda" else "fp32")
        with forward_context(setup):
            ours = model_loss(model, input_ids, input_ids, "chunked").float().item()
    del model
    release(device)
    return plain, ours


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure(engine: str, name: str, device: str, seq: int, target: int, timed_steps: int) -> dict:
    record = {"engine": engine, "model": name, "seq": seq, "ok": False, "tokens_per_s": 0.0, "peak_gib": 0.0,
              "options": [], "loss": None, "error": ""}
    model = step = None
    try:
        if engine == "baseline":
            model, step, options = baseline_model(name, device, seq)
        else:
            model, step, options, setup = elite_model(name, device, seq, target, qlora=QLORA)
            from elite_core.memory_model import predict_memory

            record["predicted_gib"] = round(predict_memory(shape_from_hf_config(hf_config(name)), setup).total_bytes / 2**30, 3)
        record["options"] = list(options)
        input_ids = batch(model.config.vocab_size, seq, device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warm_started = time.perf_counter()
        loss = step(input_ids)  # warm-up: allocator, cuBLAS, kernels
        record["loss"] = float(loss.item())
        if device == "cuda":
            torch.cuda.synchronize()
        record["first_step_s"] = time.perf_counter() - warm_started
        started = time.perf_counter()
        for _ in range(timed_steps):
            step(input_ids)
        if device == "cuda":
            torch.cuda.synchronize()
            record["peak_gib"] = torch.cuda.max_memory_reserved() / 2**30
            record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        seconds = time.perf_counter() - started
        # A search step at hundreds of thousands of tokens runs once: its rate includes the warm-up.
        record["tokens_per_s"] = seq * timed_steps / seconds if timed_steps else seq / record["first_step_s"]
        record["ok"] = True
    except torch.cuda.OutOfMemoryError as exc:
        record["error"] = "OOM: " + str(exc).splitlines()[0][:120]
    finally:
        del model, step
        release(device)
    return record


def longest(engine: str, name: str, device: str, start: int, max_seq: int, target_of) -> list[dict]:
    """Double from `start` until a step fails or max_seq is reached, then bisect between the last pass and first fail."""
    records, good, bad, seq = [], 0, None, start
    while seq <= max_seq:
        record = measure(engine, name, device, seq, target_of(seq), timed_steps=0 if seq > 65536 else 1)
        records.append(record)
        print(json.dumps(record), flush=True)
        if not record["ok"]:
            bad = seq
            break
        good = seq
        if seq == max_seq:
            break
        seq = min(seq * 2, max_seq)
    for _ in range(2 if bad else 0):
        middle = (good + bad) // 2 // 1024 * 1024
        if middle <= good:
            break
        record = measure(engine, name, device, middle, target_of(middle), timed_steps=0)
        records.append(record)
        print(json.dumps(record), flush=True)
        good, bad = (middle, bad) if record["ok"] else (good, middle)
    return records


def tier_target(seq: int) -> int:
    """About the tiers' share of the window for the target (an eighth of the context, at least 512 tokens)."""
    return max(min(512, seq // 2), seq // 9)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["qwen1.5b", "llama8b"])
    parser.add_argument("--engines", nargs="+", default=["baseline", "elite"])
    parser.add_argument("--seqs", nargs="*", type=int, default=[4096, 16384])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--longest", type=int, default=0, help="start of the longest-context search (0: skip)")
    parser.add_argument("--max-seq", type=int, default=524288)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder layers of the elite engine")
    parser.add_argument("--no-check", action="store_true", help="skip the same-batch loss check (long single steps)")
    parser.add_argument("--qlora", action="store_true", help="the elite engine loads 4-bit NF4 weights (bitsandbytes)")
    parser.add_argument("--gpu-checkpoint-layers", type=int, default=-1,
                        help="with offload, keep this many layers' checkpoints on the GPU (-1: the planner's choice)")
    args = parser.parse_args()
    global COMPILE, QLORA, GPU_CHECKPOINT_LAYERS
    COMPILE, QLORA, GPU_CHECKPOINT_LAYERS = args.compile, args.qlora, args.gpu_checkpoint_layers
    prefer_sdpa_backends()  # ELITE_SDPA_BACKENDS, as the engine applies it

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.models, args.seqs, args.steps = ["tiny"], [128], 1
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    records = []
    for name in args.models:
        if not args.no_check:
            plain, ours = same_batch_losses(name, device, 4096 if device == "cuda" else 128)
            records.append({"engine": "check", "model": name, "seq": 4096, "baseline_loss": plain, "elite_loss": ours,
                            "rel_diff": abs(plain - ours) / abs(plain), "gpu": gpu})
            print(json.dumps(records[-1]), flush=True)
        for seq in args.seqs:
            for engine in args.engines:
                record = measure(engine, name, device, seq, tier_target(seq), args.steps)
                record["gpu"] = gpu
                records.append(record)
                print(json.dumps(record), flush=True)
        if args.longest:
            for engine in args.engines:
                for record in longest(engine, name, device, args.longest, args.max_seq, tier_target):
                    record["gpu"] = gpu
                    record["search"] = "longest"
                    records.append(record)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
    print_table(records)
    return 0


def print_table(records: list[dict]) -> None:
    rows = [r for r in records if r["engine"] in ("baseline", "elite") and not r.get("search")]
    print(f"\n{'model':10} {'seq':>7} {'baseline tok/s':>15} {'elite tok/s':>12} {'base GiB':>9} {'elite GiB':>9} {'ratio':>6}")
    keys = sorted({(r["model"], r["seq"]) for r in rows})
    for model, seq in keys:
        base = next((r for r in rows if r["model"] == model and r["seq"] == seq and r["engine"] == "baseline"), None)
        ours = next((r for r in rows if r["model"] == model and r["seq"] == seq and r["engine"] == "elite"), None)

        def cell(r, key, fmt):
            return format(r[key], fmt) if r and r["ok"] else "OOM" if r else "-"

        ratio = (ours["tokens_per_s"] / base["tokens_per_s"]) if base and ours and base["ok"] and ours["ok"] else float("nan")
        print(f"{model:10} {seq:>7} {cell(base, 'tokens_per_s', ',.0f'):>15} {cell(ours, 'tokens_per_s', ',.0f'):>12} "
              f"{cell(base, 'peak_gib', '.1f'):>9} {cell(ours, 'peak_gib', '.1f'):>9} {ratio:>6.2f}")
    searches = [r for r in records if r.get("search")]
    for model in sorted({r["model"] for r in searches}):
        for engine in ("baseline", "elite"):
            done = [r["seq"] for r in searches if r["model"] == model and r["engine"] == engine and r["ok"]]
            failed = [r["seq"] for r in searches if r["model"] == model and r["engine"] == engine and not r["ok"]]
            if done or failed:
                print(f"longest {engine:8} {model:10}: {max(done, default=0):,} tokens ran"
                      f"{'; first failure at ' + format(min(failed), ',') if failed else ''}")


if __name__ == "__main__":
    sys.exit(main())
