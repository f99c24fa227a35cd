"""Peak-memory model of LoRA training: pure functions from a model's shape and a training setup to a typed breakdown.

The formulas follow the operations the engine (elite_core.training) runs and what autograd saves for each of them, per token
and per layer, rather than a lookup table of measured points. Notation in comments: s tokens of a micro-batch (batch x
sequence), h hidden, a query heads, d head dim, kv key/value heads, I MLP intermediate, V vocabulary, L layers, r LoRA rank.
Constants that cannot be derived (CUDA context, allocator slack, backward working memory) live in MemoryConstants and are
calibrated against bench/memory_accuracy.py on an H100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from elite_core.config import zero_offload, zero_stage

MIB = 1024**2

# Architectures whose layer structure (GQA attention, gated SiLU MLP, RMSNorm) the formulas below describe exactly.
KNOWN_ARCHITECTURES = frozenset(
    {"llama", "qwen2", "qwen3", "mistral", "qwen2_moe", "granite", "olmo2", "phi3", "starcoder2", "gemma", "gemma2", "gemma3_text"}
)
_BIAS_QKV_ARCHITECTURES = frozenset({"qwen2", "qwen2_moe", "starcoder2"})
_UNGATED_MLP_ARCHITECTURES = frozenset({"starcoder2", "gpt2", "gpt_bigcode", "gpt_neox", "falcon"})

LEAN_NORM_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3"})
"""Architectures whose RMSNorm the engine swaps for its lean one (elite_core.lean_layers.LEAN_NORM_CLASSES)."""
DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "int8": 1.0, "nf4": 0.516}
"""Bytes per weight: NF4 is 4 bits + absmax with double quantisation (QLoRA); int8 adds one fp32 scale per row, ignored."""


QK_NORM_ARCHITECTURES = frozenset({"qwen3", "qwen3_moe", "olmo2", "olmo3", "gemma3_text"})
"""Model types that RMS-normalise queries and keys before attention: the norms keep their inputs too."""
FOUR_NORM_ARCHITECTURES = frozenset({"gemma2", "gemma3_text"})
"""Model types with a norm before and after both attention and MLP (4 a layer, not 2)."""

FUSED_QKV_ARCHITECTURES = frozenset({"phi3"})
ATTENTION_SINK_ARCHITECTURES = frozenset({"gpt_oss"})
"""Model types whose attention adds a learned sink column to the scores (gpt-oss); transformers runs it eager, with
the softmax in the scores' own dtype."""
CLAMPED_GLU_ARCHITECTURES = frozenset({"gpt_oss"})
"""Experts with gpt-oss's clamped GLU ((clamp(up) + 1) * gate * sigmoid(alpha * gate)), which keeps more than SiLU."""
ROUTER_NOT_LINEAR_ARCHITECTURES = frozenset({"gpt_oss"})
"""Mixtures of experts whose router is a module of its own, not an nn.Linear: all-linear LoRA leaves it alone."""
ALL_BIAS_ARCHITECTURES = frozenset({"starcoder2"})
"""Model types whose config's use_bias puts a bias on every linear, not on q, k and v alone."""
LAYER_NORM_ARCHITECTURES = frozenset({"starcoder2"})
"""Model types normed by nn.LayerNorm (a weight and a bias), not RMSNorm."""
_MLP_NAME_ALIASES = {"starcoder2": {"c_fc": "up_proj", "c_proj": "down_proj"}}
"""An ungated MLP's module names where they are not up_proj/down_proj, as LoRA targets name them."""


def supports_sdpa(hf_config) -> bool:
    """Whether transformers' causal-LM class for this config runs SDPA attention (unknown classes: assumed so)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        return bool(getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)], "_supports_sdpa", True))
    except Exception:
        return True


LEARNED_POSITION_ARCHITECTURES = frozenset({"gpt2", "gpt_bigcode", "gpt_neo", "opt"})
"""Model types whose positions are a learned table, not rotary: no window past their max_position_embeddings."""


def uses_plain_logits(hf_config) -> bool:
    """Models that post-process logits (soft-capping, scaling) keep the model's own loss so the math stays the same."""
    return bool(getattr(hf_config, "final_logit_softcapping", None) or getattr(hf_config, "logit_scale", None))


