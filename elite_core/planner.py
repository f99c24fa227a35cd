"""The planner: for each context tier, the fastest engine options whose predicted peak fits the measured memory.

Options are tried from fastest to most frugal (no checkpointing, checkpointing, checkpoints offloaded to CPU RAM, tiled
MLP, 8-bit AdamW, QLoRA) and the first whose prediction fits with a safety margin is taken. What the user fixed in the
RunConfig (precision, checkpointing other than "auto", 8-bit AdamW, QLoRA, DeepSpeed) is never changed by the planner.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import sys
from dataclasses import dataclass
from typing import Callable

from elite_core.config import RunConfig
from elite_core.hardware import HardwareProfile
from elite_core.memory_model import (
    COMPILED_MAX_WINDOW_TOKENS,
    DEFAULT_CONSTANTS,
    MemoryBreakdown,
    ModelShape,
    TrainingSetup,
    attention_flops_per_step,
    layer_input_bytes,
    predict_memory,
    training_flops_per_step,
)
from elite_core.tiers import TIERS, Tier, tier_by_number

SAFETY_FRACTION = 0.03
"""A tier fits only with this share of the budget left over: the model may under-predict by up to 3 %."""
CPU_MAX_STEP_S = 3.0


@dataclass(frozen=True)
class StepTimeConstants:
    """What turns a step's matmul FLOPs into seconds on a GPU. Fitted by bench/rate_accuracy.py on the H100's recorded
    steps (bench/results/memory-h100*.jsonl, 140 points) and checked on H200 runs no constant was fitted on
    (bench/results/rate-accuracy-h200.txt)."""

    matmul_efficiency: float = 0.616
    """Share of the measured matmul peak the step's FLOPs run at."""
    layer_pass_s: float = 0.00286
    """Launch-bound time per decoder layer per pass (forward, backward, recompute): LoRA's many small kernels."""
    compiled_factor: float = 0.76
    """Compiled decoder layers: the whole step takes this share of the eager step's time (fused elementwise kernels)."""
    nf4_factor: float = 1.09
    """QLoRA's nf4 weights are dequantised at every matmul; at a training step's token counts that costs about 9 %."""
    int8_factor: float = 1.6
    """8-bit weights (not measured: the earlier guess, kept for them)."""
    step_fixed_s: float = 0.0081
    """Per optimizer step whatever the model (optimizer, gradient clipping, the loss's sync, Python): seen only where
    little else is, the demo model's short tiers (bench/rate_accuracy.py fits it there)."""
    attention_speed_by_head_dim: tuple[tuple[int, float], ...] = ((32, 0.40), (64, 0.77), (128, 1.0))
    """Attention's rate by head dimension, relative to 128 (every fit-set model's): fused attention kernels run
    narrow heads at a fraction of their wide-head rate. H200, SDPA's own pick (cuDNN), causal forward+backward at 16K
    and 64K tokens, bench/results/attention-heads-h200.txt: 32 runs at 0.39-0.41, 64 at 0.76-0.79. Interpolated in
    log2 of the dimension; held at the ends."""

    def attention_speed(self, head_dim: int) -> float:
        points = self.attention_speed_by_head_dim
        if head_dim <= points[0][0]:
            return points[0][1]
        for (low_dim, low), (high_dim, high) in zip(points, points[1:]):
            if head_dim <= high_dim:
                share = math.log2(head_dim / low_dim) / math.log2(high_dim / low_dim)
                return low + share * (high - low)
        return points[-1][1]


STEP_TIME = StepTimeConstants()
STEP_TIME_BEFORE = StepTimeConstants(matmul_efficiency=0.53, layer_pass_s=0.0034, compiled_factor=1.0, nf4_factor=1.6,
                                     step_fixed_s=0.0, attention_speed_by_head_dim=((128, 1.0),))
