"""Multi-GPU benchmark: data-parallel (DDP) and ZeRO-2 training of the Qwen2.5-Coder-1.5B config against one GPU.

Every run goes through the product's own path: a run directory with config.yaml and launch.json, the argv from
elite_core.distributed.spawn_command (the plain child for one GPU, torchrun or DeepSpeed's launcher for more), events
read from the pipe as the runner reads them. Runs:
  1 GPU,  micro-batch m, accumulation 2a   (the same global batch as the runs below, the same per-GPU micro-batch)
  N GPUs, micro-batch m, accumulation a,  DDP            (deepspeed: off)
  N GPUs, micro-batch m, accumulation a,  ZeRO-2         (only where deepspeed is installed; else recorded as skipped)
tokens_per_s is the global rate (all GPUs) over the steps after the warm-up; the bar is >= 1.8x one GPU. loss is the
last step's; the per-step losses must follow the single-GPU run (the same windows in every update).

The model is random-initialised from the published config (values do not change speed) and saved once to --model-dir;
the byte-level demo tokenizer builds the training set from --repo, so nothing is downloaded.

    python bench/multigpu_throughput.py --out bench/results/multigpu-h200.jsonl      # on a 2-GPU machine
    python bench/multigpu_throughput.py --smoke --out /tmp/smoke.jsonl                 # demo model, 2 CPU processes
Each output line is one JSON object: run, gpus, mode, tokens_per_s, loss, losses, gpu, micro_batch, grad_accum, ...
and a final summary line with speedup, loss_max_rel_diff and passed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPEEDUP_BAR = 1.8


def make_model_dir(directory: Path) -> Path:
    """Random-initialised Qwen2.5-Coder-1.5B in bf16 with the demo tokenizer, saved once and reused."""
    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        return directory
    import torch
    from transformers import AutoModelForCausalLM

    from bench.reference_models import reference_config
    from elite_core.demo_model import demo_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(reference_config("Qwen2.5-Coder-1.5B"), dtype=torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    demo_tokenizer().save_pretrained(directory)
    return directory


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "cpu"


def launch(config, gpus: int, log_to: Path) -> list:
    """Run to the end as the runner would, returning every event."""
    from elite_core import distributed, protocol
    from elite_core.runner import prepare_run_dir

    run_dir = prepare_run_dir(config).resolve()
    if gpus > 1:
        distributed.save_launch(run_dir, distributed.LaunchSettings(nproc=gpus))
    read_fd, write_fd = os.pipe()
    command = distributed.spawn_command(run_dir, ["--event-fd", str(write_fd)])
    print(" ".join(command), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_to, "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                   pass_fds=(write_fd,), env=env, start_new_session=True)
    os.close(write_fd)
    with os.fdopen(read_fd, "r", encoding="utf-8") as pipe:
        events = [protocol.decode_event(line) for line in pipe if line.strip()]
    process.wait()
    return events


def summarise(name: str, mode: str, gpus: int, config, events: list, warmup_steps: int, device: str) -> dict:
    from elite_core import protocol

    steps = [e for e in events if isinstance(e, protocol.StepMetrics)]
    errors = [e.message for e in events if isinstance(e, protocol.Error)]
    timed = steps[warmup_steps:] or steps
    return {
        "run": name,
        "mode": mode,
        "gpus": gpus,
        "gpu": device,
        "tokens_per_s": statistics.median(s.tokens_per_s for s in timed) if timed else 0.0,
        "loss": steps[-1].loss if steps else None,
        "losses": [s.loss for s in steps],
        "peak_memory_bytes": max((s.memory_bytes for s in steps), default=0),
        "micro_batch": config.micro_batch,
        "grad_accum": config.grad_accum,
        "global_batch_windows": config.micro_batch * config.grad_accum * gpus,
        "window_tokens": config.window_tokens,
        "steps": len(steps),
        "error": errors[-1] if errors else "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to append results to")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="repository the training set is built from (default: this one)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/elite-bench/qwen2.5-coder-1.5b-random"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/elite-bench/multigpu"))
    parser.add_argument("--tier", type=int, default=1, help="context tier (1: 4K + 512)")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=2, help="per GPU in the N-GPU runs; the 1-GPU run uses N x")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of tokens_per_s")
    parser.add_argument("--modes", nargs="*", default=["ddp", "zero2"], choices=["ddp", "zero2"],
                        help="multi-GPU runs beside the 1-GPU baseline (none: the baseline alone)")
    parser.add_argument("--smoke", action="store_true", help="demo model on 2 CPU processes: checks the script only")
    args = parser.parse_args()

    from elite_core.config import default_config
    from elite_core.distributed import deepspeed_installed

    device = "cpu" if args.smoke else gpu_name()
    model = "demo" if args.smoke else str(make_model_dir(args.model_dir))
    base = {"tier": args.tier, "max_steps": args.steps, "micro_batch": args.micro_batch, "eval_every_steps": 0,
            "checkpoint_every_seconds": 0, "eval_fraction": 0.0, "warmup_steps": 2, "run_name": "x"}
    if args.smoke:
        base.update(context_tokens=192, target_tokens=64, lora_rank=8, lora_alpha=16)
    else:
        from elite_core.tiers import tier_by_number

        tier = tier_by_number(args.tier)
        base.update(context_tokens=tier.context_tokens, target_tokens=tier.target_tokens,
                    lora_rank=tier.default_lora_rank, lora_alpha=2 * tier.default_lora_rank)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output_dir = args.work_dir / stamp
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / "children.log"

    def config_for(name: str, grad_accum: int, deepspeed: str):
        return default_config(model, str(args.repo), str(output_dir), **{**base, "run_name": name,
                                                                        "grad_accum": grad_accum,
                                                                        "deepspeed": deepspeed})

    results = []
    single = config_for("gpus-1", args.grad_accum * args.gpus, "off")
    results.append(summarise("gpus-1", "single", 1, single, launch(single, 1, log), args.warmup_steps, device))
    for mode in args.modes:
        name = f"gpus-{args.gpus}-{mode}"
        if mode == "zero2" and not deepspeed_installed():
            results.append({"run": name, "mode": mode, "gpus": args.gpus, "gpu": device, "tokens_per_s": None,
                            "loss": None, "skipped": "deepspeed is not installed (pip install deepspeed)"})
            continue
        config = config_for(name, args.grad_accum, "zero2" if mode == "zero2" else "off")
        results.append(summarise(name, mode, args.gpus, config, launch(config, args.gpus, log), args.warmup_steps,
                                 device))

    one = results[0]
    summary = {"run": "summary", "gpu": device, "gpus": args.gpus, "bar_speedup": SPEEDUP_BAR, "speedups": {},
               "loss_max_rel_diff": {}}
    for result in results[1:]:
        if not result.get("losses") or not one.get("losses") or not one["tokens_per_s"]:
            continue
        summary["speedups"][result["mode"]] = result["tokens_per_s"] / one["tokens_per_s"]
        pairs = list(zip(one["losses"], result["losses"]))
        summary["loss_max_rel_diff"][result["mode"]] = max(abs(a - b) / abs(a) for a, b in pairs) if pairs else None
    summary["passed"] = bool(summary["speedups"]) and all(v >= SPEEDUP_BAR for v in summary["speedups"].values())
    results.append(summary)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as out:
        for result in results:
            out.write(json.dumps(result) + "\n")
    for result in results:
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    return 0 if all(not r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