@dataclass(frozen=True)
class ModelShape:
    name: str
    architecture: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_position_embeddings: int
    total_params: int
    known: bool
    """False when the architecture is not one the formulas were checked on: the numbers are an estimate."""
    attention_bias: bool = False
    gated_mlp: bool = True
    experts: int = 1
    experts_per_token: int = 1
    plain_logits: bool = False
    """The model post-processes its logits (soft-capping, scaling): training keeps its own full-vocabulary loss."""
    rotary: bool = True
    """Positions are rotary, so a window past max_position_embeddings trains with RoPE scaled; False for learned
    absolute positions (GPT-2, StarCoder 1), which cannot go past them."""
    qk_norm: bool = False
    """Queries and keys are RMS-normalised (Qwen3, OLMo 2, Gemma 3)."""
    latent_attention: tuple[int, int, int, int, int] = ()
    """DeepSeek's multi-head latent attention: (q_lora_rank or 0, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
    v_head_dim); () for ordinary attention."""
    fused_qkv: bool = False
    """One linear makes q, k and v (Phi-3): the attention keeps the whole output alive through v's view of it."""
    sdpa: bool = True
    """transformers runs this model's attention through torch's SDPA; False (Gemma 2): eager, or flash-attn."""
    attention_softcap: bool = False
    """Attention scores are soft-capped with tanh (Gemma 2): eager attention keeps the capped scores too."""
    norms_per_layer: int = 2
    attention_sinks: bool = False
    """A learned sink column joins each head's scores (gpt-oss): eager attention, softmax in the scores' dtype."""
    clamped_glu: bool = False
    """The experts' GLU is gpt-oss's clamped one."""
    router_linear: bool = True
    """A mixture's router is an nn.Linear, which all-linear LoRA adapts (gpt-oss's is not)."""
    layer_norm: bool = False
    """Norms are nn.LayerNorm with a bias (Starcoder2), not RMSNorm."""
    shipped_quantization: str = ""
    """The checkpoint's own quantisation (its config's quant_method: "fp8", "mxfp4", "gptq", ...), "" for none. fp8
    and mxfp4 load dequantised to bf16 (model_loading.load_causal_lm), as counted here; QLoRA cannot quantise again."""
    linear_bias: bool = False
    """Every linear has a bias (Starcoder2's use_bias); attention_bias alone: q, k and v have one."""
    shared_expert_intermediate: int = 0
    """Mixture of experts: the width of the dense expert every token also passes (Qwen2-MoE, DeepSeek); 0 for none."""
    outside_params: int = 0
    """Parameters outside the text decoder that AutoModelForCausalLM loads too (a multimodal checkpoint's vision tower
    and projector), counted on a meta device; training never runs them."""
    outside_adapters_per_rank: int = 0
    """All-linear adapters peft puts on those, per unit of rank."""
    lora_params_per_rank: int = 0
    """All-linear LoRA parameters per unit of rank as the installed peft adapts this model, counted on a meta-device
    copy (model_loading.count_on_meta_device): for mixtures of experts, whose fused expert weights and router peft
    adapts in ways of its own. 0: counted from layer_linears."""
    dense_layers: int = 0
    """Mixture of experts: how many of the layers have a dense MLP instead of experts (DeepSeek's first layers,
    Qwen-MoE's mlp_only_layers, Llama 4's interleaving)."""
    dense_intermediate: int = 0
    """Those layers' MLP width."""

    def layer_kinds(self) -> tuple[tuple[int, ModelShape], ...]:
        """(count, shape) per kind of decoder layer: every per-layer formula below reads a shape whose layers are
        alike, so a mixture of experts with dense layers is counted as two such shapes, each `count` layers deep.
        Only the decoder layers' terms of the parts are meaningful (their other_params are not the model's)."""
        if not self.dense_layers:
            return ((self.layers, self),)
        dense = replace(self, layers=self.dense_layers, experts=1, experts_per_token=1,
                        intermediate=self.dense_intermediate, shared_expert_intermediate=0, dense_layers=0,
                        dense_intermediate=0, lora_params_per_rank=0, outside_adapters_per_rank=0)
        dense_adapters = dense.layers * sum(fan_in + fan_out for _, fan_in, fan_out in dense.layer_linears())
        # peft's meta-device count covers the whole model: the experts' layers get what the dense layers leave
        routed_adapters = max(0, self.lora_params_per_rank - dense_adapters) if self.lora_params_per_rank else 0
        routed = replace(self, layers=self.layers - self.dense_layers, dense_layers=0, dense_intermediate=0,
                         lora_params_per_rank=routed_adapters, outside_adapters_per_rank=0)
        return tuple((kind.layers, kind) for kind in (routed, dense) if kind.layers > 0)

    @property
    def decoder_linear_params(self) -> int:
        """Weights and biases of every decoder layer's linears (and fused experts)."""
        return sum(count * kind.layer_linear_params for count, kind in self.layer_kinds())

    def layer_linears(self) -> tuple[tuple[str, int, int], ...]:
        """(name, in_features, out_features) of every linear layer in one decoder layer: what "all-linear" LoRA targets."""
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        if self.fused_qkv:  # Phi-3's names and shapes
            return (("qkv_proj", self.hidden, q_out + 2 * kv_out), ("o_proj", q_out, self.hidden),
                    ("gate_up_proj", self.hidden, 2 * self.intermediate), ("down_proj", self.intermediate, self.hidden))
        attention = self.attention_linears()
        if self.gated_mlp:
            mlp = (
                ("gate_proj", self.hidden, self.intermediate),
                ("up_proj", self.hidden, self.intermediate),
                ("down_proj", self.intermediate, self.hidden),
            )
        else:
            mlp = (("up_proj", self.hidden, self.intermediate), ("down_proj", self.intermediate, self.hidden))
        if self.experts <= 1:
            return attention + mlp
        return attention + mlp * self.experts + self._moe_linears()

    def attention_linears(self) -> tuple[tuple[str, int, int], ...]:
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        if self.latent_attention:
            q_lora, kv_lora, nope, rope, v_dim = self.latent_attention
            qk_out = self.heads * (nope + rope)
            query = ((("q_a_proj", self.hidden, q_lora), ("q_b_proj", q_lora, qk_out)) if q_lora
                     else (("q_proj", self.hidden, qk_out),))
            return query + (("kv_a_proj_with_mqa", self.hidden, kv_lora + rope),
                            ("kv_b_proj", kv_lora, self.heads * (nope + v_dim)), ("o_proj", self.heads * v_dim, self.hidden))
        return (("q_proj", self.hidden, q_out), ("k_proj", self.hidden, kv_out), ("v_proj", self.hidden, kv_out),
                ("o_proj", q_out, self.hidden))

    def _moe_linears(self) -> tuple[tuple[str, int, int], ...]:
        """A mixture of experts' linears outside the experts: the router and a shared expert."""
        shared: tuple[tuple[str, int, int], ...] = ()
        if self.shared_expert_intermediate:
            width = self.shared_expert_intermediate
            shared = (("gate_proj", self.hidden, width), ("up_proj", self.hidden, width),
                      ("down_proj", width, self.hidden))
            if self.architecture == "qwen2_moe":  # a sigmoid gate on the shared expert's output
                shared += (("shared_expert_gate", self.hidden, 1),)
        return (("gate", self.hidden, self.experts),) + shared

    def adapted_names(self, targets: str = "all-linear") -> frozenset[str]:
        """The module names LoRA adapts in a layer: `targets` is "all-linear" or names joined by commas (peft matches a
        name against a module's last part, and maps a mixture of experts' gate_proj/up_proj/down_proj onto its fused
        experts). A name this shape does not model (another architecture's, lm_head) counts as all-linear: the
        prediction errs high, never low."""
        every = frozenset(name for name, _, _ in self.layer_linears() if self.router_linear or name != "gate")
        aliases = _MLP_NAME_ALIASES.get(self.architecture, {})
        names = frozenset(aliases.get(name.strip(), name.strip()) for name in targets.split(",") if name.strip())
        return names if names and names <= every else every

    def experts_adapted(self, targets: str = "all-linear") -> frozenset[str]:
        """Which of the fused experts' matrices (gate_proj, up_proj, down_proj) a mixture of experts adapts: none where
        peft's count put no adapters on them (Llama 4's experts)."""
        if self.experts <= 1 or (self.lora_params_per_rank and not _expert_adapters_per_rank(self)):
            return frozenset()
        return self.adapted_names(targets) & {"gate_proj", "up_proj", "down_proj"}

    def adapted_linears(self, targets: str = "all-linear") -> tuple[tuple[str, int, int], ...]:
        """The layer's nn.Linear modules LoRA adapts (adapted_names); a mixture of experts' fused experts are not
        among them (experts_adapted)."""
        names = self.adapted_names(targets)
        if self.experts <= 1:
            return tuple(linear for linear in self.layer_linears() if linear[0] in names)
        return tuple(linear for linear in self.attention_linears() + self._moe_linears() if linear[0] in names)

    @property
    def expert_params_per_layer(self) -> int:
        """A mixture of experts' fused expert weights in one layer (gate, up and down of every expert); 0 if dense."""
        return (3 if self.gated_mlp else 2) * self.experts * self.intermediate * self.hidden if self.experts > 1 else 0

    @property
    def layer_linear_params(self) -> int:
        weights = sum(fan_in * fan_out for _, fan_in, fan_out in self.layer_linears())
        if self.linear_bias:
            bias = sum(fan_out for _, _, fan_out in self.layer_linears())
        else:
            bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.attention_bias else 0
        return weights + bias

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def other_params(self) -> int:
        """Parameters outside the decoder layers' linears: embeddings, output head, norms, a vision tower."""
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        norms = (self.norms_per_layer * self.layers + 1) * self.hidden * (2 if self.layer_norm else 1)
        if self.latent_attention:  # the norms of the compressed query and key/value
            norms += self.layers * (self.latent_attention[0] + self.latent_attention[1])
        if self.qk_norm:  # per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2)
            per_head = self.architecture != "olmo2" and self.architecture != "olmo3"
            norms += self.layers * (2 * self.head_dim if per_head else (self.heads + self.kv_heads) * self.head_dim)
        return self.embedding_params + head + norms + self.outside_params


