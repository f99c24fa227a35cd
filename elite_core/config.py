"""The run configuration: one frozen, validated dataclass that the wizard edits, YAML stores and the child reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from elite_core.tiers import tier_by_number

DEMO_MODEL = "demo"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
CHECKPOINTING = ("auto", "on", "off", "offload")
DEEPSPEED_MODES = ("off", "zero2", "zero2-offload", "zero3", "zero3-offload")
"""DeepSpeed ZeRO stage; "-offload" keeps the optimizer state (and, for stage 3, the frozen weights) in CPU RAM."""
DEVICES = ("auto", "cpu", "cuda")
CONFIG_VERSION = 1


def zero_stage(deepspeed: str) -> int:
    """0 (no ZeRO), 2 or 3 for a DEEPSPEED_MODES value."""
    return {"zero2": 2, "zero3": 3}.get(deepspeed.removesuffix("-offload"), 0)


def zero_offload(deepspeed: str) -> bool:
    return deepspeed.endswith("-offload")


class ConfigError(ValueError):
    """Raised with every invalid field at once, so a form can show each message beside its field."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{name}: {message}" for name, message in errors.items()))


@dataclass(frozen=True)
class RunConfig:
    model: str = DEMO_MODEL
    """A Hugging Face hub id, a local model directory, or "demo" for the built-in random-weight model."""
    repo: str = "."
    """The repository the training set is built from."""
    output_dir: str = "elite-runs"
    """Parent directory of run directories."""
    run_name: str = "run"
    tier: int = 1
    context_tokens: int = 4096
    target_tokens: int = 512
    lora_rank: int = 48
    lora_alpha: int = 96
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    extra_trainable_modules: tuple[str, ...] = ()
    """Modules trained in full beside the adapters (peft's modules_to_save), e.g. embeddings for a random-weight demo."""
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    micro_batch: int = 1
    grad_accum: int = 0
    """Micro-batches per optimizer step; 0 (auto): about planner.TOKENS_PER_UPDATE (32K) tokens per update."""
    epochs: int = 1
    max_steps: int = 0
    """Optimizer steps to run; 0 means run `epochs` full passes."""
    precision: str = "auto"
    gradient_checkpointing: str = "auto"
    compile_layers: str = "auto"
    """torch.compile the decoder layers on a GPU: "auto" lets the planner decide (planner.wants_compile), "on", "off"."""
    adamw_8bit: bool = False
    qlora: bool = False
    deepspeed: str = "off"
    gpus: int = 1
    """Data-parallel processes in all (GPUs per node x nodes); the tier table plans each GPU's share of them."""
    nodes: int = 1
    """Machines the processes span: each node's gpus / nodes processes share its host RAM (offloaded checkpoints,
    ZeRO's CPU partitions)."""
    device: str = "auto"
    seed: int = 1234
    trust_remote_code: bool = False
    eval_fraction: float = 0.05
    """Share of files held out for evaluation (split by file, not by window)."""
    eval_every_steps: int = 50
    min_evaluations: int = 5
    """Held-out evaluations a run makes at least besides the one before training: a shorter run evaluates more often
    than eval_every_steps, so that it has a held-out curve, and the epoch advice read from it (at every 50 steps, 30
    recorded runs of 6-72 steps had none: bench/results/epochs-overfit-gpu.txt). 0 leaves eval_every_steps alone."""
    compile_eval_prompts: int = 8
    """Held-out prompts completed before and after training to measure the compile rate; 0 turns it off."""
    checkpoint_every_seconds: int = 600
    keep_checkpoints: int = 3
    on_save_failure: str = "continue"
    """When a checkpoint cannot be written (disk full): "continue" training, "pause" until a retried save lands, or
    "stop" the run. The previous checkpoint stays intact in every case."""
    save_retry_seconds: int = 30
    log_every_steps: int = 1
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        errors = validation_errors(self)
        if errors:
            raise ConfigError(errors)

    def eval_interval(self, total_steps: int) -> int:
        """Steps between held-out evaluations in a run of `total_steps`; 0: none."""
        if not self.eval_every_steps:
            return 0
        if self.min_evaluations and total_steps > 0:
            return max(1, min(self.eval_every_steps, total_steps // self.min_evaluations))
        return self.eval_every_steps

    @property
    def window_tokens(self) -> int:
        return self.context_tokens + self.target_tokens

    @property
    def is_demo(self) -> bool:
        return self.model == DEMO_MODEL

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def with_tier(self, number: int) -> "RunConfig":
        """Switch to a tier: its windows and default rank (alpha follows at 2x rank)."""
        tier = tier_by_number(number)
        return self.replace(
            tier=tier.number,
            context_tokens=tier.context_tokens,
            target_tokens=tier.target_tokens,
            lora_rank=tier.default_lora_rank,
            lora_alpha=2 * tier.default_lora_rank,
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError({name: "unknown setting" for name in unknown})
        values = {}
        for name, value in data.items():
            if isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return cls(**values)

    @classmethod
    def from_yaml(cls, text: str) -> "RunConfig":
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError({"config": f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"}) from exc
        if not isinstance(data, dict):
            raise ConfigError({"config": "the YAML file must hold a mapping of settings"})
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_yaml(Path(path).read_text(encoding="utf-8"))


def _check_types(config: RunConfig) -> dict[str, str]:
    errors = {}
    for f in fields(config):
        value = getattr(config, f.name)
        expected = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if expected == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            errors[f.name] = f"must be a whole number, got {value!r}"
        elif expected == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            errors[f.name] = f"must be a number, got {value!r}"
        elif expected == "bool" and not isinstance(value, bool):
            errors[f.name] = f"must be true or false, got {value!r}"
        elif expected == "str" and not isinstance(value, str):
            errors[f.name] = f"must be text, got {value!r}"
        elif expected.startswith("tuple") and not (
            isinstance(value, tuple) and all(isinstance(item, str) for item in value)
        ):
            errors[f.name] = f"must be a list of names, got {value!r}"
    return errors


def validation_errors(config: RunConfig) -> dict[str, str]:
    """Every problem with the config, keyed by field name; empty when valid."""
    errors = _check_types(config)
    if errors:
        return errors

    def require(name: str, ok: bool, message: str) -> None:
        if not ok and name not in errors:
            errors[name] = message

    require("model", bool(config.model.strip()), "name a model: a hub id, a local directory, or 'demo'")
    require("repo", bool(config.repo.strip()), "name the repository to train on")
    require("output_dir", bool(config.output_dir.strip()), "name an output directory")
    require(
        "run_name",
        bool(config.run_name) and "/" not in config.run_name and config.run_name not in (".", ".."),
        "a run name is one directory name, without '/'",
    )
    require("tier", 1 <= config.tier <= 7, "tiers are 1..7")
    require("context_tokens", 1 <= config.context_tokens <= 4_194_304, "between 1 and 4,194,304 tokens")
    require("target_tokens", 1 <= config.target_tokens <= 1_048_576, "between 1 and 1,048,576 tokens")
    require("lora_rank", 1 <= config.lora_rank <= 1024, "between 1 and 1024")
    require("lora_alpha", 1 <= config.lora_alpha <= 4096, "between 1 and 4096")
    require("lora_dropout", 0.0 <= config.lora_dropout < 1.0, "from 0 up to (not including) 1")
    require("lora_target_modules", len(config.lora_target_modules) > 0, "name at least one module, or 'all-linear'")
    require("learning_rate", 0.0 < config.learning_rate <= 1.0, "above 0 and at most 1")
    require("weight_decay", 0.0 <= config.weight_decay <= 1.0, "from 0 to 1")
    require("warmup_steps", config.warmup_steps >= 0, "0 or more")
    require("max_grad_norm", config.max_grad_norm >= 0.0, "0 (no clipping) or more")
    require("micro_batch", 1 <= config.micro_batch <= 4096, "between 1 and 4096")
    require("grad_accum", 0 <= config.grad_accum <= 65536, "between 1 and 65536, or 0 for auto")
    require("epochs", 1 <= config.epochs <= 1000, "between 1 and 1000")
    require("max_steps", config.max_steps >= 0, "0 (use epochs) or more")
    require("precision", config.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}")
    require(
        "gradient_checkpointing",
        config.gradient_checkpointing in CHECKPOINTING,
        f"one of {', '.join(CHECKPOINTING)}",
    )
    require("compile_layers", config.compile_layers in ("auto", "on", "off"), "one of auto, on, off")
    require("deepspeed", config.deepspeed in DEEPSPEED_MODES, f"one of {', '.join(DEEPSPEED_MODES)}")
    require("gpus", 1 <= config.gpus <= 4096, "between 1 and 4096")
    require("nodes", 1 <= config.nodes <= config.gpus and config.gpus % config.nodes == 0,
            f"between 1 and gpus ({config.gpus}), dividing it evenly: gpus counts the processes of every node")
    require("deepspeed", not (config.deepspeed != "off" and config.qlora),
            "ZeRO does not shard 4-bit (QLoRA) weights: turn one of them off")
    require("deepspeed", not (config.deepspeed != "off" and config.adamw_8bit),
            "ZeRO keeps its own fp32 optimizer partitions: turn 8-bit AdamW off")
    require("device", config.device in DEVICES, f"one of {', '.join(DEVICES)}")
    require("eval_fraction", 0.0 <= config.eval_fraction < 0.5, "from 0 up to 0.5")
    require("eval_every_steps", config.eval_every_steps >= 0, "0 (never) or more")
    require("min_evaluations", config.min_evaluations >= 0, "0 (only eval_every_steps) or more")
    require("compile_eval_prompts", 0 <= config.compile_eval_prompts <= 1000, "from 0 (off) to 1000")
    require("checkpoint_every_seconds", config.checkpoint_every_seconds >= 0, "0 (never) or more")
    require("keep_checkpoints", config.keep_checkpoints >= 1, "keep at least 1")
    require("on_save_failure", config.on_save_failure in ("continue", "pause", "stop"), "one of continue, pause, stop")
    require("save_retry_seconds", config.save_retry_seconds >= 1, "1 or more")
    require("log_every_steps", config.log_every_steps >= 1, "1 or more")
    require("version", config.version == CONFIG_VERSION, f"this elite-tui reads config version {CONFIG_VERSION}")
    return errors


def parse_field(name: str, text: str) -> Any:
    """Turn what a user typed into the field's type, raising ConfigError naming the field."""
    kinds = {f.name: (f.type if isinstance(f.type, str) else f.type.__name__) for f in fields(RunConfig)}
    if name not in kinds:
        raise ConfigError({name: "unknown setting"})
    kind = kinds[name]
    text = text.strip()
    try:
        if kind == "int":
            return int(text.replace(",", "").replace("_", ""))
        if kind == "float":
            return float(text)
        if kind == "bool":
            lowered = text.lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if kind.startswith("tuple"):
            return tuple(part.strip() for part in text.split(",") if part.strip())
    except ValueError:
        wanted = {"int": "a whole number", "float": "a number", "bool": "yes or no"}.get(kind, kind)
        raise ConfigError({name: f"{text!r} is not {wanted}"}) from None
    return text


def demo_defaults() -> dict[str, Any]:
    """Settings that make the demo model's fine-tune visible on a CPU in minutes.

    The demo model is pretrained (elite_core.demo_model), so it trains LoRA alone, as a user's run does; 3e-3 suits a
    model this small (on the 50-step CPU demo it ended 2 % lower than 1e-3, and LoRA plus the embeddings and head in
    full, the setting of the earlier random-weight demo, gained nothing: bench/results/demo-finetune-cpu.txt).
    """
    return {
        "grad_accum": 1,  # one window per update: 50 visible steps in minutes
        "learning_rate": 3e-3,
        "warmup_steps": 5,
        "max_steps": 50,
        "compile_eval_prompts": 8,
        "eval_every_steps": 20,
        "checkpoint_every_seconds": 120,
    }


def default_config(model: str = DEMO_MODEL, repo: str = ".", output_dir: str = "elite-runs", **overrides: Any) -> RunConfig:
    base: dict[str, Any] = {"model": model, "repo": repo, "output_dir": output_dir}
    if model == DEMO_MODEL:
        base.update(demo_defaults())
    base.update(overrides)
    return RunConfig(**base)


field_names = tuple(f.name for f in fields(RunConfig))
