"""Checkpoint offload to CPU RAM: synchronous pageable copies (the engine before) against copies on a side stream into
reused page-locked buffers (the engine now), side by side in one process on the same model and batch.

The first decoder layers of a random Llama-3.1-8B (all of them with --layers 0) with checkpointing offloaded, LoRA
r16, the engine's model build and loss. Per mode: a warm-up step (the page-locked buffers are registered there), then
timed steps; the loss and the adapter gradients of the first step must match between modes.

    python bench/offload_overlap.py --layers 8 --seqs 65536 131072 --out bench/results/offload-overlap-h100.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3


def measure(seq: int, layers: int, steps: int) -> list[dict]:
    import torch

    from bench.reference_models import random_model_loader
    from elite_core import lean_layers, training
    from elite_core.config import RunConfig
    from elite_core.memory_model import TrainingSetup

    training.load_causal_lm, config = random_model_loader("Llama-3.1-8B", layers=layers)
    setup = TrainingSetup(device="cuda", seq_tokens=seq, target_tokens=seq // 8, lora_rank=16, checkpointing="offload")
    run_config = RunConfig(model="Llama-3.1-8B", lora_rank=16, lora_alpha=32)
    model = training.build_lora_model(run_config, setup, "cuda")
    ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    labels = ids.clone()
    labels[:, : seq - seq // 8] = -100
    adapters = [p for p in model.parameters() if p.requires_grad]
    layer_input_bytes = seq * config.hidden_size * 2

    rows, reference = [], None
    for overlap in (False, True):
        seconds = []
        torch.cuda.reset_peak_memory_stats()
        for step in range(steps + 1):
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16), lean_layers.offload_saved_tensors(0, overlap=overlap):
                loss = training.model_loss(model, ids, labels, "chunked")
            loss.backward()
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
            if step == 0:
                grads = torch.cat([p.grad.float().flatten() for p in adapters])
                if reference is None:
                    reference = (float(loss), grads)
                    same_loss, grad_diff = True, 0.0
                else:
                    same_loss = float(loss) == reference[0]
                    grad_diff = float((grads - reference[1]).abs().max() / reference[1].abs().max())
        best = min(seconds[1:])
        rows.append({"engine": "overlapped" if overlap else "synchronous", "model": "Llama-3.1-8B", "layers": layers,
                     "seq": seq, "step_s": round(best, 3), "first_step_s": round(seconds[0], 3),
                     "tokens_per_s": round(seq / best, 1), "loss": round(float(loss), 6),
                     "loss_equal_to_synchronous": same_loss, "grad_max_rel_diff": grad_diff,
                     "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
                     "offloaded_gib": round(layers * layer_input_bytes / GIB, 2),
                     "gpu": torch.cuda.get_device_name()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of Llama-3.1-8B (0: all 32)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for seq in args.seqs:
        rows += measure(seq, args.layers, args.steps)
    print(f"\n{'seq':>7} {'sync step s':>12} {'overlap step s':>15} {'sync GiB':>9} {'overlap GiB':>12} {'grads':>9} {'speed-up':>9}")
    for seq in args.seqs:
        sync, over = [next(r for r in rows if r["seq"] == seq and r["engine"] == e) for e in ("synchronous", "overlapped")]
        print(f"{seq:>7} {sync['step_s']:>12.3f} {over['step_s']:>15.3f} {sync['peak_reserved_gib']:>9.2f} "
              f"{over['peak_reserved_gib']:>12.2f} {over['grad_max_rel_diff']:>9.1e} {sync['step_s'] / over['step_s']:>9.3f}")
    if args.out:
        args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