def count_params(shape: ModelShape) -> int:
    return shape.decoder_linear_params + shape.other_params


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def shipped_quantization(config) -> str:
    """The quantisation a checkpoint ships with ("mxfp4", "fp8", ...), "" for none."""
    quantization = getattr(config, "quantization_config", None) or {}
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", "")
    return str(getattr(method, "value", method) or "")


def _dense_layer_count(config, layers: int) -> int:
    """How many layers of a mixture of experts have a dense MLP, by the rule transformers builds them with: a list of
    layer types, Llama 4's list of expert layers, DeepSeek's, GLM's and LFM2's first k layers, ERNIE 4.5's start and
    interval, or Qwen-MoE's mlp_only_layers and decoder_sparse_step."""
    types = getattr(config, "mlp_layer_types", None)
    if types:
        return sum(1 for kind in types[:layers] if kind == "dense")
    moe_layers = getattr(config, "moe_layers", None)
    if isinstance(moe_layers, (list, tuple)):
        return layers - len({index for index in moe_layers if 0 <= index < layers})
    first_dense = _config_value(config, "first_k_dense_replace", "num_dense_layers")  # DeepSeek, GLM; LFM2
    if first_dense is not None:
        return min(layers, max(0, int(first_dense)))
    start = getattr(config, "moe_layer_start_index", None)
    if start is not None:  # ERNIE 4.5: every interval-th layer from start to end has experts
        end = getattr(config, "moe_layer_end_index", None)
        end = layers - 1 if end is None or end < 0 else end
        interval = int(getattr(config, "moe_layer_interval", None) or 1)
        return sum(1 for index in range(layers) if not ((index + 1) % interval == 0 and start <= index <= end))
    dense_only = set(getattr(config, "mlp_only_layers", None) or ())
    step = int(getattr(config, "decoder_sparse_step", None) or 1)
    return sum(1 for index in range(layers) if index in dense_only or (index + 1) % step != 0)


