"""The training engine: LoRA fine-tuning of a causal LM on repository windows, one loop read top to bottom.

A loop of our own rather than HF Trainer: between optimizer steps it polls commands (checkpoint now, stop), the loss is
computed only on each window's target part without ever materialising full-vocabulary logits, and checkpoints carry the
exact data position so a resumed run repeats the same losses.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from elite_core import checkpoints, distributed, protocol, schedule
from elite_core.config import ConfigError, RunConfig, zero_offload
from elite_core.lean_layers import offload_saved_tensors, share_adapter_inputs, use_lean_norms
from elite_core.memory_model import TrainingSetup, uses_plain_logits
from elite_core.model_loading import load_causal_lm
from elite_core.report import write_plan

LOSS_CHUNK_TOKENS = 1024
"""Target rows per loss chunk: 1024 x a 128K-152K vocabulary is 1.5-1.9 GB of fp32 logits with their gradients, and
the head's matmul is still large enough to run at full speed."""
EVAL_MAX_WINDOWS = 4

EmitFn = Callable[[object], None]
PollFn = Callable[[], Iterable[object]]


def simulate_oom(micro_batch_tokens: int) -> None:
    """Fault injection for tests on machines without a GPU: ELITE_FAULT_OOM_ABOVE_TOKENS=N makes any micro-batch of
    more than N tokens fail exactly as a CUDA out-of-memory error does."""
    limit = os.environ.get("ELITE_FAULT_OOM_ABOVE_TOKENS")
    if limit and micro_batch_tokens > int(limit):
        raise torch.cuda.OutOfMemoryError(f"simulated: {micro_batch_tokens} tokens in one micro-batch")


def resolve_device(config: RunConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the config asks for device 'cuda' but torch sees no CUDA GPU; set device: auto or cpu")
    return config.device


def torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def chunked_target_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                        chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100, equal to transformers' causal-LM loss.

    Only the labelled rows of the hidden states are projected, a chunk at a time, each chunk under activation
    checkpointing: the full-vocabulary fp32 logits (12-14 bytes per logit) never exist, only one chunk's at a time.
    """
    shifted_labels = labels[:, 1:]
    keep = shifted_labels != -100
    rows = hidden[:, :-1][keep]
    targets = shifted_labels[keep]
    count = targets.numel()
    if count == 0:
        return hidden.sum() * 0.0

    def chunk_loss(chunk_hidden: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        logits = lm_head(chunk_hidden).float()
        return F.cross_entropy(logits, chunk_targets, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_tokens):
        end = min(start + chunk_tokens, count)
        if torch.is_grad_enabled():
            total = total + activation_checkpoint(chunk_loss, rows[start:end], targets[start:end], use_reentrant=False)
        else:
            total = total + chunk_loss(rows[start:end], targets[start:end])
    return total / count


def model_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, loss_mode: str) -> torch.Tensor:
    """The training loss. "chunked" runs the decoder and our chunked loss; "full" is the model's own loss."""
    if loss_mode == "full":
        return model(input_ids=input_ids, labels=labels, use_cache=False).loss
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=input_ids, use_cache=False).last_hidden_state
    return chunked_target_loss(base.get_output_embeddings(), hidden, labels)


def enable_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def mlp_shards(setup: TrainingSetup, hidden_size: int) -> int:
    """As many sequence tiles as the window has multiples of the hidden size (Unsloth's rule)."""
    return max(1, math.ceil(setup.seq_tokens / hidden_size))


def tiled_mlp_forward(mlp_call: Callable, shards: int, hidden: torch.Tensor) -> torch.Tensor:
    """The MLP over sequence tiles, each tile checkpointed: only one tile's 3*I-wide intermediate exists at a time.

    The MLP acts on each position alone, so tiling along the sequence changes no result.
    """
    if shards <= 1 or hidden.shape[1] < 2 * shards:
        return mlp_call(hidden)
    tiles = hidden.split(math.ceil(hidden.shape[1] / shards), dim=1)
    if torch.is_grad_enabled():
        outputs = [activation_checkpoint(mlp_call, tile, use_reentrant=False) for tile in tiles]
    else:
        outputs = [mlp_call(tile) for tile in tiles]
    return torch.cat(outputs, dim=1)


