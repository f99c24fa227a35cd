"""Which attention kernel the engine's training step really runs, under each SDPA backend order.

bench/attention_backends.py shows cuDNN's attention 1.8x faster than flash on an H100 when called alone, yet setting
cuDNN first (ELITE_SDPA_BACKENDS) did not change the engine's speed. This runs one training step of a 2-layer
random Llama-3.1-8B (the engine's own model build: lean layers, LoRA, checkpointing, chunked loss) under the torch
profiler for each order, each in its own process, and prints the attention kernels that ran and their GPU time.

    python bench/sdpa_dispatch.py --seq 16384 --out bench/results/sdpa-dispatch-h100.txt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ORDERS = {"default": "", "cudnn-first": "cudnn,flash,efficient,math", "flash-only": "flash"}
ATTENTION_WORDS = ("flash", "cudnn", "fmha", "attention", "sdpa", "mha")


def one_order(order: str, seq: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.reference_models import random_model_loader
    from elite_core import training
    from elite_core.config import RunConfig
    from elite_core.memory_model import TrainingSetup

    os.environ["ELITE_SDPA_BACKENDS"] = ORDERS[order]
    training.load_causal_lm, config = random_model_loader("Llama-3.1-8B", layers=2)
    training.prefer_sdpa_backends()
    setup = TrainingSetup(device="cuda", seq_tokens=seq, target_tokens=seq // 8, lora_rank=16, checkpointing="on")
    run_config = RunConfig(model="Llama-3.1-8B", lora_rank=16, lora_alpha=32)
    model = training.build_lora_model(run_config, setup, "cuda")
    optimizer = training.make_optimizer(model, run_config, setup, "cuda")
    ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")
    labels = ids.clone()
    labels[:, : seq - seq // 8] = -100

    def step():
        optimizer.zero_grad(set_to_none=True)
        with training.forward_context(setup, config.hidden_size):
            loss = training.model_loss(model, ids, labels, "chunked")
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()

    step()  # warm-up: cuDNN builds its execution plans here
    started = time.perf_counter()
    step()
    step_s = time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key
        if any(word in name.lower() for word in ATTENTION_WORDS):
            kernels[name[:90]] = kernels.get(name[:90], 0.0) + event.device_time_total / 1000.0
    return {"order": order, "seq": seq, "step_s": round(step_s, 3), "attention_ms": round(sum(kernels.values()), 2),
            "kernels": {name: round(ms, 2) for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:6]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--order", choices=tuple(ORDERS), help="(internal) measure one order in this process")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.order:
        print(json.dumps(one_order(args.order, args.seq)))
        return 0
    rows = []
    for order in ORDERS:
        done = subprocess.run([sys.executable, __file__, "--order", order, "--seq", str(args.seq)],
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        rows.append(json.loads(lines[-1]) if lines else {"order": order, "error": done.stderr[-800:]})
    text = []
    for row in rows:
        if "error" in row:
            text.append(f"{row['order']:<12} failed: {row['error']}")
            continue
        text.append(f"{row['order']:<12} step {row['step_s']:.3f} s   attention kernels {row['attention_ms']:.1f} ms")
        text.extend(f"    {ms:9.2f} ms  {name}" for name, ms in row["kernels"].items())
    print("\n".join(text))
    if args.out:
        args.out.write_text("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
