"""Predicted vs measured peak GPU memory of the engine's LoRA training step, over a matrix of real architectures.

On one CUDA GPU, in one command:

    python bench/memory_accuracy.py run --out bench/results                 # the matrix: memory-<gpu>.jsonl
    python bench/memory_accuracy.py run --set validation --out bench/results  # unfitted points + the planner's tiers 1-5
    python bench/memory_accuracy.py run --set long --out bench/results        # the planner's fitting tiers beyond 64K
    python bench/memory_accuracy.py run --set tiled --out bench/results       # the sequence-tiled MLP
    python bench/memory_accuracy.py run --set planned --models Llama-3.2-3B   # every fitting tier as planned here
    python bench/memory_accuracy.py score --write bench/results/memory-h100.jsonl  # re-predict, print table, write .txt

The constants in elite_core.memory_model.MemoryConstants were fitted on the matrix set, then frozen before the
validation and long sets ran; the two tiled-MLP constants were fitted on the tiled set itself.

Models are random-initialised from their configs (memory does not depend on weight values). Each point runs the engine's
own code (elite_core.training: build_lora_model, make_optimizer, model_loss, autocast and checkpoint offload as in
TrainingEngine.train_step) for a few optimizer steps. Measured peak = torch's peak reserved + memory outside torch that
NVML sees for this process (CUDA context, cuBLAS), the number a user's nvidia-smi shows at the worst moment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as elite_core.runner starts the child
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3

from bench.reference_models import REFERENCE_MODELS as MODELS  # noqa: E402
from bench.reference_models import reference_config as hf_config  # noqa: E402
from bench.reference_models import saved_random_model  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Point:
    model: str
    seq: int
    rank: int
    checkpointing: str
    micro_batch: int = 1
    lora_dropout: float = 0.0
    target_tokens: int = 0
    tier: int = 0
    tiled_mlp: bool = False
    weight: str = "bf16"
    """bf16, or nf4 (QLoRA: the random model is saved once and loaded quantised, the engine's way)."""
    adamw_8bit: bool = False
    compiled: bool = False
    gpu_checkpoint_layers: int = 0
    deepspeed: str = "off"
    """A DeepSpeed ZeRO mode (elite_core.config.DEEPSPEED_MODES): the step runs through deepspeed.initialize."""
    lora_targets: str = "all-linear"
    """LoRA's target modules, joined by commas (RunConfig.lora_target_modules)."""

    @property
    def target(self) -> int:
        return self.target_tokens or self.seq // 8

    @property
    def options(self) -> list[str]:
        names = [{"on": "ckpt", "off": "no-ckpt", "offload": "ckpt-offload"}[self.checkpointing], "chunked-loss"]
        if self.tier:
            names.insert(0, f"tier-{self.tier}")
        if self.lora_dropout:
            names.append(f"dropout-{self.lora_dropout:g}")
        if self.lora_targets != "all-linear":
            names.append(f"lora-{self.lora_targets.replace('_proj', '')}")
        if self.micro_batch > 1:
            names.append(f"batch-{self.micro_batch}")
        if self.tiled_mlp:
            names.append("tiled-mlp")
        if self.weight == "nf4":
            names.append("qlora")
        if self.adamw_8bit:
            names.append("8bit-adam")
        if self.compiled:
            names.append("compiled")
        if self.gpu_checkpoint_layers:
            names.append(f"{self.gpu_checkpoint_layers}-ckpt-on-gpu")
        if self.deepspeed != "off":
            names.append(self.deepspeed)
        return names


def matrix(models: list[str]) -> list[Point]:
    """3 lengths x 2 ranks x checkpointing on/off, then dropout, micro-batch 2 and offloaded checkpoints."""
    points = []
    for model in models:
        for seq in (4096, 8192, 16384):
            for rank in (8, 32):
                for checkpointing in ("on", "off"):
                    points.append(Point(model, seq, rank, checkpointing))
        for seq in (4096, 16384):
            points.append(Point(model, seq, 16, "on", lora_dropout=0.05))
            points.append(Point(model, seq, 16, "off", lora_dropout=0.05))
            points.append(Point(model, seq, 16, "on", micro_batch=2))
            points.append(Point(model, seq, 16, "offload"))
    # Grouped so each model is built once per rank, dropout and checkpointing choice; lengths ascend within a group.
    order = {model: index for index, model in enumerate(models)}
    return sorted(points, key=lambda p: (order[p.model], p.rank, p.lora_dropout, p.checkpointing == "off",
                                         p.checkpointing, p.micro_batch, p.seq))


def planned_point(model: str, plan) -> Point:
    """The planner's setup for a tier, every option it turned on included."""
    setup = plan.setup
    return Point(model, setup.seq_tokens, setup.lora_rank, setup.checkpointing, setup.micro_batch, setup.lora_dropout,
                 setup.target_tokens, plan.tier.number, setup.tiled_mlp, setup.weight_dtype, setup.adamw_8bit,
                 setup.compiled, setup.gpu_checkpoint_layers)


def long_tier_points(profile) -> list[Point]:
    """The planner's fitting tiers beyond 64K tokens (minutes per step): the riskiest promise, run last and apart."""
    from elite_core.config import RunConfig
    from elite_core.memory_model import shape_from_hf_config
    from elite_core.planner import plan_tiers

    points = []
    for model in ("Llama-3.1-8B", "Qwen2.5-Coder-1.5B"):
        shape = shape_from_hf_config(hf_config(model), name=model)
        for plan in plan_tiers(shape, profile, RunConfig(model=model)):
            setup = plan.setup
            if plan.fits and setup.seq_tokens > 65536:
                points.append(planned_point(model, plan))
    return points


def planned_points(profile, models: list[str]) -> list[Point]:
    """Every tier the planner says fits on this GPU, as it plans it (any length): the table's own promises, for
    models no constant was fitted on (bench/rate_accuracy.py scores their step times)."""
    from elite_core.config import RunConfig
    from elite_core.memory_model import shape_from_hf_config
    from elite_core.planner import plan_tiers

    points = []
    for model in models:
        shape = shape_from_hf_config(hf_config(model), name=model)
        points += [planned_point(model, plan) for plan in plan_tiers(shape, profile, RunConfig(model=model)) if plan.fits]
    return points


def tiled_points() -> list[Point]:
    """The sequence-tiled MLP (each tile checkpointed inside the checkpointed layer) at long windows."""
    return [
        Point("Qwen2.5-Coder-1.5B", 65536, 8, "on", target_tokens=7168, tiled_mlp=True),
        Point("Qwen2.5-Coder-1.5B", 150528, 8, "on", target_tokens=16384, tiled_mlp=True),
        Point("Llama-3.1-8B", 32768, 16, "on", tiled_mlp=True),
        Point("Llama-3.1-8B", 65536, 8, "on", target_tokens=7168, tiled_mlp=True),
        Point("Llama-3.1-8B", 65536, 8, "offload", target_tokens=7168, tiled_mlp=True),
    ]


def option_points() -> list[Point]:
    """QLoRA, 8-bit AdamW and compiled layers (the options the matrix leaves out), at 2 lengths x checkpointing."""
    points = []
    for model in ("Qwen2.5-Coder-1.5B", "Llama-3.1-8B"):
        for seq in (4096, 16384):
            for checkpointing in ("on", "off"):
                points.append(Point(model, seq, 16, checkpointing, weight="nf4"))
                points.append(Point(model, seq, 16, checkpointing, adamw_8bit=True))
                points.append(Point(model, seq, 16, checkpointing, compiled=True))
        points.append(Point(model, 65536, 16, "offload", target_tokens=7168, tiled_mlp=True, weight="nf4",
                            adamw_8bit=True, gpu_checkpoint_layers=8))
    order = {model: index for index, model in enumerate(MODELS)}
    return [p for p in sorted(points, key=lambda p: (order[p.model], p.weight, p.adamw_8bit, p.compiled,
                                                     p.checkpointing == "off", p.checkpointing, p.seq))
            if not (p.model == "Llama-3.1-8B" and p.seq == 16384 and p.checkpointing == "off")]  # > 80 GB


def crossed_points() -> list[Point]:
    """QLoRA and 8-bit AdamW each crossed with 3 lengths x 2 ranks x checkpointing on/off (the issue's matrix for the two
    options), then QLoRA with offloaded checkpoints at 32K and 64K (the offload slack term, away from its fitted point)."""
    points = []
    for model in ("Qwen2.5-Coder-1.5B", "Llama-3.1-8B"):
        for option in ({"adamw_8bit": True}, {"weight": "nf4"}):
            for rank in (8, 32):
                for checkpointing in ("on", "off"):
                    # Llama-3.1-8B without checkpointing runs out of 80 GB at 16K: its third length is 2K instead.
                    lengths = (2048, 4096, 8192) if model == "Llama-3.1-8B" and checkpointing == "off" else (4096, 8192, 16384)
                    for seq in lengths:
                        points.append(Point(model, seq, rank, checkpointing, **option))
        points.append(Point(model, 32768, 16, "offload", weight="nf4"))
        points.append(Point(model, 65536, 16, "offload", target_tokens=7168, weight="nf4"))
    return points


def zero_points() -> list[Point]:
    """DeepSpeed ZeRO-2 and -3 on one GPU, with and without CPU offload, beside the plain engine for speed."""
    points = []
    for model in ("Qwen2.5-Coder-1.5B", "Llama-3.1-8B"):
        for deepspeed in ("off", "zero2", "zero2-offload", "zero3", "zero3-offload"):
            for seq in (4096, 16384):
                points.append(Point(model, seq, 16, "on", deepspeed=deepspeed))
    return points


def validation_points(profile) -> list[Point]:
    """Points the constants were not fitted on: other lengths, ranks and batches, and the planner's own tier choices."""
    from elite_core.config import RunConfig
    from elite_core.memory_model import shape_from_hf_config
    from elite_core.planner import plan_tiers

    points = [
        Point("Qwen2.5-Coder-1.5B", 12288, 16, "on"), Point("Qwen2.5-Coder-1.5B", 24576, 16, "on"),
        Point("Qwen2.5-Coder-1.5B", 32768, 64, "on"), Point("Qwen2.5-Coder-1.5B", 12288, 16, "off"),
        Point("Qwen2.5-Coder-1.5B", 8192, 16, "on", micro_batch=4),
        Point("Llama-3.1-8B", 32768, 16, "on"), Point("Llama-3.1-8B", 24576, 64, "on"),
        Point("Llama-3.1-8B", 32768, 16, "offload"), Point("Llama-3.1-8B", 8192, 16, "on", micro_batch=4),
        Point("Llama-3.1-8B", 6144, 16, "off", lora_dropout=0.1),
        Point("Qwen2.5-Coder-7B", 32768, 16, "on"), Point("Qwen2.5-Coder-7B", 12288, 48, "on", lora_dropout=0.05),
    ]
    for model in ("Qwen2.5-Coder-1.5B", "Llama-3.1-8B"):
        shape = shape_from_hf_config(hf_config(model), name=model)
        for plan in plan_tiers(shape, profile, RunConfig(model=model)):
            if plan.fits and plan.setup.seq_tokens <= 65536:
                points.append(planned_point(model, plan))
    order = {model: index for index, model in enumerate(MODELS)}
    return sorted(points, key=lambda p: (order[p.model], p.rank, p.lora_dropout, p.checkpointing == "off", p.seq))


def setup_for(point: Point):
    from elite_core.memory_model import TrainingSetup

    return TrainingSetup(device="cuda", seq_tokens=point.seq, target_tokens=point.target, micro_batch=point.micro_batch,
                         lora_rank=point.rank, compute_dtype="bf16",
                         checkpointing=point.checkpointing, lora_dropout=point.lora_dropout,
                         tiled_mlp=point.tiled_mlp, adamw_8bit=point.adamw_8bit, compiled=point.compiled,
                         gpu_checkpoint_layers=point.gpu_checkpoint_layers, weight_dtype=point.weight,
                         deepspeed=point.deepspeed, lora_targets=point.lora_targets,
                         rope_scaling_factor=_rope_factor(point), attention=_attention(point))


def _attention(point: Point) -> str:
    """As the planner picks it on a GPU without flash-attn: eager for models with no SDPA path (gpt-oss, Gemma 2)."""
    from elite_core.hardware import fake_profile
    from elite_core.memory_model import shape_from_hf_config
    from elite_core.planner import attention_for

    return attention_for(fake_profile("h100"), shape_from_hf_config(hf_config(point.model)))


def _rope_factor(point: Point) -> float:
    from elite_core.memory_model import shape_from_hf_config
    from elite_core.planner import rope_scaling_factor

    return rope_scaling_factor(shape_from_hf_config(hf_config(point.model)), point.seq)


def predict(point: Point):
    from elite_core.memory_model import predict_memory, shape_from_hf_config
    from elite_core.model_loading import count_on_meta_device

    config = hf_config(point.model)
    shape = shape_from_hf_config(config, name=point.model)
    if shape.experts > 1:  # as model_loading.load_model_shape does
        shape = count_on_meta_device(shape, config)
    return predict_memory(shape, setup_for(point))


def _from_config_loader(name_to_config):
    """Stands in for model_loading.load_causal_lm: the same model, built from its config with random weights."""

    def load(source, *, dtype, device, trust_remote_code=False, attn_implementation="sdpa", quantization_config=None,
             seed=0, rope_scaling_factor=1.0):
        import torch
        from transformers import AutoModelForCausalLM

        from elite_core import model_loading

        if quantization_config is not None:
            saved = saved_random_model(source, name_to_config(source))
            return model_loading.load_causal_lm(str(saved), dtype=dtype, device=device,
                                                quantization_config=quantization_config,
                                                rope_scaling_factor=rope_scaling_factor)
        config = name_to_config(source)
        model_loading.scale_rope(config, rope_scaling_factor)
        torch.manual_seed(seed)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)

    return load