def tile_mlps(model, shards: int) -> int:
    """Make every decoder layer's MLP run tiled. The forward is swapped on the instance, so parameter names (and the
    saved adapter) stay exactly as they were. Returns how many MLPs were tiled."""
    import functools

    tiled = 0
    for name, module in model.named_modules():
        if name.endswith(".mlp") and not getattr(module, "_elite_tiled", False):
            module.forward = functools.partial(tiled_mlp_forward, module.forward, shards)
            module._elite_tiled = True
            tiled += 1
    return tiled


def quantization_config_for(setup: TrainingSetup):
    """bitsandbytes settings for QLoRA (NF4 with double quantisation) or 8-bit weights; None for 16/32-bit weights."""
    if setup.weight_dtype not in ("nf4", "int8"):
        return None
    from transformers import BitsAndBytesConfig

    if setup.weight_dtype == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch_dtype(setup.compute_dtype))
    return BitsAndBytesConfig(load_in_8bit=True)


def build_lora_model(config: RunConfig, setup: TrainingSetup, device: str):
    """The base model in the setup's dtype, frozen, with LoRA adapters (and any extra modules trained in full)."""
    dtype = torch_dtype(setup.compute_dtype if setup.weight_dtype in ("nf4", "int8") else setup.weight_dtype)
    model = load_causal_lm(config.model, dtype=dtype, device=device, trust_remote_code=config.trust_remote_code,
                           attn_implementation=setup.attention, quantization_config=quantization_config_for(setup),
                           seed=config.seed, rope_scaling_factor=setup.rope_scaling_factor)
    model = add_lora(model, config, setup)
    if setup.compiled:
        import torch._dynamo

        # A layer Dynamo cannot compile runs eagerly instead of failing the run.
        torch._dynamo.config.suppress_errors = True
        compile_decoder_layers(model)
    return model


def add_lora(model, config: RunConfig, setup: TrainingSetup):
    """Checkpointing and MLP tiling as the setup says, then LoRA adapters; the model comes back in train mode."""
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    if setup.checkpointing in ("on", "offload"):
        enable_checkpointing(model)
    if setup.tiled_mlp:
        tile_mlps(model, mlp_shards(setup, model.config.hidden_size))
    targets = config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear" if targets == ("all-linear",) else list(targets),
        modules_to_save=list(config.extra_trainable_modules) or None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if setup.autocast:
        share_adapter_inputs(model)
    if not setup.compiled:
        use_lean_norms(model)  # compiled layers fuse the norm themselves
    # from_pretrained returns eval mode, and checkpointed layers skip checkpointing outside train mode
    model.train()
    return model


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer in place (the LoRA adapters inside included): fewer, fused kernels where a
    LoRA step is otherwise bound by launching many small ones. Parameter names do not change. Returns the count."""
    compiled = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile()
            compiled += 1
    return compiled


def make_optimizer(model, config: RunConfig, setup: TrainingSetup, device: str):
    params = [p for p in model.parameters() if p.requires_grad]
    if setup.adamw_8bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    # Fused kernels want the state where the parameters are; ZeRO offload steps CPU partitions instead.
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                             fused=device == "cuda" and not zero_offload(setup.deepspeed))


def lr_lambda(config: RunConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to a tenth of the peak (elite_core.schedule owns the math)."""
    return schedule.lr_lambda(config.warmup_steps, total_steps)


@dataclass
class DataPosition:
    """Where in the data the run stands: an epoch and the index into that epoch's shuffled window order."""

    epoch: int = 0
    index: int = 0


