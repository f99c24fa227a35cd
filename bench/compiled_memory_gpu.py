"""Where a compiled step's memory goes, against the eager step and the memory model, on a CUDA GPU.

    python bench/compiled_memory_gpu.py                      # the demo at tier 1 (4,608 tokens), micro-batch 1 and 7
    python bench/compiled_memory_gpu.py --points 7x1 3x2 --out bench/results/compiled-memory-h200.jsonl

Each point (micro-batch x tier, compiled or eager) runs in its own process, with the CUDA allocator the training
child gets (expandable segments, elite_core.runner; --allocator default: torch's own, as bench/results/
compiled-memory-h200.txt was measured before this switch existed): the engine's model (build_lora_model),
its optimizer and loss, three steps on random tokens. Per step it records the memory allocated after the forward (what
backward keeps), the peak allocated and reserved, and what lives outside torch's allocator. Beside it the memory
model's prediction for the same setup, then ratios. One JSON line per point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

GIB = 1024**3


def measure(micro_batch: int, tier: int, compiled: bool, model: str) -> dict:
    import torch

    from elite_core.config import default_config
    from elite_core.hardware import profile_hardware
    from elite_core.model_loading import load_hf_config
    from elite_core.memory_model import predict_memory, shape_from_hf_config
    from elite_core.planner import plan_for_config
    from elite_core.training import build_lora_model, forward_context, make_optimizer, model_loss

    config = default_config(model=model, micro_batch=micro_batch, compile_layers="on" if compiled else "off",
                            device="cuda").with_tier(tier)
    shape = shape_from_hf_config(load_hf_config(model), name=model)
    plan = plan_for_config(shape, profile_hardware(), config)
    setup = plan.setup
    window = setup.seq_tokens
    model_ = build_lora_model(config, setup, "cuda")
    optimizer = make_optimizer(model_, config, setup, "cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    input_ids = torch.randint(0, shape.vocab - 8, (micro_batch, window), device="cuda", generator=generator)
    labels = input_ids.clone()
    labels[:, : window - setup.target_tokens] = -100
    steps = []
    for _ in range(3):
        torch.cuda.reset_peak_memory_stats()
        optimizer.zero_grad(set_to_none=True)
        with forward_context(setup, shape.hidden):
            loss = model_loss(model_, input_ids, labels, setup.loss)
        after_forward = torch.cuda.memory_allocated()
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        outside = max(0, (total - free) - torch.cuda.memory_reserved())
        steps.append({"after_forward_gib": after_forward / GIB, "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                      "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB, "outside_torch_gib": outside / GIB})
    last = steps[-1]
    breakdown = predict_memory(shape, setup)
    return {"model": model, "micro_batch": micro_batch, "tier": tier, "window": window, "compiled": compiled,
            "gpu": torch.cuda.get_device_name(0), "steps": steps,
            "measured_gib": round(last["peak_reserved_gib"] + last["outside_torch_gib"], 3),
            "predicted_gib": round(breakdown.total_bytes / GIB, 3),
            "predicted": {name: round(value / GIB, 3) for name, value in breakdown.components()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--points", nargs="+", default=["1x1", "7x1"], help="MICROBATCHxTIER")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--allocator", choices=("engine", "default"), default="engine",
                        help="engine: expandable segments, as elite_core.runner starts the child; default: torch's own")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: one point, "MBxTIER:compiled|eager"
    args = parser.parse_args()
    if args.one:
        point, mode = args.one.split(":")
        micro_batch, tier = (int(part) for part in point.split("x"))
        print(json.dumps(measure(micro_batch, tier, mode == "compiled", args.model)))
        return 0
    env = dict(os.environ)
    if args.allocator == "engine":
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    else:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    rows = []
    for point in args.points:
        for mode in ("eager", "compiled"):
            child = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", f"{point}:{mode}"],
                                   capture_output=True, text=True, env=env)
            if child.returncode != 0:
                print(f"{point} {mode}: failed\n{child.stderr[-2000:]}", flush=True)
                continue
            row = {**json.loads(child.stdout.strip().splitlines()[-1]), "allocator": args.allocator}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'point':>9} {'mode':8} {'after fwd':>9} {'peak alloc':>10} {'reserved':>9} {'outside':>8} "
          f"{'measured':>9} {'predicted':>9} {'pred/meas':>9}  (GiB, the third step)")
    for row in rows:
        last = row["steps"][-1]
        print(f"{row['micro_batch']:>3}x{row['window']:<5} {'compiled' if row['compiled'] else 'eager':8} "
              f"{last['after_forward_gib']:>9.3f} {last['peak_allocated_gib']:>10.3f} {last['peak_reserved_gib']:>9.3f} "
              f"{last['outside_torch_gib']:>8.3f} {row['measured_gib']:>9.3f} {row['predicted_gib']:>9.3f} "
              f"{row['predicted_gib'] / row['measured_gib']:>9.3f}")
    if args.out:
        with args.out.open("a") as sink:
            sink.writelines(json.dumps(row) + "\n" for row in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