"""The constants until 2026-12-02 (one efficiency fitted without the compiled and QLoRA points, QLoRA guessed 1.6x
slower, no fixed cost per step, attention at the matmul rate whatever the head size): the baseline
bench/rate_accuracy.py scores beside STEP_TIME."""
CPU_MATMUL_EFFICIENCY = 0.45
"""The demo model on 2 cores: 0.6 s per 4.6K-token step measured against 0.75 s estimated at 0.35."""
HOST_OFFLOAD_FRACTION = 0.7
"""Share of the host's available RAM that offloaded checkpoints may take; the layers beyond it keep theirs on the GPU."""
TOKENS_PER_UPDATE = 32 * 1024
"""Gradient accumulation aims at about this many tokens per optimizer update."""
ENGINE_HAS_TILED_MLP = True
"""elite_core.training tiles the MLP when the setup says so (add_lora). Measured on an H100 up to 150K tokens
(bench/results/memory-h100-tiled.jsonl); beyond that the prediction is extrapolated. False takes it off the ladder."""


@dataclass(frozen=True)
class TierPlan:
    tier: Tier
    setup: TrainingSetup
    breakdown: MemoryBreakdown
    budget_bytes: int
    headroom_bytes: int
    fits: bool
    options: tuple[str, ...]
    step_time_s: float
    """One optimizer step (grad_accum micro-batches), estimated from the measured TFLOPS (GFLOPS on a CPU)."""
    notes: tuple[str, ...]
    """Why the tier looks as it does (an estimate, RoPE scaling, a slow CPU step...), one sentence each."""
    grad_accum: int = 1
    learning_rate: float = 2e-4
    cpu_ram_needed_bytes: int = 0
    """CPU RAM the run needs beside the GPU: offloaded checkpoints and ZeRO state (0 on a CPU run: it is the budget)."""
    tokens_per_s: float = 0.0
    """Training throughput; where it comes from says rate_source. 0 until with_epoch_times fills it in."""
    rate_source: str = ""
    """"estimate" (measured TFLOPS), "probe" (measured by the pre-flight probe at this tier) or "calibrated" (the
    estimate scaled by the probe's measured/estimated ratio at the probed tier)."""
    tokens_per_epoch: int = 0
    tokens_per_epoch_estimated: bool = True
    """True while the epoch's tokens come from the repository's size, False once counted in the built dataset."""
    epoch_s: float = 0.0

    @property
    def note(self) -> str:
        return "; ".join(self.notes)


def resolve_precision(profile: HardwareProfile, requested: str) -> str:
    """auto -> bf16 where the GPU supports it, else fp16 (with loss scaling) on a GPU, fp32 on a CPU."""
    if requested == "auto":
        if not profile.has_gpu:
            return "fp32"
        return "bf16" if profile.can("bf16") else "fp16"
    if requested == "bf16" and profile.has_gpu and not profile.can("bf16"):
        return "fp16"
    return requested


def rope_scaling_factor(shape: ModelShape, window_tokens: int) -> float:
    """A power-of-two RoPE factor when the window is longer than the model's native context, else 1."""
    if window_tokens <= shape.max_position_embeddings or shape.max_position_embeddings <= 0 or not shape.rotary:
        return 1.0
    return float(2 ** math.ceil(math.log2(window_tokens / shape.max_position_embeddings)))


def default_learning_rate(lora_rank: int, window_tokens: int) -> float:
    """2e-4 at rank 16 and 4K tokens, scaled by 1/sqrt(rank) (rsLoRA's observation) and gently down for longer windows,
    whose gradients average over more tokens but are noisier across updates at batch 1."""
    rate = 2e-4 * math.sqrt(16 / max(1, lora_rank)) * (4096 / max(4096, window_tokens)) ** 0.15
    return float(f"{min(5e-4, max(2e-5, rate)):.2g}")


def grad_accum_for(window_tokens: int, micro_batch: int, tokens_per_update: int = TOKENS_PER_UPDATE) -> int:
    return max(1, round(tokens_per_update / max(1, window_tokens * micro_batch)))


def resolved_grad_accum(config: RunConfig) -> int:
    """The config's gradient accumulation, or for 0 (auto) the one that gives about TOKENS_PER_UPDATE per update
    over all data-parallel processes (each takes its own micro-batches)."""
    return config.grad_accum or grad_accum_for(config.window_tokens, config.micro_batch * config.gpus)