_USED_BEFORE_CUDA_INIT: list[int] = []
"""What the GPU held before this process's CUDA context existed (other processes), read once: a Measurer made after
the context exists would count the context as 'before' and miss it (the GPU test's second point read 0.75 GiB low)."""


class Measurer:
    def __init__(self):
        import torch

        from elite_core import nvml

        self.nvml = nvml
        if not _USED_BEFORE_CUDA_INIT:
            before = nvml.memory_now(0) if not torch.cuda.is_initialized() else None
            _USED_BEFORE_CUDA_INIT.append(before.used_bytes if before else 0)
        self.used_before_init = _USED_BEFORE_CUDA_INIT[0]

    def outside_torch_bytes(self) -> int:
        import torch

        now = self.nvml.memory_now(0)
        if now is None:
            free, total = torch.cuda.mem_get_info()
            return max(0, total - free - torch.cuda.memory_reserved())
        return max(0, now.used_bytes - self.used_before_init - torch.cuda.memory_reserved())


def run_point(point: Point, model, optimizer, measurer: Measurer, steps: int, zero=None) -> dict:
    import torch

    from elite_core.training import forward_context, model_loss

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    vocab = model.config.vocab_size
    generator = torch.Generator(device="cuda").manual_seed(0)
    input_ids = torch.randint(0, vocab, (point.micro_batch, point.seq), device="cuda", generator=generator)
    labels = input_ids.clone()
    labels[:, : point.seq - point.target] = -100
    step_seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        if zero is not None:  # the engine's ZeRO step: DeepSpeed reduces, clips and steps
            zero.deepspeed_step(iter([(input_ids, labels)]), 1,
                                lambda: forward_context(setup_for(point), model.config.hidden_size))
            torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - started)
            continue
        optimizer.zero_grad(set_to_none=True)
        with forward_context(setup_for(point), model.config.hidden_size):  # autocast and offload, as the engine
            loss = model_loss(model, input_ids, labels, "chunked")
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        float(loss.item())
        torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - started)
    del input_ids, labels
    return {
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
        "outside_torch_bytes": int(measurer.outside_torch_bytes()),
        "step_s": round(min(step_seconds[1:] or step_seconds), 3),
        "tokens_per_s": round(point.micro_batch * point.seq / min(step_seconds[1:] or step_seconds), 1),
    }