def epoch_order(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(seed + epoch).permutation(num_windows)


def sdpa_backend_order() -> list:
    """SDPA backends in the order to try, from ELITE_SDPA_BACKENDS (e.g. "cudnn,flash"); empty: torch's own order.

    Nothing by default: torch's own order already runs cuDNN's attention on Hopper, 1.8x faster than flash
    (bench/results/attention-h100.txt), and the engine's step does use it (bench/results/sdpa-dispatch-h100.txt).
    """
    from torch.nn.attention import SDPBackend

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    setting = os.environ.get("ELITE_SDPA_BACKENDS", "")
    wanted = [name.strip() for name in setting.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise ValueError(f"ELITE_SDPA_BACKENDS: unknown backend {unknown[0]!r}; use {', '.join(names)}")
    return [names[name] for name in wanted]


_PROCESS_SETTINGS = contextlib.ExitStack()


def prefer_sdpa_backends() -> None:
    """Apply sdpa_backend_order() for the rest of the process: checkpointed layers recompute attention during backward,
    outside any forward-time context, and must use the same backend."""
    backends = sdpa_backend_order()
    if backends:
        from torch.nn.attention import sdpa_kernel

        _PROCESS_SETTINGS.enter_context(sdpa_kernel(backends, set_priority=True))


def forward_context(setup: TrainingSetup, hidden_size: int = 0) -> contextlib.ExitStack:
    """Autocast to the compute dtype (setup.autocast; LoRA adapters are fp32 under peft), and checkpoint offload to CPU
    memory when the setup asks for it, keeping the setup's gpu_checkpoint_layers layers' checkpoints on the GPU."""
    stack = contextlib.ExitStack()
    if setup.autocast:
        stack.enter_context(torch.autocast(setup.device, dtype=torch_dtype(setup.compute_dtype)))
    if setup.checkpointing == "offload" and setup.device == "cuda":
        layer_input_bytes = setup.tokens * hidden_size * torch_dtype(setup.compute_dtype).itemsize
        stack.enter_context(offload_saved_tensors(setup.gpu_checkpoint_layers * layer_input_bytes))
    return stack


def reset_peak_rss() -> bool:
    """Start a new peak of the resident set (Linux 4.0+: writing 5 to clear_refs resets VmHWM); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class MemoryMeter:
    """Peak memory as the user's monitor shows it: on CUDA torch's peak reserved plus what lives outside torch (context,
    cuBLAS workspace); on CPU the process's peak resident set since the last step (Linux's VmHWM, reset through
    clear_refs), else its resident set at the step's end, which misses blocks freed before it (glibc hands large
    ones back to the system at once)."""

    def __init__(self, device: str):
        self.device = device
        self.outside_torch_bytes = 0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            free, total = torch.cuda.mem_get_info()
            self.outside_torch_bytes = max(0, (total - free) - torch.cuda.memory_reserved())
        else:
            import psutil

            self._process = psutil.Process()
            self._peak_resets = reset_peak_rss()

    def step_peak_bytes(self) -> int:
        if self.device == "cuda":
            peak = torch.cuda.max_memory_reserved() + self.outside_torch_bytes
            torch.cuda.reset_peak_memory_stats()
            return int(peak)
        if self._peak_resets:
            peak = peak_rss_bytes()
            reset_peak_rss()
            if peak:
                return peak
        return int(self._process.memory_info().rss)

    def refresh_outside_torch(self) -> None:
        """After the first step cuBLAS has its workspace; count it once."""
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            self.outside_torch_bytes = max(0, (total - free) - torch.cuda.memory_reserved())


class TrainingEngine:
    """Runs one training run in the current process, emitting protocol events through `emit`."""

    def __init__(self, config: RunConfig, run_dir: Path, emit: EmitFn, poll_commands: PollFn,
                 resume: bool = False, probe_steps: int = 0, dataset_dir: Path | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.emit = emit
        self.poll_commands = poll_commands
        self.resume = resume
        self.probe_steps = probe_steps
        self.dataset_dir = Path(dataset_dir) if dataset_dir is not None else self.run_dir / "dataset"
        self.checkpoint_requested = False
        self.stop_requested = False
        self.stop_reason = "stop"
        self.rank = distributed.RankInfo()  # distributed: set by setup() from the launcher's environment
        self.run_started = time.monotonic()  # run() sets it again; probes and sweeps call the steps directly
        self.elapsed_before_s = 0.0
        """The run's time up to the checkpoint it resumed from: elapsed_s counts the whole run, not this process."""

    # Signal handlers and the command reader call these; the loop acts on them between optimizer steps.
    def request_checkpoint(self) -> None:
        self.checkpoint_requested = True

    def request_stop(self, reason: str = "stop") -> None:
        self.stop_requested = True
        self.stop_reason = reason

    def _drain_commands(self) -> None:
        for command in self.poll_commands():
            if isinstance(command, protocol.CheckpointNow):
                self.request_checkpoint()
            elif isinstance(command, protocol.Stop):
                self.request_stop("stop")
        # distributed: every rank acts on a request made of any one of them, at the same step
        self.checkpoint_requested, self.stop_requested = distributed.any_rank(
            self.rank, self.checkpoint_requested, self.stop_requested)

    def setup(self) -> None:
        from elite_core.dataset import WindowDataset, build_dataset, complete_build, repository_changed_since
        from elite_core.hardware import planning_profile
        from elite_core.model_loading import load_hf_config, load_model_shape
        from elite_core.planner import plan_for_config
        from elite_core.probe import options_mismatch

        config = self.config
        self.device = resolve_device(config)
        # distributed: join the launcher's process group (one process: nothing happens)
        self.rank = distributed.init_process_group(self.device)
        if self.rank.world_size != config.gpus and self.rank.is_main:
            self.emit(protocol.Warning(message=(
                f"planned for {config.gpus} process(es) (gpus), running {self.rank.world_size}: the per-GPU memory "
                "prediction and the automatic tokens per update assume the planned number")))
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)

        # distributed: rank 0 writes the shared files (hardware cache, plan, dataset) first; the other ranks reuse them
        with distributed.main_first(self.rank):
            profile = planning_profile(self.run_dir, config.output_dir)
            shape = load_model_shape(config.model, config.trust_remote_code)
            self.plan = plan_for_config(shape, profile, config)
            if not config.grad_accum:  # auto: the planner's accumulation for about 32K tokens per update
                config = self.config = config.replace(grad_accum=self.plan.grad_accum)
            self.setup_choice = self.plan.setup
            if not self.probe_steps and self.rank.is_main:
                write_plan(self.run_dir, profile, self.plan)
                mismatch = options_mismatch(self.run_dir, self.plan.options)
                if mismatch:
                    self.emit(protocol.Warning(message=mismatch))
            hf_config = load_hf_config(config.model, config.trust_remote_code)
            self.loss_mode = "full" if uses_plain_logits(hf_config) else "chunked"
            if self.loss_mode == "full":
                self.emit(protocol.Warning(message="this model post-processes its logits: using the model's own loss"))

            dataset_dir = self.dataset_dir
            if self.rank.local_rank == 0 and self.resume and complete_build(dataset_dir) is not None:
                # A resumed run goes on with the windows it trained on: its saved data position indexes them, and a
                # rebuilt set (the repository is usually edited meanwhile) would hand it other windows in silence.
                if self.rank.is_main and repository_changed_since(config.repo, dataset_dir, config.output_dir):
                    self.emit(protocol.Warning(
                        message=f"{Path(config.repo).resolve()} changed since this run's dataset was built: the "
                                "resumed run goes on with the dataset it started with (a new run trains on the changes)"))
            elif self.rank.local_rank == 0:
                if self.resume and self.rank.is_main and checkpoints.list_checkpoints(self.run_dir):
                    self.emit(protocol.Warning(
                        message=f"this run's dataset ({dataset_dir}) is gone or incomplete: rebuilt from "
                                f"{Path(config.repo).resolve()} as it is now, so the resumed steps draw other windows "
                                "than the run would have"))
                # The node's other ranks read what its first rank built: scanning again, they rebuilt it side by
                # side wherever the repository had changed since (3 CPU ranks on a busy directory: a rename race).
                build_dataset(config.repo, dataset_dir, tokenizer_source=config.model,
                              trust_remote_code=config.trust_remote_code, eval_fraction=config.eval_fraction,
                              seed=config.seed, output_dir=config.output_dir)
            self.train_data = WindowDataset(dataset_dir, "train", config.context_tokens, config.target_tokens)
            self.eval_data = WindowDataset(dataset_dir, "eval", config.context_tokens, config.target_tokens)
        if len(self.train_data) == 0:
            raise RuntimeError(f"the dataset built from {config.repo} has no training windows")

        if self.resume:
            self._refuse_a_changed_adapter(config)
        if self.device == "cuda":
            prefer_sdpa_backends()
        self.model = build_lora_model(config, self.setup_choice, self.device)
        self.optimizer = make_optimizer(self.model, config, self.setup_choice, self.device)
        # distributed: a step takes micro_batch x grad_accum windows on each rank
        windows_per_step = config.micro_batch * config.grad_accum * self.rank.world_size
        steps_per_epoch = max(1, math.ceil(len(self.train_data) / windows_per_step))
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = config.max_steps or steps_per_epoch * config.epochs
        if self.probe_steps:
            self.total_steps = self.probe_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config, self.total_steps))
        fp16 = self.device == "cuda" and self.setup_choice.compute_dtype == "fp16"
        self.grad_scaler = torch.amp.GradScaler("cuda") if fp16 else None
        # distributed: the training forward runs through DDP (or DeepSpeed ZeRO) when there are several ranks
        self.parallel_loss = distributed.ParallelLoss(
            self.model, lambda model, ids, labels: model_loss(model, ids, labels, self.loss_mode), self.rank,
            self.device, config, self.optimizer, self.scheduler, self.setup_choice.compute_dtype)
        self.step = 0
        self.position = DataPosition()
        self.step_windows: list[int] = []
        """The windows _next_windows handed out since the step began (the step's StepMetrics.windows)."""
        self.losses: list[float] = []
        if self.resume:
            self._restore()

    def _refuse_a_changed_adapter(self, config: RunConfig) -> None:
        """Before the model loads: a config edited since the last checkpoint must still fit its adapter's shape. The
        newest checkpoint's config, unverified: loading verifies (hashes) the checkpoint once, later."""
        saved_ones = checkpoints.list_checkpoints(self.run_dir)
        latest = saved_ones[-1] if saved_ones else None
        saved = checkpoints.saved_config(latest) if latest is not None else None
        if saved is None:
            return
        changed = {name: values for name, values in checkpoints.config_changes(saved, config).items()
                   if name in checkpoints.ADAPTER_SHAPE_FIELDS}
        if changed:
            raise ConfigError({name: f"{old} -> {new} since the checkpoint {latest.name}: a resumed run keeps its "
                                     "adapter's shape; set it back in config.yaml, or start a new run"
                               for name, (old, new) in changed.items()})

    def _restore(self) -> None:
        state = checkpoints.load_latest(self.run_dir, self.model, self.optimizer, self.scheduler)
        if state is None:
            self.emit(protocol.Warning(message="no usable checkpoint found: starting from step 0"))
            return
        self.step = state["step"]
        self.elapsed_before_s = float(state.get("elapsed_s", 0.0))
        self.position = DataPosition(**state["position"])
        self.losses = list(state.get("losses", []))
        self.emit(protocol.Warning(message=f"resumed from {state['path']} at step {self.step}"))
        saved = checkpoints.saved_config(Path(state["path"]))
        changes = checkpoints.config_changes(saved, self.config) if saved is not None else {}
        if "learning_rate" in changes:
            # The optimizer and scheduler state bring the saved peak rate back; the edited one is the run's now.
            scale = self.config.learning_rate / saved.learning_rate
            self.scheduler.base_lrs = [rate * scale for rate in self.scheduler.base_lrs]
            for group in self.optimizer.param_groups:
                group["initial_lr"] *= scale
                group["lr"] *= scale
        if changes:
            listed = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changes.items())
            self.emit(protocol.Warning(message=f"resumed with settings changed since that checkpoint: {listed}"))

    def _next_windows(self, count: int) -> list[int]:
        picked = []
        while len(picked) < count:
            order = epoch_order(len(self.train_data), self.config.seed, self.position.epoch)
            if self.position.index >= len(order):
                self.position = DataPosition(self.position.epoch + 1, 0)
                continue
            picked.append(int(order[self.position.index]))
            self.position.index += 1
        self.step_windows.extend(picked)
        return picked

    def _batch(self, indices: list[int], data) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [data[i] for i in indices]
        input_ids = torch.from_numpy(np.stack([p[0] for p in pairs])).to(self.device)
        labels = torch.from_numpy(np.stack([p[1] for p in pairs])).to(self.device)
        return input_ids, labels

    def _forward_context(self):
        return forward_context(self.setup_choice, self.model.config.hidden_size)

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step over grad_accum micro-batches: (mean loss, grad norm, tokens)."""
        config = self.config
        self.step_windows = []
        distributed.inject_rank_failure(self.rank, self.step + 1)
        if self.parallel_loss.deepspeed is not None:  # ZeRO (one GPU or several) steps and zeroes through DeepSpeed
            batches = (self._batch(distributed.rank_slice(self._next_windows(config.micro_batch * self.rank.world_size),
                                                          self.rank), self.train_data) for _ in range(config.grad_accum))
            return self.parallel_loss.deepspeed_step(batches, config.grad_accum, self._forward_context)
        # Not under ZeRO: its offload keeps gradient buffers on the CPU partitions that set_to_none would drop.
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(config.grad_accum):
            # distributed: each rank trains on its own slice of the next micro_batch x world windows
            windows = distributed.rank_slice(self._next_windows(config.micro_batch * self.rank.world_size), self.rank)
            input_ids, labels = self._batch(windows, self.train_data)
            tokens += input_ids.numel()
            simulate_oom(input_ids.numel())
            with self._forward_context(), self.parallel_loss.sync_gradients(micro == config.grad_accum - 1):
                loss = self.parallel_loss(input_ids, labels) / config.grad_accum
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss).backward()
            else:
                loss.backward()
            loss_sum += loss.detach()
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        # distributed: the step's loss is the mean over the ranks' slices, its tokens their sum
        loss_sum = distributed.mean_across_ranks(loss_sum, self.rank)
        tokens = distributed.sum_across_ranks(tokens, self.rank)
        # .item() waits for the GPU: once per optimizer step, not per micro-batch
        return float(loss_sum.item()), float(grad_norm.item()), tokens

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if len(self.eval_data) == 0:
            return None
        self.model.eval()
        losses = []
        # Compiled layers run eagerly here: evaluated first (step 0, one window without gradients), Dynamo would
        # compile them for it and then again for training with a dynamic batch, other graphs than the pre-flight
        # probe's (tests/test_compiled_layers.py).
        with torch.compiler.set_stance("force_eager"):
            for index in range(min(len(self.eval_data), EVAL_MAX_WINDOWS)):
                input_ids, labels = self._batch([index], self.eval_data)
                with self._forward_context():
                    losses.append(float(model_loss(self.model, input_ids, labels, self.loss_mode).item()))
        self.model.train()
        return sum(losses) / len(losses)

    def save_checkpoint(self, reason: str) -> bool:
        # distributed: rank 0 writes (DDP keeps every rank's weights equal); the others wait so none trains past a save
        distributed.barrier(self.rank)
        saved = self._write_checkpoint(reason) if self.rank.is_main else True
        distributed.barrier(self.rank)
        return saved

    def _write_checkpoint(self, reason: str) -> bool:
        """Save. A failed save (disk full, permissions) leaves the previous checkpoint intact and is reported; then the
        config's on_save_failure decides: train on, pause (retry the save until it lands or a stop comes), or stop."""
        started = time.monotonic()
        state = {"step": self.step, "position": vars(self.position).copy(), "losses": self.losses[-10000:],
                 "elapsed_s": self.elapsed_s()}
        policy = self.config.on_save_failure
        paused = False
        while True:
            try:
                path = checkpoints.save(self.run_dir, self.model, self.optimizer, self.scheduler, state, self.config,
                                        keep=self.config.keep_checkpoints)
                break
            except OSError as exc:
                if paused:
                    self._wait_for_retry()
                    if self.stop_requested:
                        return False
                    continue
                previous = checkpoints.latest_valid(self.run_dir)
                kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
                then = {"continue": "training goes on",
                        "pause": f"training is paused; the save is retried every {self.config.save_retry_seconds} s "
                                 "(free some space, or stop the run)",
                        "stop": "stopping"}[policy]
                self.emit(protocol.Warning(message=f"checkpoint at step {self.step} failed: {exc.strerror or exc}; "
                                                   f"{kept}; {then}"))
                if policy == "stop":
                    self.request_stop("save-failed")
                    return False
                if policy == "continue":
                    return False
                paused = True
                self._wait_for_retry()
                if self.stop_requested:
                    return False
        if paused:
            self.emit(protocol.Warning(message=f"checkpoint at step {self.step} saved after the pause; training goes on"))
        self.emit(protocol.CheckpointSaved(step=self.step, path=str(path), reason=reason,
                                           seconds=time.monotonic() - started))
        return True

    def _wait_for_retry(self) -> None:
        """Sleep until the next save attempt, still answering a stop command or signal."""
        deadline = time.monotonic() + self.config.save_retry_seconds
        while time.monotonic() < deadline and not self.stop_requested:
            self._drain_commands()
            time.sleep(0.2)

    def elapsed_s(self) -> float:
        """Seconds of the run so far: this process's since its start, after the resumed checkpoint's."""
        return self.elapsed_before_s + time.monotonic() - self.run_started

    def run(self) -> protocol.Finished:
        started = self.run_started = time.monotonic()
        self.setup()
        config = self.config
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        meter = MemoryMeter(self.device)
        self.emit(protocol.Started(
            run_dir=str(self.run_dir), pid=os.getpid(), device=self.device, total_steps=self.total_steps,
            tokens_per_step=config.micro_batch * config.grad_accum * config.window_tokens * self.rank.world_size,
            trainable_params=trainable, total_params=total, predicted_peak_bytes=self.plan.breakdown.total_bytes,
            start_step=self.step,
        ))
        last_checkpoint = time.monotonic()
        stopped_early = False
        eval_interval = config.eval_interval(self.total_steps)
        if self.step == 0 and not self.probe_steps and eval_interval:
            self._emit_eval()  # the base model's held-out loss: what the report measures the fine-tune against
        while self.step < self.total_steps:
            self._drain_commands()
            if self.stop_requested:
                stopped_early = True
                break
            step_started = time.monotonic()
            position_before = DataPosition(self.position.epoch, self.position.index)
            try:
                loss, grad_norm, tokens = self.train_step()
            except torch.cuda.OutOfMemoryError:
                # The weights and optimizer are as after the last full step; rewind the data so resume redoes this one.
                self.optimizer.zero_grad(set_to_none=True)
                if self.device == "cuda":
                    torch.cuda.empty_cache()
                self.position = position_before
                # distributed: the other ranks wait in a collective; a multi-rank run resumes from its last checkpoint
                if not self.rank.is_distributed:
                    self.save_checkpoint("oom")
                raise
            if self.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.monotonic() - step_started
            self.step += 1
            self.losses.append(loss)
            if self.step == 1:
                meter.refresh_outside_torch()
            if self.step % config.log_every_steps == 0 or self.step == self.total_steps:
                self.emit(protocol.StepMetrics(
                    step=self.step, epoch=self.step / self.steps_per_epoch, loss=loss,
                    lr=self.scheduler.get_last_lr()[0], tokens_per_s=tokens / max(seconds, 1e-9),
                    memory_bytes=meter.step_peak_bytes(), elapsed_s=self.elapsed_s(), grad_norm=grad_norm,
                    windows=tuple(self.step_windows),
                ))
            if self.probe_steps:
                continue
            # The last step's evaluation is the final one, after the loop: once, not twice.
            if eval_interval and self.step % eval_interval == 0 and self.step < self.total_steps:
                self._emit_eval()
            self._drain_commands()
            if self.checkpoint_requested:
                self.checkpoint_requested = False
                self.save_checkpoint("requested")
                last_checkpoint = time.monotonic()
            elif config.checkpoint_every_seconds and time.monotonic() - last_checkpoint >= config.checkpoint_every_seconds:
                self.save_checkpoint("periodic")
                last_checkpoint = time.monotonic()

        if self.probe_steps:
            return self._finish(started, stopped_early, adapter_path="", report_path="")
        if stopped_early:
            self.save_checkpoint(self.stop_reason)
            # A report closes a stopped run too (what it trained so far); the adapter is written when it finishes.
            return self._finish(started, stopped_early, adapter_path="", report_path=str(self.run_dir / "report.md"))
        self._emit_eval()
        adapter_dir = self.run_dir / "adapter"
        if self.rank.is_main:  # distributed: one writer
            self.model.save_pretrained(adapter_dir)
        self.save_checkpoint("final")
        return self._finish(started, stopped_early, adapter_path=str(adapter_dir),
                            report_path=str(self.run_dir / "report.md"))

    def _emit_eval(self) -> None:
        if not self.rank.is_main:  # distributed: rank 0 evaluates alone; evaluation has no collectives
            return
        eval_loss = self.evaluate()
        if eval_loss is not None:
            self.emit(protocol.EvalMetrics(step=self.step, loss=eval_loss, perplexity=math.exp(min(eval_loss, 50.0))))

    def _finish(self, started: float, stopped_early: bool, adapter_path: str, report_path: str) -> protocol.Finished:
        final_loss = self.losses[-1] if self.losses else float("nan")
        finished = protocol.Finished(step=self.step, final_loss=final_loss, adapter_path=adapter_path,
                                     report_path=report_path, stopped_early=stopped_early,
                                     elapsed_s=self.elapsed_s())
        return finished


def describe_exception(exc: BaseException) -> protocol.Error:
    if isinstance(exc, ConfigError):  # a setting to change, said in full: no traceback to read
        return protocol.Error(message=f"invalid settings: {exc}", kind="config")
    kind = "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "exception"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if kind == "oom":
        message = f"CUDA out of memory: {message[:200]}"
    return protocol.Error(message=f"{type(exc).__name__}: {message}" if kind != "oom" else message,
                          traceback=traceback.format_exc(), kind=kind)

