"""Four memory-model points in one short process (Qwen2.5-Coder-1.5B, rank 16, 4K and 16K, checkpointing on/off):
a check of the memory model on a GPU it was not fitted on, in well under a minute. Same method as memory_accuracy.
--targets: the same points with LoRA on some linears only (q,v; attention; MLP), which the model was not fitted on.
--moe: Qwen3-8B (q/k norms) and two mixtures of experts, whose terms were read off autograd on CPU only.

    PYTHONPATH=. python3 bench/memory_spot_check.py OUT.jsonl [--targets | --moe | --dense]
"""

import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import memory_accuracy as bench  # noqa: E402
from elite_core import training  # noqa: E402
from elite_core.config import RunConfig  # noqa: E402

POINTS = [(4096, "on"), (4096, "off"), (16384, "on"), (16384, "off")]
TARGET_SETS = ["q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj", "gate_proj,up_proj,down_proj"]


MOE_POINTS = [(model, seq, checkpointing)
              for model in ("Qwen3-8B", "Qwen1.5-MoE-A2.7B", "Qwen3-Coder-30B-A3B-24-layers")
              for seq, checkpointing in ((4096, "on"), (16384, "on"), (4096, "off"))]
DENSE_LAYER_POINTS = [("DeepSeek-V2-Lite-12-layers", 4096, "on"), ("DeepSeek-V2-Lite-12-layers", 16384, "on"),
                      ("gpt-oss-20b-12-layers", 4096, "on"), ("gpt-oss-20b-12-layers", 8192, "on"),
                      ("StarCoder2-3B", 4096, "on"), ("StarCoder2-3B", 16384, "on")]
"""--dense: the terms of session 34, read off autograd on CPU: a mixture of experts with a dense first layer and
latent attention (counted high on purpose), gpt-oss's eager attention with sinks, Starcoder2's LayerNorm."""


def main(out_path: str, targets: bool = False, moe: bool = False, dense: bool = False) -> None:
    training.load_causal_lm = bench._from_config_loader(bench.hf_config)
    measurer = bench.Measurer()  # before the CUDA context exists
    if moe or dense:
        points = [bench.Point(model, seq, 16, checkpointing)
                  for model, seq, checkpointing in (MOE_POINTS if moe else DENSE_LAYER_POINTS)]
    else:
        points = [bench.Point("Qwen2.5-Coder-1.5B", seq, 16, checkpointing, lora_targets=names)
                  for names in (TARGET_SETS if targets else ["all-linear"]) for seq, checkpointing in POINTS]
    with open(out_path, "w") as out:
        for point in points:
            seq, checkpointing = point.seq, point.checkpointing
            config = RunConfig(model=point.model, lora_rank=point.rank, lora_alpha=2 * point.rank,
                               lora_target_modules=tuple(point.lora_targets.split(",")))
            model = optimizer = None
            try:
                model = training.build_lora_model(config, bench.setup_for(point), "cuda")
                optimizer = training.make_optimizer(model, config, bench.setup_for(point), "cuda")
                row = bench.record(point, torch.cuda.get_device_name(),
                                   bench.run_point(point, model, optimizer, measurer, steps=2))
                result = f"measured {row['measured_gib']:7.3f} GiB  error {row['error_pct']:+6.2f} %"
            except torch.OutOfMemoryError as error:
                row = bench.record(point, torch.cuda.get_device_name(), None, error=str(error).splitlines()[0])
                result = "out of memory"
            out.write(json.dumps(row) + "\n")
            print(f"{point.model:<30} {point.lora_targets:<28} {seq:>6} ckpt {checkpointing:<3} "
                  f"predicted {row['predicted_gib']:7.3f} GiB  {result}", flush=True)
            del model, optimizer
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1], targets="--targets" in sys.argv[2:], moe="--moe" in sys.argv[2:], dense="--dense" in sys.argv[2:])