def record(point: Point, gpu: str, measured: dict | None, error: str = "") -> dict:
    breakdown = predict(point)
    row = {
        "model": point.model, "seq": point.seq, "target": point.target, "rank": point.rank,
        "micro_batch": point.micro_batch, "checkpointing": point.checkpointing, "lora_dropout": point.lora_dropout,
        "options": point.options, "gpu": gpu, "tier": point.tier, "tiled_mlp": point.tiled_mlp,
        "weight": point.weight, "adamw_8bit": point.adamw_8bit, "compiled": point.compiled,
        "gpu_checkpoint_layers": point.gpu_checkpoint_layers, "deepspeed": point.deepspeed,
        "lora_targets": point.lora_targets, "predicted_cpu_gib": round(breakdown.cpu_offload_bytes / GIB, 3),
        "predicted_gib": round(breakdown.total_bytes / GIB, 3),
        "predicted_components": dict(breakdown.components()),
        "ok": measured is not None, "error": error,
    }
    if measured:
        total = measured["peak_reserved_bytes"] + measured["outside_torch_bytes"]
        row.update(measured)
        row["measured_gib"] = round(total / GIB, 3)
        row["error_pct"] = round(100.0 * (breakdown.total_bytes - total) / total, 2)
    return row


def command_run(args) -> int:
    import torch

    from elite_core import training
    from elite_core.config import RunConfig
    from elite_core.hardware import profile_hardware

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.monotonic()
    measurer = Measurer()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile_started = time.perf_counter()
    profile = profile_hardware(use_cache=False, cache_dir=out / "cache")
    profile_s = time.perf_counter() - profile_started
    gpu_name = profile.gpus[0].name
    tag = args.tag or ("h200" if "H200" in gpu_name else "h100" if "H100" in gpu_name else "gpu")
    (out / f"hardware-{tag}.json").write_text(json.dumps({**profile.to_dict(), "wall_s": round(profile_s, 2)}, indent=2))
    print(f"profile: {profile_s:.1f} s, usable {profile.gpus[0].usable_bytes / GIB:.2f} GiB, "
          f"bf16 {profile.gpus[0].tflops_bf16} TFLOPS, copy {profile.gpus[0].bandwidth_bytes_per_s / 1e12:.2f} TB/s",
          flush=True)
    capacity = profile.gpus[0].usable_bytes

    training.load_causal_lm = _from_config_loader(lambda name: hf_config(name))
    training.prefer_sdpa_backends()  # the attention backend order the engine uses (cuDNN first on Hopper)
    models = args.models.split(",")
    points = {"matrix": lambda: matrix(models), "validation": lambda: validation_points(profile),
              "long": lambda: long_tier_points(profile), "planned": lambda: planned_points(profile, models),
              "tiled": tiled_points, "options": option_points,
              "crossed": crossed_points, "zero": zero_points}[args.set]()
    points = [point for point in points if point.model in models]
    if args.max_seq:
        points = [point for point in points if point.seq <= args.max_seq]
    if args.deepspeed:  # DeepSpeed keeps each engine's model alive: one mode per process keeps the points apart
        points = [point for point in points if point.deepspeed == args.deepspeed]
    if args.tiers:
        wanted = {int(tier) for tier in args.tiers.split(",")}
        points = [point for point in points if point.tier in wanted]
    if args.limit:
        points = points[: args.limit]
    jsonl = out / (f"memory-{tag}.jsonl" if args.set == "matrix" else f"memory-{tag}-{args.set}.jsonl")
    if jsonl.exists():  # a set split over several commands goes on where the last one stopped
        done = {point_of(json.loads(line)) for line in jsonl.read_text().splitlines() if line.strip()}
        points = [point for point in points if dataclasses.replace(point, target_tokens=point.target) not in done]
    written = 0
    with jsonl.open("a") as sink:
        current_key = None
        model = optimizer = zero = None
        for point in points:
            if time.monotonic() - started > args.time_limit_s:
                print("time limit reached; stopping", flush=True)
                break
            predicted = predict(point).total_bytes
            if predicted > capacity * args.skip_above:
                print(f"skip {point} predicted {predicted / GIB:.1f} GiB over the GPU", flush=True)
                continue
            key = (point.model, point.rank, point.lora_dropout, point.checkpointing == "off", point.tiled_mlp,
                   point.weight, point.adamw_8bit, point.compiled, point.deepspeed)
            if key != current_key:
                model = optimizer = zero = None
                import gc

                gc.collect()
                torch.cuda.empty_cache()
                config = RunConfig(model=point.model, lora_rank=point.rank, lora_alpha=2 * point.rank,
                                   lora_dropout=point.lora_dropout)
                model = training.build_lora_model(config, setup_for(point), "cuda")
                optimizer = training.make_optimizer(model, config, setup_for(point), "cuda")
                zero = None
                if point.deepspeed != "off":
                    from elite_core import distributed

                    zero_config = config.replace(deepspeed=point.deepspeed, micro_batch=point.micro_batch, grad_accum=1)
                    zero = distributed.ParallelLoss(
                        model, lambda m, ids, labels: training.model_loss(m, ids, labels, "chunked"),
                        distributed.RankInfo(), "cuda", zero_config, optimizer, None, "bf16")
                current_key = key
            try:
                measured = run_point(point, model, optimizer, measurer, args.steps, zero)
                row = record(point, gpu_name, measured)
            except torch.OutOfMemoryError as error:
                row = record(point, gpu_name, None, f"OOM: {str(error).splitlines()[0][:160]}")
                model = optimizer = zero = None
                current_key = None
            row["set"] = args.set
            import gc

            gc.collect()
            torch.cuda.empty_cache()
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            written += 1
            print(_line(row), flush=True)
    print(f"{written} points in {time.monotonic() - started:.0f} s -> {jsonl}", flush=True)
    return 0