def _budget(profile: HardwareProfile, processes: int = 1) -> int:
    """One process's memory: its GPU's, or on a CPU its share of the RAM that all the machine's processes hold
    their own copy of the model in."""
    if profile.has_gpu:
        # One process a GPU: the run fits where its smallest (or busiest) GPU does, not where GPU 0 does.
        used = profile.gpus[:max(1, min(processes, len(profile.gpus)))]
        return int(min(gpu.usable_bytes for gpu in used))
    return int(profile.memory_budget_bytes // max(1, processes))


def _fits(breakdown: MemoryBreakdown, budget: int, profile: HardwareProfile) -> bool:
    if breakdown.total_bytes > budget * (1.0 - SAFETY_FRACTION):
        return False
    if profile.has_gpu and breakdown.cpu_offload_bytes > profile.ram_available_bytes * 0.9:
        return False
    return True


def estimate_step_time_s(shape: ModelShape, setup: TrainingSetup, profile: HardwareProfile, grad_accum: int = 1,
                         constants: StepTimeConstants = STEP_TIME) -> float:
    flops = training_flops_per_step(shape, setup) * max(1, grad_accum)
    if profile.has_gpu:
        gpu = profile.gpus[0]
        peak = {"bf16": gpu.tflops_bf16, "fp16": gpu.tflops_fp16}.get(setup.compute_dtype, gpu.tflops_fp32) or gpu.tflops_fp32
        rate = max(peak, 1e-3) * 1e12 * constants.matmul_efficiency
        attention = attention_flops_per_step(shape, setup) * max(1, grad_accum)
        seconds = (flops - attention) / rate + attention / (rate * constants.attention_speed(shape.head_dim))
    else:
        rate = max(profile.cpu_gflops_fp32, 1.0) * 1e9 * CPU_MATMUL_EFFICIENCY
        seconds = flops / rate
    if profile.has_gpu:
        passes = 3 if setup.checkpointing in ("on", "offload") else 2
        seconds += constants.layer_pass_s * shape.layers * passes * max(1, grad_accum)
        if setup.compiled:
            seconds *= constants.compiled_factor
    if setup.checkpointing == "offload":
        seconds *= 1.05
    if setup.tiled_mlp:
        seconds *= 1.1
    if setup.weight_dtype == "nf4":
        seconds *= constants.nf4_factor
    elif setup.weight_dtype == "int8":
        seconds *= constants.int8_factor
    if setup.deepspeed != "off":
        seconds *= 1.2
    if profile.has_gpu:
        seconds += constants.step_fixed_s
    return seconds


FLASH_ATTENTION = "flash_attention_2"


def attention_for(profile: HardwareProfile, shape: ModelShape | None = None) -> str:
    """flash-attn where it is installed, on Ampere and Ada; SDPA otherwise. On Hopper and newer torch's SDPA runs
    cuDNN's fused attention, 1.8x faster than flash (bench/results/attention-h100.txt, sdpa-dispatch-h100.txt).
    A model transformers cannot run through SDPA (Gemma 2) gets flash-attn where installed, else eager attention,
    which keeps every score: its long windows do not fit, and the table says so."""
    flash = profile.capability("flash-attn")
    flash_ok = flash is not None and flash.available and profile.has_gpu
    hopper_or_newer = any(gpu.compute_capability[0] >= 9 for gpu in profile.gpus)
    if shape is not None and shape.attention_sinks:
        return "eager"  # gpt-oss: flash-attn 2 has no sinks; transformers' kernels that do come from the hub
    if shape is not None and not shape.sdpa:
        return FLASH_ATTENTION if flash_ok else "eager"
    return FLASH_ATTENTION if flash_ok and not hopper_or_newer else "sdpa"


def _base_setup(shape: ModelShape, profile: HardwareProfile, config: RunConfig, window: int, target: int, rank: int) -> TrainingSetup:
    precision = resolve_precision(profile, config.precision)
    device = profile.device
    qlora = config.qlora and device == "cuda" and not shape.shipped_quantization
    return TrainingSetup(
        device=device,
        seq_tokens=window,
        target_tokens=target,
        micro_batch=config.micro_batch,
        lora_rank=rank,
        lora_targets=",".join(config.lora_target_modules),
        extra_trainable=tuple(config.extra_trainable_modules),
        weight_dtype="nf4" if qlora else precision,
        compute_dtype=precision,
        checkpointing="on",
        adamw_8bit=config.adamw_8bit and device == "cuda",
        loss="full" if shape.plain_logits else "chunked",  # as training computes it: the model's own loss then
        attention=attention_for(profile, shape),
        tiled_mlp=False,
        deepspeed=config.deepspeed if device == "cuda" else "off",
        lora_dropout=config.lora_dropout,
        gpus=config.gpus,
        nodes=config.nodes,
        rope_scaling_factor=rope_scaling_factor(shape, window),
    )


def candidate_setups(shape: ModelShape, profile: HardwareProfile, config: RunConfig, window: int, target: int,
                     rank: int) -> list[TrainingSetup]:
    """The ladder from fastest to most frugal, keeping whatever the user fixed in the config.

    Offloading checkpoints comes before the tiled MLP: its copies overlap with compute, the tiles cost recompute time.
    """
    base = _base_setup(shape, profile, config, window, target, rank)
    on_gpu = profile.has_gpu
    fixed_checkpointing = config.gradient_checkpointing != "auto"
    if fixed_checkpointing:
        checkpointing = config.gradient_checkpointing
        if checkpointing == "offload" and not on_gpu:
            checkpointing = "on"  # offloading to CPU RAM means nothing when training on the CPU
        ladder = [dataclasses.replace(base, checkpointing=checkpointing)]
    else:
        ladder = [dataclasses.replace(base, checkpointing="off"), dataclasses.replace(base, checkpointing="on")]
        if on_gpu:
            ladder.append(dataclasses.replace(base, checkpointing="offload"))
    last = ladder[-1]
    if ENGINE_HAS_TILED_MLP and last.checkpointing != "off":
        last = dataclasses.replace(last, tiled_mlp=True)
        ladder.append(last)
    if on_gpu and profile.can("bitsandbytes") and base.deepspeed == "off":  # ZeRO shards neither (config refuses both)
        if not last.adamw_8bit:
            last = dataclasses.replace(last, adamw_8bit=True)
            ladder.append(last)
        if last.weight_dtype not in ("nf4", "int8") and not shape.shipped_quantization:
            ladder.append(dataclasses.replace(last, weight_dtype="nf4"))
    return [keep_checkpoints_within_ram(shape, dataclasses.replace(setup, compiled=wants_compile(config, setup, shape)),
                                       profile)
            for setup in ladder]


def keep_checkpoints_within_ram(shape: ModelShape, setup: TrainingSetup, profile: HardwareProfile) -> TrainingSetup:
    """With offloaded checkpoints: as many layers offload as HOST_OFFLOAD_FRACTION of the available RAM holds, the
    rest keep their checkpoints on the GPU (an 8B model's 400K-token checkpoints are 105 GB: more than many hosts).
    Each of the node's processes offloads its own layers into that RAM: 8 GPUs at that window would need 840 GB."""
    if setup.checkpointing != "offload" or not profile.has_gpu:
        return setup
    per_layer_on_the_host = layer_input_bytes(shape, setup) * setup.processes_per_node
    offloadable = int(profile.ram_available_bytes * HOST_OFFLOAD_FRACTION // max(1.0, per_layer_on_the_host))
    return dataclasses.replace(setup, gpu_checkpoint_layers=max(0, shape.layers - offloadable))


def wants_compile(config: RunConfig, setup: TrainingSetup, shape: ModelShape | None = None) -> bool:
    """config.compile_layers "auto": compile on a GPU where it was measured (checkpointing off or on, windows up to
    COMPILED_MAX_WINDOW_TOKENS; 1.5-2.8x faster on an H100), not with offloaded checkpoints or the tiled MLP (not
    measured), never on a CPU (minutes of compile for a short run). Nor for layers unlike the measured ones (dense,
    SDPA or flash attention): the compiled share of eager scores, latent attention and routed experts is unknown,
    and a share too low would mark a tier as fitting that does not."""
    if config.compile_layers != "auto":
        return config.compile_layers == "on" and setup.device == "cuda"
    like_measured = shape is None or (shape.experts <= 1 and not shape.latent_attention and setup.attention != "eager")
    return (setup.device == "cuda" and setup.checkpointing in ("off", "on") and not setup.tiled_mlp
            and setup.seq_tokens <= COMPILED_MAX_WINDOW_TOKENS and like_measured)


def options_of(setup: TrainingSetup) -> tuple[str, ...]:
    """Short names for the tier table: what the planner turned on (or off) for this tier."""
    options = {"off": "no-ckpt", "on": "ckpt", "offload": "ckpt-offload"}[setup.checkpointing]
    names = [options, "chunked-loss" if setup.loss == "chunked" else "full-loss"]
    if setup.checkpointing == "offload" and setup.gpu_checkpoint_layers:
        names.append(f"{setup.gpu_checkpoint_layers}-ckpt-on-gpu")
    if setup.tiled_mlp:
        names.append("tiled-mlp")
    if setup.compiled:
        names.append("compiled")
    if setup.adamw_8bit:
        names.append("8bit-adam")
    if setup.weight_dtype == "nf4":
        names.append("qlora")
    elif setup.weight_dtype == "int8":
        names.append("int8")
    if setup.deepspeed != "off":
        names.append(setup.deepspeed)
    if setup.compute_dtype != "bf16" and setup.device == "cuda":
        names.append(setup.compute_dtype)
    if setup.attention == FLASH_ATTENTION:
        names.append("flash-attn")
    elif setup.attention == "eager":
        names.append("eager-attn")  # the model has no SDPA path (Gemma 2): every score is kept
    if setup.rope_scaling_factor > 1:
        names.append(f"rope-x{int(setup.rope_scaling_factor)}")
    return tuple(names)


def shipped_quantization_note(shipped: str, qlora_asked: bool) -> str:
    from elite_core.model_loading import DEQUANTIZED_ON_LOAD

    if shipped in DEQUANTIZED_ON_LOAD:
        note = f"the checkpoint's {shipped} weights load as bf16 (transformers cannot train them)"
    else:
        note = f"the checkpoint ships {shipped} weights: memory counted as bf16, on the high side"
    return note + (", so QLoRA is off: it cannot quantise them again" if qlora_asked else "")


def _plan(shape: ModelShape, profile: HardwareProfile, config: RunConfig, tier: Tier, window: int, target: int,
          rank: int) -> TierPlan:
    profile = profile.for_device(config.device)
    ladder = candidate_setups(shape, profile, config, window, target, rank)
    budget = _budget(profile, ladder[0].processes_per_node)
    chosen = ladder[-1]
    breakdown = predict_memory(shape, chosen, DEFAULT_CONSTANTS)
    for setup in ladder:
        candidate = predict_memory(shape, setup, DEFAULT_CONSTANTS)
        if _fits(candidate, budget, profile):
            chosen, breakdown = setup, candidate
            break
    # Learned positions end at max_position_embeddings: a longer window cannot load, whatever the memory.
    too_long = not shape.rotary and 0 < shape.max_position_embeddings < window
    fits = _fits(breakdown, budget, profile) and not too_long
    grad_accum = config.grad_accum or grad_accum_for(window, chosen.micro_batch * config.gpus)
    step_time = estimate_step_time_s(shape, chosen, profile, grad_accum)
    notes = []
    if not shape.known:
        notes.append(f"{shape.architecture} is not a checked architecture: memory is an estimate")
    if chosen.rope_scaling_factor > 1:
        notes.append(f"window exceeds the model's {shape.max_position_embeddings:,} positions: RoPE scaled x{int(chosen.rope_scaling_factor)}")
    if too_long:
        notes.append(f"window exceeds the model's {shape.max_position_embeddings:,} learned positions (not RoPE: "
                     "they cannot be scaled)")
    elif not fits:
        where = "GPU memory" if profile.has_gpu else "RAM"
        notes.append(f"needs more {where} than the budget even with every memory option on")
    elif profile.device == "cpu" and step_time > CPU_MAX_STEP_S:
        notes.append(f"about {step_time:.0f} s per step on this CPU")
    if not profile.has_gpu:
        notes += [f"{option} needs a CUDA GPU: training without it"
                  for _, option in asked_options(config)]
    if shape.shipped_quantization:
        notes.append(shipped_quantization_note(shape.shipped_quantization, config.qlora))
    return TierPlan(
        tier=tier,
        setup=chosen,
        breakdown=breakdown,
        budget_bytes=budget,
        headroom_bytes=budget - breakdown.total_bytes,
        fits=fits,
        options=options_of(chosen),
        step_time_s=step_time,
        notes=tuple(notes),
        grad_accum=grad_accum,
        learning_rate=default_learning_rate(rank, window),
        cpu_ram_needed_bytes=breakdown.cpu_offload_bytes if profile.has_gpu else 0,
    )


def plan_tiers(shape: ModelShape, profile: HardwareProfile, config: RunConfig) -> tuple[TierPlan, ...]:
    """All seven tiers, each at its own window and default rank, with the config's other settings and overrides."""
    return tuple(
        _plan(shape, profile, config, tier, tier.total_tokens, tier.target_tokens, tier.default_lora_rank)
        for tier in TIERS
    )


def select_tier(plans: tuple[TierPlan, ...] | list[TierPlan]) -> int:
    """The highest tier predicted to fit; 1 when none fits.

    On a CPU, tiers whose estimated optimizer step exceeds CPU_MAX_STEP_S (3 s) are left out as well: a CPU has the RAM
    for a 262K window of the demo model but would need hours per step, which is no demo.
    """
    best = 1
    for plan in plans:
        if not plan.fits:
            continue
        if plan.setup.device == "cpu" and plan.step_time_s > CPU_MAX_STEP_S:
            continue
        best = max(best, plan.tier.number)
    return best


def plan_for_config(shape: ModelShape, profile: HardwareProfile, config: RunConfig) -> TierPlan:
    """The plan for exactly this config: its window, rank, batch and overrides; "auto" fields are the planner's choice."""
    return _plan(shape, profile, config, tier_by_number(config.tier), config.window_tokens, config.target_tokens,
                 config.lora_rank)


GPU_OPTIONS = (("qlora", "QLoRA"), ("adamw_8bit", "8-bit AdamW"), ("deepspeed", "DeepSpeed"))
"""(config field, option) of the options a CPU run trains without; the tier's note names them."""
BITSANDBYTES_OPTIONS = ("qlora", "adamw_8bit")


def asked_options(config: RunConfig, fields=None) -> list[tuple[str, str]]:
    """The (field, option) pairs of GPU_OPTIONS (those among `fields`, if given) that the config turns on."""
    return [(field, option) for field, option in GPU_OPTIONS
            if (fields is None or field in fields) and getattr(config, field) not in (False, "off")]


def missing_libraries(config: RunConfig, profile: HardwareProfile) -> dict[str, str]:
    """The config fields whose option needs bitsandbytes where this GPU machine lacks it, each with what to do. The
    planner's own ladder takes these options only where the profile found it; a user's choice would fail at the
    child's import, after the dataset build. (A ZeRO run without deepspeed is the launch check's: it knows the
    launcher too.) On a CPU run there are none: those options are dropped there, and the tier's note says so."""
    if not profile.for_device(config.device).has_gpu or profile.can("bitsandbytes"):
        return {}
    return {field: f"{option} needs bitsandbytes, not installed here: pip install bitsandbytes, or turn it off"
            for field, option in asked_options(config, BITSANDBYTES_OPTIONS)}


def config_for_plan(config: RunConfig, plan: TierPlan) -> RunConfig:
    """Write the planner's choices into the config, so the run does what the tier table showed."""
    setup = plan.setup
    return config.replace(
        tier=plan.tier.number,
        context_tokens=setup.seq_tokens - setup.target_tokens,
        target_tokens=setup.target_tokens,
        lora_rank=setup.lora_rank,
        lora_alpha=2 * setup.lora_rank,
        gradient_checkpointing=setup.checkpointing,
        adamw_8bit=setup.adamw_8bit,
        qlora=setup.weight_dtype == "nf4",
        deepspeed=setup.deepspeed,
        micro_batch=setup.micro_batch,
        grad_accum=plan.grad_accum,
    )


def max_micro_batch(shape: ModelShape, setup: TrainingSetup, budget_bytes: int, limit: int = 4096) -> int:
    """The largest micro-batch the model predicts to fit (0 when not even 1 does)."""
    usable = budget_bytes * (1.0 - SAFETY_FRACTION)

    def fits(batch: int) -> bool:
        return predict_memory(shape, dataclasses.replace(setup, micro_batch=batch)).total_bytes <= usable

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def _is_out_of_memory(error: BaseException) -> bool:
    return "OutOfMemory" in type(error).__name__ or "out of memory" in str(error).lower()


def _release_memory() -> None:
    """Free what a failed probe left behind before the next one (torch only if the caller already loaded it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()  # an out-of-memory traceback holds the failed step's tensors in a reference cycle
        torch.cuda.empty_cache()


def find_micro_batch(try_step: Callable[[int], bool], predicted: int, max_probes: int = 6) -> int:
    """The largest micro-batch that runs, confirmed with real probe steps: start at the prediction, then double or bisect.

    try_step(batch) runs one real training step and returns True if it fits (an out-of-memory exception counts as
    False). At most max_probes steps run; memory is released between them. Returns 0 when not even 1 runs.
    """
    known_good = 0
    known_bad: int | None = None
    candidate = max(1, predicted)
    for _ in range(max_probes):
        try:
            ok = bool(try_step(candidate))
        except Exception as error:
            if not _is_out_of_memory(error):
                raise
            ok = False
        _release_memory()
        if ok:
            known_good = candidate
        else:
            known_bad = candidate
        if known_bad is None:
            candidate = known_good * 2
        else:
            if known_bad - known_good <= 1:
                break
            candidate = (known_good + known_bad) // 2
    return known_good


def estimated_tokens_per_s(plan: TierPlan) -> float:
    """Training tokens per second the plan's step time implies (from the measured TFLOPS, or GFLOPS on a CPU)."""
    tokens_per_step = plan.setup.micro_batch * max(1, plan.grad_accum) * plan.setup.seq_tokens
    return tokens_per_step / plan.step_time_s if plan.step_time_s > 0 else 0.0


def with_epoch_times(plans, epoch_tokens, calibration=None) -> tuple[TierPlan, ...]:
    """The plans with tokens/s and the time of one epoch filled in.

    epoch_tokens is an estimates.EpochTokens. With a calibration (estimates.RateCalibration from the pre-flight probe)
    the probed tier shows the measured rate and every other tier its estimate scaled by measured/estimated.
    """
    from elite_core.estimates import epoch_seconds

    timed = []
    for plan in plans:
        rate = estimated_tokens_per_s(plan)
        source = "estimate"
        if calibration is not None:
            # The probe's rate stands for its tier's row where the row trains the probed window; a run's own
            # window (an override) makes the row another configuration, estimated and calibrated like the rest.
            if plan.tier.number == calibration.tier and calibration.window_tokens in (0, plan.setup.seq_tokens):
                rate, source = calibration.measured_tokens_per_s, "probe"
            else:
                rate, source = rate * calibration.ratio, "calibrated"
        tokens = epoch_tokens.tokens_per_epoch(plan.setup.seq_tokens)
        timed.append(dataclasses.replace(
            plan, tokens_per_s=rate, rate_source=source, tokens_per_epoch=tokens,
            tokens_per_epoch_estimated=epoch_tokens.estimated, epoch_s=epoch_seconds(tokens, rate),
        ))
    return tuple(timed)