def shape_from_hf_config(config, name: str = "") -> ModelShape:
    """A ModelShape from a transformers PretrainedConfig; unknown architectures are estimated (known=False), never an error."""
    shipped = shipped_quantization(config)
    text_config = getattr(config, "text_config", None)
    if text_config is not None and getattr(text_config, "hidden_size", None):
        config = text_config
    architecture = str(getattr(config, "model_type", "") or "unknown")
    hidden = int(_config_value(config, "hidden_size", "n_embd", "d_model", default=0) or 0)
    heads = int(_config_value(config, "num_attention_heads", "n_head", "num_heads", default=0) or 0)
    if hidden <= 0 or heads <= 0:
        raise ValueError(f"cannot read hidden size and attention heads from the {architecture} config")
    layers = int(_config_value(config, "num_hidden_layers", "n_layer", "num_layers", default=1))
    kv_heads = int(_config_value(config, "num_key_value_heads", "n_head_kv", "num_kv_heads", default=heads))
    head_dim = int(_config_value(config, "head_dim", default=0) or hidden // heads)
    intermediate = int(
        _config_value(config, "moe_intermediate_size", "intermediate_size", "n_inner", "ffn_dim", default=0) or 4 * hidden
    )
    vocab = int(_config_value(config, "vocab_size", default=32000))
    max_positions = int(
        _config_value(config, "max_position_embeddings", "n_positions", "seq_length", "max_seq_len", default=4096)
    )
    experts = int(_config_value(config, "num_local_experts", "num_experts", "n_routed_experts", default=1) or 1)
    experts_per_token = int(_config_value(config, "num_experts_per_tok", "moe_topk", default=1) or 1)
    shared_width = int(_config_value(config, "shared_expert_intermediate_size", default=0) or 0)
    if not shared_width and experts > 1:
        shared_width = int(_config_value(config, "n_shared_experts", default=0) or 0) * intermediate
    if not shared_width and experts > 1 and architecture == "llama4_text":
        shared_width = intermediate  # Llama 4's shared expert is as wide as an expert; its config does not say so
    dense_layers = _dense_layer_count(config, layers) if experts > 1 else 0
    tied = bool(getattr(config, "tie_word_embeddings", False))
    latent = ()
    if _config_value(config, "kv_lora_rank", default=None):
        latent = (int(_config_value(config, "q_lora_rank", default=0) or 0), int(config.kv_lora_rank),
                  int(config.qk_nope_head_dim), int(config.qk_rope_head_dim), int(config.v_head_dim))
    shape = ModelShape(
        name=name or str(getattr(config, "_name_or_path", "") or architecture),
        architecture=architecture,
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        tied_embeddings=tied,
        max_position_embeddings=max_positions,
        total_params=0,
        known=architecture in KNOWN_ARCHITECTURES and experts <= 1,
        attention_bias=bool(getattr(config, "attention_bias", False)) or architecture in _BIAS_QKV_ARCHITECTURES,
        gated_mlp=architecture not in _UNGATED_MLP_ARCHITECTURES,
        experts=experts,
        experts_per_token=min(experts_per_token, experts),
        plain_logits=uses_plain_logits(config),
        rotary=architecture not in LEARNED_POSITION_ARCHITECTURES,
        shared_expert_intermediate=shared_width if experts > 1 else 0,
        qk_norm=architecture in QK_NORM_ARCHITECTURES,
        norms_per_layer=4 if architecture in FOUR_NORM_ARCHITECTURES else 2,
        layer_norm=architecture in LAYER_NORM_ARCHITECTURES,
        attention_sinks=architecture in ATTENTION_SINK_ARCHITECTURES,
        clamped_glu=architecture in CLAMPED_GLU_ARCHITECTURES,
        router_linear=architecture not in ROUTER_NOT_LINEAR_ARCHITECTURES,
        linear_bias=bool(getattr(config, "use_bias", False)) and architecture in ALL_BIAS_ARCHITECTURES,
        fused_qkv=architecture in FUSED_QKV_ARCHITECTURES,
        latent_attention=latent,
        sdpa=supports_sdpa(config),
        attention_softcap=bool(getattr(config, "attn_logit_softcapping", None)),
        dense_layers=dense_layers,
        shipped_quantization=shipped,
        dense_intermediate=int(_config_value(config, "intermediate_size_mlp", "prefix_dense_intermediate_size",
                                             "intermediate_size", default=0) or 0)
        if dense_layers else 0,
    )
    return replace(shape, total_params=count_params(shape))


@dataclass(frozen=True)
class TrainingSetup:
    """What the engine does in a run; elite_core.training reads it, so every field here must be something it acts on."""

    device: str
    """"cuda" or "cpu"."""
    seq_tokens: int
    """Whole window: context + target."""
    target_tokens: int
    """Tokens at the end of each window that carry the loss."""
    micro_batch: int = 1
    lora_rank: int = 16
    lora_targets: str = "all-linear"
    extra_trainable: tuple[str, ...] = ()
    weight_dtype: str = "bf16"
    """bf16, fp16, fp32, nf4 (QLoRA) or int8."""
    compute_dtype: str = "bf16"
    checkpointing: str = "on"
    """off, on (non-reentrant recompute) or offload (layer inputs kept in CPU RAM)."""
    adamw_8bit: bool = False
    loss: str = "chunked"
    """chunked: the engine's cross-entropy over target rows a chunk at a time; full: the model's own loss (fp32 logits)."""
    attention: str = "sdpa"
    tiled_mlp: bool = False
    compiled: bool = False
    """Decoder layers run through torch.compile: fused kernels keep fewer intermediate tensors for backward."""
    deepspeed: str = "off"
    lora_dropout: float = 0.0
    gpus: int = 1
    nodes: int = 1
    """Machines the gpus span: the host RAM of one holds processes_per_node processes' offloaded state."""
    loss_chunk_tokens: int = 1024
    """elite_core.training.LOSS_CHUNK_TOKENS."""
    gpu_checkpoint_layers: int = 0
    """With offload: how many layers' checkpoints stay on the GPU because the host's RAM cannot take them all."""
    rope_scaling_factor: float = 1.0
    """Above 1 when the window exceeds the model's native context (linear RoPE scaling)."""

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_tokens

    @property
    def processes_per_node(self) -> int:
        """The processes sharing one host's RAM."""
        return max(1, self.gpus // max(1, self.nodes))

    @property
    def autocast(self) -> bool:
        """The engine runs forward under torch.autocast whenever it computes in 16 bits: on CUDA in bf16 or fp16, on
        a CPU in bf16 (asked for: a CPU's default is fp32), which gives a CPU run a GPU run's dtypes, so the suite
        covers them (bf16 weights, fp32 adapters sharing their module's input)."""
        return self.compute_dtype == "bf16" or (self.compute_dtype == "fp16" and self.device == "cuda")


@dataclass(frozen=True)
class MemoryBreakdown:
    weights_bytes: int
    lora_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    logits_bytes: int
    overhead_bytes: int
    cpu_offload_bytes: int
    """Bytes moved to the host's RAM by all of the node's processes together (offloaded checkpoints, ZeRO's optimizer
    state and offloaded weights), since they share it; not part of total_bytes, which is per device."""

    @property
    def total_bytes(self) -> int:
        """Peak on the training device (the GPU, or RAM when training on the CPU)."""
        return (
            self.weights_bytes
            + self.lora_bytes
            + self.gradients_bytes
            + self.optimizer_bytes
            + self.activations_bytes
            + self.logits_bytes
            + self.overhead_bytes
        )

    def components(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights_bytes),
            ("lora", self.lora_bytes),
            ("gradients", self.gradients_bytes),
            ("optimizer", self.optimizer_bytes),
            ("activations", self.activations_bytes),
            ("logits", self.logits_bytes),
            ("overhead", self.overhead_bytes),
        ]


@dataclass(frozen=True)
class MemoryConstants:
    """The few numbers the formulas cannot derive; defaults calibrated on an H100 (bench/results/memory-h100.jsonl)."""

    cuda_fixed_bytes: int = 785 * MIB
    """Outside torch's allocator: CUDA context, cuBLAS handles and workspaces (H100: 764-786 MiB measured)."""
    cuda_allocator_floor_bytes: int = 165 * MIB
    """Reserved over allocated that even a small run shows (small-block pools, segment rounding)."""
    cuda_allocator_floor_fraction: float = 0.25
    """A run that allocates little reserves less: its floor is this share of the modelled allocation where that is
    smaller (under 660 MiB allocated). Fitted on the demo model on an H200 (0.22-0.43 GiB modelled, expandable
    segments; 3 tiers through `elite-tui run`, 6 bench steps eager and compiled), where the fixed floor predicted its
    tiers 9-10 % high: now 8 of 9 points within 5 %, the worst +5.0 % (bench/results/demo-memory-floor-h200.txt)."""
    cpu_fixed_bytes: int = 418 * MIB
    """Resident set of the training child when its first step starts: torch, transformers, peft and the engine
    imported, the model loaded (418 MiB measured with torch 2.13, transformers 5.25; 338 MiB with earlier releases)."""
    allocator_margin: float = 1.1
    """On CPU: the step's peak resident memory over the live tensors, per byte of them: backward buffers of the CPU
    kernels and freed blocks the C allocator keeps. Against each step's peak (VmHWM), the demo at tiers 1-3 peaked at
    2.02, 1.97 and 2.11x the modelled tensors over the child's resident set (1.4 was fitted against the resident set
    at the step's end, with 350 MiB fixed)."""
    cuda_margin_of_loss: float = 0.33
    """Reserved over allocated on CUDA (expandable segments), per byte of the loss chunk's peak: its large blocks,
    freed before each layer's backward, leave holes that smaller blocks cannot fill. Set to cover the worst of 150
    H100 points (0.16 was the median fit; the tiled MLP's points and rank-32 QLoRA points needed 0.28-0.36)."""
    cuda_margin_of_activations: float = 0.0
    """The same per byte of activations (H100 fit with the lean layers: 0.0; 0.031 before them)."""
    cuda_offload_slack_layer_inputs: float = 2.5
    """Reserved over allocated with offloaded checkpoints, in layer inputs (micro-batch x window x hidden): the inputs
    copied back from the host for each layer's recompute leave holes of their size. Fitted on one long offload point
    (H100, QLoRA Llama-3.1-8B at 409,600 tokens: 7.8 GiB reserved over allocated = 2.5 layer inputs); held out:
    bf16 Llama-3.1-8B tier 7 at 301,056 tokens, -2.0 % (bench/results/memory-h100-long)."""
    deepspeed_runtime_bytes: int = 400 * MIB
    """DeepSpeed ZeRO's GPU buffers beyond the modelled partitions and buckets (H100, one GPU, 8 points of ZeRO-2 with
    and without offload at 4K/16K: measured 0.13-0.40 GiB over the partitions at 4K; bench/results/memory-h100-zero)."""
    zero3_offload_margin: float = 0.12
    """ZeRO-3 with parameter offload, per byte of the modelled allocation: not a fit but a safety margin. Its
    prediction missed by -7.9 .. +11 % on an H100 (3 points; bench/results/memory-h100-zero), so a tier marked as
    fitting must not rest on it."""
    zero3_margin: float = 0.05
    """ZeRO-3 without offload, the same kind of margin: on one H100 it measured 0.07-0.70 GiB over ZeRO-2's modelled
    partitions (its gather buffers; 3 points, -4.8 % at worst without a margin), too few and too scattered to fit."""
    tiled_mlp_transient_hidden: float = 2.5
    """Tiled MLP: the tiles' outputs and their concatenation, bytes per token per hidden unit per byte of compute dtype
    (H100, 5 points: 1.5-2.4)."""
    backward_transient_intermediate: float = 1.5
    """Gradient buffers alive at a layer's backward peak, in bytes per token per intermediate unit, per byte of compute
    dtype (H100 fit over the 54-point matrix with the lean layers; 3.0 before them, when the norms' fp32 gradients
    were part of it)."""
    backward_transient_hidden: float = 2.0
    """The same, per hidden unit (grad of the residual stream, the layer input's gradient being summed; 4.0 before)."""
    fp32_norm_backward_hidden: float = 4.0
    """With transformers' own RMSNorm on a 16-bit model: fp32 buffers in a layer's backward, per token per hidden unit,
    in units of 4 bytes (H100, compiled layers with checkpointing at 4K-16K: 2.1-3.5)."""
    dropout_backward_intermediate: float = 0.0
    """Extra backward buffers with LoRA dropout, bytes per token per intermediate unit. 2.1-3.0 on an H100 while peft
    cast each adapter input to fp32; with the inputs shared under autocast the matrix fit gives 0."""
    loss_bytes_per_logit: float = 12.0
    """Backward of one fp32 cross-entropy chunk: saved log-softmax output, its gradient, the input gradient (4 B each)."""
    full_loss_bytes_per_logit: float = 12.0
    """The model's own loss: bf16 logits upcast to fp32, cross-entropy and gradients over every position (12-14 B)."""


DEFAULT_CONSTANTS = MemoryConstants()


def _compute_bytes(setup: TrainingSetup) -> float:
    if setup.device == "cpu":
        return DTYPE_BYTES["fp32"] if setup.compute_dtype != "bf16" else 2.0
    return DTYPE_BYTES.get(setup.compute_dtype, 2.0)


def lora_param_count(shape: ModelShape, rank: int, targets: str = "all-linear") -> int:
    if shape.dense_layers:
        decoder = sum(lora_param_count(kind, rank, targets) for _, kind in shape.layer_kinds())
        return decoder + rank * shape.outside_adapters_per_rank
    per_layer = sum(fan_in + fan_out for _, fan_in, fan_out in shape.adapted_linears(targets))
    experts = shape.experts_adapted(targets)
    if experts:
        # What peft counted on the experts, split between down and gate/up as peft 0.22 shapes them
        everything = _expert_adapters_per_rank(shape) / shape.layers
        down = everything * shape.experts * (shape.intermediate + shape.hidden) / (
            _expert_adapters_per_rank(shape, counted=False) / shape.layers)
        per_layer += (down if "down_proj" in experts else 0) + (
            everything - down if experts & {"gate_proj", "up_proj"} else 0)
    return int(rank * (shape.layers * per_layer + shape.outside_adapters_per_rank))


def _expert_adapters_per_rank(shape: ModelShape, counted: bool = True) -> float:
    """A mixture of experts' fused-expert adapter parameters per unit of rank, for layers alike (a layer kind): what
    peft counted (all-linear, on a meta device) less the linears' share, else (or counted=False) peft 0.22's layout."""
    if counted and shape.lora_params_per_rank:
        linears = sum(fan_in + fan_out for _, fan_in, fan_out in shape.adapted_linears("all-linear"))
        return max(0, shape.lora_params_per_rank - shape.layers * linears)
    # peft 0.22: gate_up's lora_A is (2 x rank x experts, hidden), its lora_B (2 x intermediate, 2 x rank x experts)
    width = shape.hidden + shape.intermediate
    gate_up = 2 * shape.experts * (shape.hidden + 2 * shape.intermediate) if shape.gated_mlp else shape.experts * width
    return shape.layers * (gate_up + shape.experts * width)


def extra_trainable_param_count(shape: ModelShape, modules: tuple[str, ...]) -> int:
    """Modules trained in full (peft modules_to_save); peft keeps the original and trains a copy."""
    count = 0
    for module in modules:
        if module in ("embed_tokens", "wte", "word_embeddings"):
            count += shape.embedding_params
        elif module in ("lm_head", "output"):
            count += shape.vocab * shape.hidden
        elif "norm" in module:
            count += (2 * shape.layers + 1) * shape.hidden
    return count


def weight_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    linear = shape.decoder_linear_params
    if setup.weight_dtype in ("nf4", "int8"):
        # Embeddings, output head and norms stay in the compute dtype; only decoder linears are quantised. A mixture
        # of experts' fused expert weights are not nn.Linear modules, which bitsandbytes replaces: counted unquantised.
        experts = sum(count * kind.expert_params_per_layer for count, kind in shape.layer_kinds())
        return int((linear - experts) * DTYPE_BYTES[setup.weight_dtype] + (shape.other_params + experts) * _compute_bytes(setup))
    return int((linear + shape.other_params) * DTYPE_BYTES.get(setup.weight_dtype, 2.0))


ZERO_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's reduce bucket (elite_core.distributed.deepspeed_config), in elements of the trainable parameters."""

COMPILED_MAX_WINDOW_TOKENS = 16384 + 2048
"""The longest window the planner compiles (tier 3's), and the range COMPILED_ACTIVATION_SHARE was fitted on: at tiers
4-5 with checkpointing compiled layers kept more (bench/results/memory-h100-validation.txt), so longer windows run the
lean eager layers. A window's tokens, not the micro-batch's: the choice must not change with the micro-batch, or the
pre-flight probe (its layers built at the planned micro-batch) confirms other layers than the run then trains. It did:
an H200 run at tier 3 probed micro-batch 2 compiled (80.0 GiB, 41.7K tokens/s) and trained it eager (94.3 GiB, 32.5K
tokens/s; bench/results/gpu-smoke-h200)."""
COMPILED_ACTIVATION_SHARE = 0.68
"""Share of a decoder layer's saved activations left when the layer is compiled, applied to the count without the lean
layers. The share that makes each compiled point of bench/results/memory-h100-options and -validation exact, up to
COMPILED_MAX_WINDOW_TOKENS: 0.63-0.69 (12 points, median 0.66); 0.68 keeps them at -1.6 to +2.2 %, on the over side.
On the planner's compiled tiers of Llama-3.2-3B and Qwen2.5-Coder-14B on an H200 (memory-h200-planned; seen before
0.68 was chosen): +0.4 to +3.1 % (with 0.72 before: +2.4 to +8.2 %)."""
COMPILED_ACTIVATION_SHARE_LONG = 0.77
"""Longer compiled windows (compile_layers "on" only; the planner does not compile them) keep more: 0.74 and 0.76 at
36K and 65K with checkpointing (memory-h100-validation), where 0.68 would under-predict by 4-7 %."""


def layer_input_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """One decoder layer's input for a micro-batch: what checkpointing keeps (or offloads) per layer."""
    return _compute_bytes(setup) * shape.hidden * setup.tokens


def norm_saved_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """Bytes an RMSNorm keeps per hidden unit: the engine's lean norm keeps its 16-bit input, transformers' own keeps
    the fp32 upcast (the input itself on an fp32 model)."""
    if not setup.compiled and shape.architecture in LEAN_NORM_MODEL_TYPES:
        return _compute_bytes(setup)
    if shape.layer_norm and setup.device == "cpu":  # CPU autocast runs layer_norm in bf16; CUDA's in fp32
        return _compute_bytes(setup)
    return 4.0


def layer_activation_bytes_per_token(shape: ModelShape, setup: TrainingSetup, mlp_shards: int = 1) -> float:
    """Bytes autograd keeps for one decoder layer and one token, without checkpointing.

    The engine's lean layers (elite_core.lean_layers) keep each RMSNorm's 16-bit input instead of its fp32 upcast and,
    under autocast, let the adapters share their module's input. Compiled layers keep transformers' own layers (the
    compiler fuses them) and scale the eager count by COMPILED_ACTIVATION_SHARE (_LONG beyond the measured windows).
    """
    e = _compute_bytes(setup)
    h, d = shape.hidden, shape.head_dim
    q_width = shape.heads * d
    kv_width = shape.kv_heads * d
    intermediate = shape.intermediate * max(1, shape.experts_per_token)
    rank = setup.lora_rank
    lean = not setup.compiled
    # Without autocast, peft casts 16-bit inputs to the fp32 adapters: every targeted module keeps its own copy.
    # Under autocast the engine shares them (lean). Compiled layers are counted as transformers + peft would keep them
    # (copies included), the count COMPILED_ACTIVATION_SHARE was fitted against.
    separate_copies = e < 4.0 and not (lean and setup.autocast)
    copy_bytes = e if setup.autocast else 4.0
    dropout = setup.lora_dropout > 0.0

    # the layer input and the attention residual sum, normed (Gemma 2/3 also norm each block's output)
    norms = shape.norms_per_layer * norm_saved_bytes(shape, setup) * h
    if shape.qk_norm:  # each keeps its input, and its fp32 reciprocal RMS per head
        norms += norm_saved_bytes(shape, setup) * (q_width + kv_width) + 4.0 * (shape.heads + shape.kv_heads)

    # A frozen linear keeps nothing for backward (its input gradient needs only the weight): only adapted ones do.
    adapted = {name for name, _, _ in shape.adapted_linears(setup.lora_targets)}
    input_width = {"q_proj": h, "k_proj": h, "v_proj": h, "qkv_proj": h, "o_proj": q_width, "gate_proj": h,
                   "up_proj": h, "gate_up_proj": h, "down_proj": intermediate}
    attention_inputs = sum(input_width[name] for name in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
                           if name in adapted)
    mlp_inputs = sum(input_width[name] for name in ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
                     if name in adapted)
    if separate_copies:
        per_input = copy_bytes + (1.0 if dropout else 0.0)
        attention_lora = per_input * attention_inputs
        mlp_lora = per_input * mlp_inputs
    elif dropout:
        # Dropout makes a new tensor and a mask for each module's input; the CPU kernel's mask has the input's dtype.
        mask_bytes = e if setup.device == "cpu" else 1.0
        attention_lora = (e + mask_bytes) * attention_inputs
        mlp_lora = (e + mask_bytes) * mlp_inputs
    else:
        # Shared inputs: q/k/v share the normed input and gate/up theirs; o reads the attention output SDPA keeps
        # anyway (counted below); down reads the SwiGLU product, which nothing else keeps.
        attention_lora = e * h if adapted & {"q_proj", "k_proj", "v_proj", "qkv_proj"} else 0.0
        mlp_lora = (e * h if adapted & {"gate_proj", "up_proj", "gate_up_proj"} else 0.0) + (
            e * intermediate if "down_proj" in adapted else 0.0)
    # lora_B keeps lora_A's r-wide output, one per adapted module.
    adapters = len(shape.adapted_linears(setup.lora_targets))
    experts = shape.experts_adapted(setup.lora_targets)
    if experts:  # the fused experts: one adapter for gate and up, one for down, per routed token
        adapters += shape.experts_per_token * (bool(experts & {"gate_proj", "up_proj"}) + ("down_proj" in experts))
    lora_b_inputs = adapters * rank * copy_bytes

    if shape.latent_attention:
        attention_core = latent_attention_bytes_per_token(shape, setup)
    elif setup.attention == "eager":
        # Keys and values repeated to every query head, the output, and every score (scores_kept_per_token)
        attention_core = e * 3 * q_width + scores_kept_per_token(shape, setup) + e * q_width
        if shape.attention_sinks:
            attention_core += 8.0 * shape.heads  # an int64 index per head
    else:
        # SDPA / flash keep q, k, v, the output and an fp32 log-sum-exp; grouped-query k/v stay at kv width.
        attention_core = e * (2 * q_width + 2 * kv_width) + 4.0 * shape.heads
    if shape.fused_qkv:
        # q and k are views of the fused output, whose storage v keeps alive for attention; and the attention output
        # (from those strided views) reaches o_proj as a copy (read off autograd on CPU)
        attention_core += e * (2 * q_width + kv_width)

    if shape.gated_mlp:
        mlp_core = 3 * e * intermediate  # SiLU keeps the gate output; the product keeps SiLU's output and up's
    else:
        mlp_core = e * intermediate
    mlp = (mlp_core + mlp_lora) / max(1, mlp_shards)
    if shape.experts > 1:
        mlp = moe_mlp_bytes_per_token(shape, setup) / max(1, mlp_shards)
    total = norms + attention_lora + lora_b_inputs + attention_core + mlp
    if not setup.compiled:
        return total
    long_window = setup.seq_tokens > COMPILED_MAX_WINDOW_TOKENS
    return total * (COMPILED_ACTIVATION_SHARE_LONG if long_window else COMPILED_ACTIVATION_SHARE)


def scores_kept_per_token(shape: ModelShape, setup: TrainingSetup) -> float:
    """What a layer keeps of its attention scores, per token: s a head where they are materialised (eager attention,
    and latent attention as it is counted), as the fp32 softmax output and its 16-bit copy for the matmul with v (none
    in fp32), with soft-capping also the capped scores (tanh keeps its output); gpt-oss's softmax (over the scores
    and its sink) in their own dtype, kept alone. 0 for SDPA and flash attention, which keep none."""
    if setup.attention != "eager" and not shape.latent_attention:
        return 0.0
    e = _compute_bytes(setup)
    if shape.attention_sinks:
        return e * shape.heads * (setup.seq_tokens + 1)
    per_score = 4.0 + (e if e < 4.0 else 0.0) + (e if shape.attention_softcap else 0.0)
    return per_score * shape.heads * setup.seq_tokens


def eager_scores_backward_per_token(shape: ModelShape, setup: TrainingSetup) -> float:
    """Eager attention's backward (and latent attention's, counted so) makes two score-sized buffers: the gradient of
    the probabilities (compute dtype) and of the scores under the softmax (fp32). Read off the peak resident set on
    CPU: 8.0-8.5 B a score in fp32, 6.1-6.2 in bf16 (gpt-oss, Gemma 2; 2-4K tokens), where nothing was counted."""
    if setup.attention != "eager" and not shape.latent_attention:
        return 0.0
    # DeepSeek's latent attention is counted as keeping every score (latent_attention_bytes_per_token), and its
    # backward so too, in fp32 whatever the dtype: one layer at 2,048 tokens on CPU took 8.0 B a score in fp32, and
    # in bf16 6.0 B in one run and 8.0 in another (CPU's math path may upcast)
    per_score = 8.0 if shape.latent_attention else _compute_bytes(setup) + 4.0
    return per_score * shape.heads * setup.seq_tokens


def latent_attention_bytes_per_token(shape: ModelShape, setup: TrainingSetup) -> float:
    """DeepSeek's latent attention, counted on the safe side: query and key heads are qk_nope + qk_rope wide and
    values v_head_dim, which SDPA's fused kernels do not all take, so every score is counted as eager attention
    keeps it (the fp32 softmax and its 16-bit copy; on CPU torch's SDPA materialised them); the compressed key/value,
    its norm, and the adapters' inputs of the two-step projections. Read off autograd on CPU, not measured on a GPU."""
    e = _compute_bytes(setup)
    q_lora, kv_lora, nope, rope, v_dim = shape.latent_attention
    qk, v = shape.heads * (nope + rope), shape.heads * v_dim
    heads_kept = e * (3 * qk + 2 * v)  # q, k (before and after the rope join), v and the output
    compressed = e * (kv_lora + rope) + norm_saved_bytes(shape, setup) * (kv_lora + q_lora) + e * (kv_lora + q_lora)
    return heads_kept + scores_kept_per_token(shape, setup) + compressed


def moe_mlp_bytes_per_token(shape: ModelShape, setup: TrainingSetup) -> float:
    """A mixture-of-experts block as transformers' grouped experts and peft keep it: the normed input (for adapters
    of the router or shared expert); per routed token the gate and up halves, SiLU's output and the expert's output
    (weighted by the router after), with adapted experts also the gathered input and the product; the router's fp32
    softmax; the shared expert as a dense MLP. Read off what autograd keeps on CPU (tests/test_memory_model.py)."""
    e = _compute_bytes(setup)
    h, width = shape.hidden, shape.intermediate
    names = shape.adapted_names(setup.lora_targets)
    experts = shape.experts_adapted(setup.lora_targets)
    gate_up_adapted = bool(experts & {"gate_proj", "up_proj"})
    # gate and up (gpt-oss's clamped GLU: the fused gate_up output, the sigmoid, the clamped up, two products)
    glu = 6 if shape.clamped_glu else 3
    routed = glu * width + h + (h if gate_up_adapted else 0) + (width if "down_proj" in experts else 0)
    shared_reads_normed = bool(shape.shared_expert_intermediate and names & {"gate_proj", "up_proj"})
    normed = h if "gate" in names or "shared_expert_gate" in names or shared_reads_normed else 0
    shared = 0.0
    if shape.shared_expert_intermediate:
        # gate and up outputs, SiLU's, the product if down is adapted; Qwen2-MoE's output and sigmoid gate too
        shared = e * (3 + ("down_proj" in names)) * shape.shared_expert_intermediate
        if shape.architecture == "qwen2_moe":
            shared += e * h + e
    return e * normed + shape.experts_per_token * e * routed + 4.0 * shape.experts + shared


def moe_expert_weight_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """peft adapts the fused expert weights by adding the adapters' product to them: each layer's forward makes the
    merged weights (all experts) of each adapted matrix and keeps them for backward, and backward their gradient."""
    experts = shape.experts_adapted(setup.lora_targets)
    matrices = (2 if experts & {"gate_proj", "up_proj"} else 0) + ("down_proj" in experts)
    return matrices * shape.experts * shape.intermediate * shape.hidden * _compute_bytes(setup)


def layer_fixed_activation_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """What one decoder layer keeps for backward whatever the tokens: the merged expert weights of a mixture of experts,
    and under autocast the 16-bit copy of each fp32 adapter weight its matmul made."""
    adapter_copies = 0.0
    if setup.autocast and _compute_bytes(setup) < 4.0:
        adapter_copies = lora_param_count(shape, setup.lora_rank, setup.lora_targets) / shape.layers * _compute_bytes(setup)
    return moe_expert_weight_bytes(shape, setup) + adapter_copies


def decoder_activation_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """What every decoder layer keeps for backward together, without checkpointing (each kind of layer its own)."""
    return sum(count * (layer_activation_bytes_per_token(kind, setup) * setup.tokens + layer_fixed_activation_bytes(kind, setup))
               for count, kind in shape.layer_kinds())


def backward_transient_bytes_per_token(
    shape: ModelShape, setup: TrainingSetup, constants: MemoryConstants, mlp_shards: int = 1
) -> float:
    e = _compute_bytes(setup)
    intermediate = shape.intermediate * max(1, shape.experts_per_token) / max(1, mlp_shards)
    transient = e * (constants.backward_transient_intermediate * intermediate + constants.backward_transient_hidden * shape.hidden)
    if setup.lora_dropout > 0.0:
        transient += constants.dropout_backward_intermediate * intermediate
    if e < 4.0 and norm_saved_bytes(shape, setup) == 4.0:
        # transformers' own norms (compiled layers, other architectures) build fp32 gradients of their upcast input
        transient += constants.fp32_norm_backward_hidden * 4.0 * shape.hidden
    return transient + eager_scores_backward_per_token(shape, setup)


def mlp_shards_for(setup: TrainingSetup, shape: ModelShape) -> int:
    """The tiled MLP splits the sequence into ceil(seq / hidden) shards (Unsloth's rule)."""
    if not setup.tiled_mlp:
        return 1
    return max(1, math.ceil(setup.seq_tokens / shape.hidden))


def loss_bytes(shape: ModelShape, setup: TrainingSetup, constants: MemoryConstants) -> int:
    """Peak of the loss: one checkpointed chunk of target rows (chunked) or every position's fp32 logits (full)."""
    e = _compute_bytes(setup)
    target_rows = setup.micro_batch * setup.target_tokens
    if setup.loss == "full":
        per_logit = constants.full_loss_bytes_per_logit if e < 4.0 else 12.0
        return int(setup.tokens * shape.vocab * per_logit)
    chunk_rows = min(target_rows, setup.loss_chunk_tokens)
    # The gathered target rows stay for backward, and their gradient buffer joins them.
    rows = 2 * e * shape.hidden * target_rows
    return int(chunk_rows * shape.vocab * constants.loss_bytes_per_logit + rows)


def predict_memory(
    shape: ModelShape, setup: TrainingSetup, constants: MemoryConstants = DEFAULT_CONSTANTS
) -> MemoryBreakdown:
    """Peak memory of a training step (steady state: optimizer state allocated, gradients alive during backward)."""
    e = _compute_bytes(setup)
    tokens = setup.tokens
    gpus = max(1, setup.gpus)
    on_the_host = setup.processes_per_node
    on_cpu = setup.device == "cpu"

    weights = weight_bytes(shape, setup)
    cpu_offload = 0.0
    lora_params = lora_param_count(shape, setup.lora_rank, setup.lora_targets)
    extra_params = extra_trainable_param_count(shape, setup.extra_trainable)
    extra_bytes_per_param = 4.0 if on_cpu else e
    adapter_bytes = 4.0  # peft keeps adapters in fp32 (autocast_adapter_dtype)
    lora = lora_params * adapter_bytes + extra_params * extra_bytes_per_param
    gradients = lora_params * adapter_bytes + extra_params * extra_bytes_per_param
    if setup.adamw_8bit:
        optimizer = lora_params * 2.03 + extra_params * 2.03
    else:
        # AdamW keeps two moments in each parameter's dtype.
        optimizer = lora_params * 2 * adapter_bytes + extra_params * 2 * extra_bytes_per_param

    shards = mlp_shards_for(setup, shape)
    # One layer's saved tensors with and without checkpointing, and its backward peak, per kind of layer: the layer
    # peak is the largest kind's, the stored activations without checkpointing the sum of every layer's.
    layer_peaks = []
    for _, kind in shape.layer_kinds():
        layer_tokens = layer_activation_bytes_per_token(kind, setup, shards) * tokens + layer_fixed_activation_bytes(kind, setup)
        if shards > 1:
            layer_tokens += constants.tiled_mlp_transient_hidden * e * shape.hidden * tokens
        backward_transient = backward_transient_bytes_per_token(kind, setup, constants, shards) * tokens
        backward_transient += moe_expert_weight_bytes(kind, setup)  # the merged expert weights' gradient
        layer_peaks.append((layer_tokens, backward_transient))
    layer_input = layer_input_bytes(shape, setup)
    # What the final norm keeps and the embedding output live until the loss is done; offloaded with the checkpoints.
    offloading = setup.checkpointing == "offload" and not on_cpu
    outside_layers = 0.0 if offloading else (norm_saved_bytes(shape, setup) + e) * shape.hidden * tokens
    if setup.checkpointing == "off":
        stored = decoder_activation_bytes(shape, setup)
        layer_peak = max(transient for _, transient in layer_peaks)
    elif setup.checkpointing == "offload" and not on_cpu:
        resident = min(shape.layers, setup.gpu_checkpoint_layers)
        # every process of a node offloads its own checkpoints into that host's RAM
        cpu_offload += (shape.layers - resident) * layer_input * on_the_host
        stored = (2 + resident) * layer_input  # the inputs in flight to and from CPU, and those kept on the GPU
        layer_peak = max(saved + transient for saved, transient in layer_peaks)
    else:
        stored = shape.layers * layer_input
        layer_peak = max(saved + transient for saved, transient in layer_peaks)
    if setup.weight_dtype in ("nf4", "int8"):
        # Each quantised matmul dequantises one weight to the compute dtype for the duration of the op.
        layer_peak += max(fan_in * fan_out for _, kind in shape.layer_kinds()
                          for _, fan_in, fan_out in kind.layer_linears()) * e

    logits = loss_bytes(shape, setup, constants)
    # The loss runs when every layer's saved tensors exist; the layer peak comes after it, so only the larger counts.
    activations = stored + outside_layers + max(0.0, layer_peak - logits)
    # Adapter gradients appear layer by layer in backward while the saved activations go the same way, so at the
    # backward peak (the last layer's) one layer's worth exists; fully trained modules get theirs at the loss.
    # All of them exist at the optimizer step, when the activations are gone: that moment is the peak only for tiny
    # windows. (Counting every gradient at the backward peak over-predicted rank 32 by 1.5-2 %.)
    all_gradients = gradients
    adapter_gradients = all_gradients - extra_params * extra_bytes_per_param
    backward_gradients = adapter_gradients / max(1, shape.layers) + (all_gradients - adapter_gradients)
    optimizer_step_peak = 2.0 * all_gradients  # the gradients, and AdamW's temporaries of their size
    gradients = max(backward_gradients, optimizer_step_peak - activations - logits)

    stage = zero_stage(setup.deepspeed) if not on_cpu else 0
    trainable = lora_params + extra_params
    if stage:
        # DeepSpeed's bf16 mode casts the adapters to 16 bits; fp32 master weights, Adam's moments and fp32 gradients
        # (16 B per trainable parameter) are split over the GPUs, or kept in CPU RAM with offload; the 16-bit
        # gradients pass through two reduce buckets (overlap_comm) sized to hold all of LoRA's.
        sixteen = 2.0
        lora = trainable * sixteen / (gpus if stage == 3 else 1)
        gradients = 2 * min(trainable, ZERO_BUCKET_ELEMENTS) * sixteen + trainable * sixteen / gpus
        optimizer = trainable * (4.0 + 8.0 + 4.0) / gpus
        offload = zero_offload(setup.deepspeed)
        if offload:
            cpu_offload += optimizer * on_the_host  # the partitions of this node's processes
            optimizer = 0.0
        if stage == 3:
            # Frozen weights are split too and gathered about two layers at a time (one prefetched).
            gathered = 2 * max(kind.layer_linear_params for _, kind in shape.layer_kinds()) * DTYPE_BYTES.get(setup.weight_dtype, 2.0) + shape.other_params * e
            sharded = max(0.0, weights - gathered)
            if offload:
                cpu_offload += sharded * on_the_host / gpus
            weights = min(weights, gathered + (0.0 if offload else sharded / gpus))
    elif gpus > 1 and not on_cpu:
        gradients += all_gradients  # DDP's gradient buckets

    allocated = weights + lora + gradients + optimizer + activations + logits
    if on_cpu:
        # Blocks over glibc's mmap threshold (32 MiB at most) go back to the system when freed and leave no slack:
        # attention's score matrices are such blocks (gpt-oss at 4K on CPU: +59 % with the margin on them)
        kept = scores_kept_per_token(shape, setup) * setup.tokens
        in_layer_peak = eager_scores_backward_per_token(shape, setup) * setup.tokens
        stored_scores = shape.layers * kept if setup.checkpointing == "off" else 0.0
        if setup.checkpointing != "off":
            in_layer_peak += kept  # the recomputed layer's
        # only what the total holds: the layer peak counts where it exceeds the loss's
        scores = stored_scores + min(in_layer_peak, max(0.0, layer_peak - logits))
        overhead = constants.cpu_fixed_bytes + constants.allocator_margin * max(0.0, allocated - scores)
    else:
        # The holes the loss chunks leave and those the offloaded inputs leave are reused by one another: the larger counts.
        holes = constants.cuda_margin_of_loss * logits
        if offloading:
            holes = max(holes, constants.cuda_offload_slack_layer_inputs * layer_input)
        floor = min(constants.cuda_allocator_floor_bytes, constants.cuda_allocator_floor_fraction * allocated)
        overhead = (constants.cuda_fixed_bytes + floor + holes
                    + constants.cuda_margin_of_activations * activations)
        if stage:
            overhead += constants.deepspeed_runtime_bytes
        if stage == 3:
            margin = constants.zero3_offload_margin if zero_offload(setup.deepspeed) else constants.zero3_margin
            overhead += margin * allocated
    return MemoryBreakdown(
        weights_bytes=int(weights),
        lora_bytes=int(lora),
        gradients_bytes=int(gradients),
        optimizer_bytes=int(optimizer),
        activations_bytes=int(activations),
        logits_bytes=int(logits),
        overhead_bytes=int(overhead),
        cpu_offload_bytes=int(cpu_offload),
    )


def attention_flops_per_step(shape: ModelShape, setup: TrainingSetup) -> float:
    """Causal attention's FLOPs in one micro-batch step: QK^T and AV over half the square, forward 1x, backward 2x,
    recompute 1x. Kept apart from the rest because attention's kernels run at their own rate (planner)."""
    passes = 3.0 if setup.checkpointing in ("on", "offload") else 2.0
    attention_forward = 2.0 * shape.layers * shape.heads * shape.head_dim * setup.seq_tokens * setup.tokens
    return attention_forward * (passes + 1.0)


def training_flops_per_step(shape: ModelShape, setup: TrainingSetup) -> float:
    """Matmul FLOPs of one micro-batch step: forward 2N per token, input gradients 2N (frozen weights get none),
    2N more when checkpointing recomputes the forward; causal attention and the target rows' output head on top."""
    tokens = setup.tokens
    linear_params = 0
    for count, kind in shape.layer_kinds():
        linear_params += count * sum(fan_in * fan_out for _, fan_in, fan_out in kind.layer_linears())
        if kind.experts > 1:  # a token passes experts_per_token of the experts, and every other linear
            expert_params = count * kind.expert_params_per_layer
            linear_params -= expert_params - expert_params * kind.experts_per_token // kind.experts
    lora_params = lora_param_count(shape, setup.lora_rank, setup.lora_targets)
    passes = 3.0 if setup.checkpointing in ("on", "offload") else 2.0
    linear = 2.0 * (linear_params + lora_params) * tokens * passes + 2.0 * lora_params * tokens
    head_rows = setup.micro_batch * setup.target_tokens if setup.loss == "chunked" else tokens
    head = 2.0 * shape.vocab * shape.hidden * head_rows * (3.0 if setup.loss == "chunked" else 2.0)
    return linear + attention_flops_per_step(shape, setup) + head