def _line(row: dict) -> str:
    head = f"{row['model']:<19} seq {row['seq']:>6} r {row['rank']:>2} {','.join(row['options']):<36}"
    if not row.get("ok"):
        return f"{head} predicted {row['predicted_gib']:7.2f} GiB  {row.get('error', 'failed')}"
    return (f"{head} predicted {row['predicted_gib']:7.2f}  measured {row['measured_gib']:7.2f} GiB  "
            f"error {row['error_pct']:+6.2f} %  {row.get('tokens_per_s', 0):>8.0f} tok/s")


def point_of(row: dict) -> Point:
    return Point(row["model"], row["seq"], row["rank"], row["checkpointing"], row.get("micro_batch", 1),
                 row.get("lora_dropout", 0.0), row.get("target", 0), row.get("tier", 0),
                 row.get("tiled_mlp", False), row.get("weight", "bf16"), row.get("adamw_8bit", False),
                 row.get("compiled", False), row.get("gpu_checkpoint_layers", 0), row.get("deepspeed", "off"))


def command_score(args) -> int:
    """Re-predict every measured point with the model as it is now and print the table and the bar."""
    rows = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line.strip()]
    scored = []
    for row in rows:
        point = point_of(row)
        measured = None
        if row.get("ok"):
            measured = {key: row[key] for key in ("peak_allocated_bytes", "peak_reserved_bytes", "outside_torch_bytes",
                                                  "step_s", "tokens_per_s")}
        fresh = record(point, row["gpu"], measured, row.get("error", ""))
        if "predicted_gib" in row and row.get("predicted_gib_at_run") is None:
            fresh["predicted_gib_at_run"] = row["predicted_gib"]
        else:
            fresh["predicted_gib_at_run"] = row.get("predicted_gib_at_run")
        fresh["set"] = row.get("set", "matrix")
        scored.append(fresh)
    lines = [_line(row) for row in scored]
    errors = [row["error_pct"] for row in scored if row.get("ok")]
    if errors:
        absolute = [abs(e) for e in errors]
        lines.append("")
        lines.append(f"{len(errors)} measured points on {scored[0]['gpu']}: median |error| {statistics.median(absolute):.2f} %, "
                     f"max |error| {max(absolute):.2f} %, worst under-prediction {min(errors):+.2f} %, "
                     f"mean error {statistics.mean(errors):+.2f} %")
        passed = statistics.median(absolute) <= 5 and max(absolute) <= 10 and min(errors) >= -3
        lines.append("bar (median <= 5 %, max <= 10 %, no under-prediction beyond 3 %): " + ("PASS" if passed else "FAIL"))
    text = "\n".join(lines)
    print(text)
    if args.write:
        Path(args.jsonl).write_text("".join(json.dumps(row) + "\n" for row in scored))
        table = Path(args.jsonl).with_suffix(".txt")
        notes = table.read_text().split("\nbar (", 1)[-1].partition("\n")[2] if table.exists() else ""
        table.write_text(text + "\n" + notes)  # the notes written under the bar line stay
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure on this machine's GPU")
    run.add_argument("--out", default="bench/results")
    run.add_argument("--models", default="Qwen2.5-Coder-1.5B,Llama-3.1-8B,Qwen2.5-Coder-7B",
                     help="comma-separated reference models (default: the three the constants were fitted on)")
    run.add_argument("--steps", type=int, default=2)
    run.add_argument("--limit", type=int, default=0, help="only the first N points (a smoke test)")
    run.add_argument("--max-seq", type=int, default=0, help="leave out points longer than this (0: none)")
    run.add_argument("--time-limit-s", type=float, default=540.0, help="start no new point after this many seconds")
    run.add_argument("--skip-above", type=float, default=0.97, help="skip points predicted above this share of usable memory")
    run.add_argument("--tag", default="", help="file tag instead of the GPU's (h100, h200)")
    run.add_argument("--deepspeed", default="", help="only points of this ZeRO mode (zero set: run each in its own process)")
    run.add_argument("--tiers", default="", help="only the planner's tiers with these numbers, e.g. 7 (long set)")
    run.add_argument("--set", choices=("matrix", "validation", "long", "planned", "tiled", "options", "crossed", "zero"), default="matrix",
                     help="the fitting matrix, or points the constants were not fitted on (incl. the planner's tiers)")
    score = sub.add_parser("score", help="re-predict a results file with the current model")
    score.add_argument("jsonl")
    score.add_argument("--write", action="store_true", help="rewrite the file's predictions and its .txt table")
    args = parser.parse_args(argv)
    return command_run(args) if args.command == "run" else command_score(args)


if __name__ == "__main__":
    raise SystemExit(main())
