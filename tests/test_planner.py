"""The planner on CPU (a RAM-based table for the demo model), on a fixed H100 profile, and the batch-size finder."""

import dataclasses

import pytest

from elite_core.config import default_config
from elite_core.demo_model import demo_model_config
from elite_core.hardware import fake_profile
from elite_core.memory_model import ModelShape, predict_memory, shape_from_hf_config
from elite_core.planner import (
    CPU_MAX_STEP_S,
    config_for_plan,
    default_learning_rate,
    find_micro_batch,
    grad_accum_for,
    max_micro_batch,
    plan_for_config,
    plan_tiers,
    resolve_precision,
    resolved_grad_accum,
    select_tier,
)
from elite_core.probe import config_with_micro_batch, micro_batch_limit
from elite_core.tiers import TIERS

GIB = 1024**3
LLAMA_8B = ModelShape(name="Llama-3.1-8B", architecture="llama", hidden=4096, intermediate=14336, layers=32, heads=32,
                      kv_heads=8, head_dim=128, vocab=128256, tied_embeddings=False, max_position_embeddings=131072,
                      total_params=8030261248, known=True)


@pytest.fixture(scope="module")
def demo_shape():
    return shape_from_hf_config(demo_model_config(), name="demo")


def test_cpu_table_for_the_demo_model(demo_shape):
    profile = fake_profile("cpu")
    plans = plan_tiers(demo_shape, profile, default_config())
    assert [plan.tier.number for plan in plans] == [tier.number for tier in TIERS]
    for plan in plans:
        assert plan.setup.device == "cpu" and plan.setup.compute_dtype == "fp32"
        assert plan.budget_bytes == profile.ram_available_bytes
        assert plan.headroom_bytes == plan.budget_bytes - plan.breakdown.total_bytes
        assert plan.setup.loss == "chunked" and plan.setup.checkpointing in ("off", "on")
        assert "ckpt-offload" not in plan.options and "qlora" not in plan.options
        assert plan.setup.extra_trainable == ()  # the demo model is pretrained: LoRA alone
    # longer windows cost more time; where RAM runs short the planner turns checkpointing on
    times = [plan.step_time_s for plan in plans]
    assert times == sorted(times)
    assert plans[0].options[0] == "no-ckpt" and plans[-1].options[0] == "ckpt"
    assert all(plan.breakdown.total_bytes <= plan.budget_bytes for plan in plans if plan.fits)
    # the tiny demo fits in RAM at tier 1 with room to spare, but a CPU cannot run its 262K window in a demo
    assert plans[0].fits and plans[0].breakdown.total_bytes < 2 * GIB
    selected = select_tier(plans)
    assert plans[selected - 1].step_time_s <= CPU_MAX_STEP_S
    assert selected < 7


def test_select_tier_is_the_highest_that_fits_and_1_when_none_does():
    profile = fake_profile("h100")
    plans = plan_tiers(LLAMA_8B, profile, default_config(model="meta-llama/Llama-3.1-8B"))
    fitting = [plan.tier.number for plan in plans if plan.fits]
    assert select_tier(plans) == max(fitting)
    tiny = dataclasses.replace(profile, gpus=(dataclasses.replace(profile.gpus[0], usable_bytes=4 * GIB),))
    none_fit = plan_tiers(LLAMA_8B, tiny, default_config(model="x/y"))
    assert not any(plan.fits for plan in none_fit)
    assert select_tier(none_fit) == 1
    assert all(plan.note for plan in none_fit)


def test_planner_trades_speed_for_memory_as_tiers_grow():
    plans = plan_tiers(LLAMA_8B, fake_profile("h100"), default_config(model="x/y"))
    assert plans[0].options[0] == "no-ckpt"  # the fastest setup where it fits
    for plan in plans:
        if plan.fits:
            assert plan.breakdown.total_bytes <= plan.budget_bytes * 0.97
    assert any(plan.setup.checkpointing in ("on", "offload") for plan in plans)
    # windows past the model's 131,072 positions need RoPE scaling, and the table says so
    assert "rope-x4" in plans[6].options and "RoPE" in plans[6].note


def test_plan_for_config_honours_overrides():
    profile = fake_profile("h100")
    config = default_config(model="x/y").with_tier(2)
    auto = plan_for_config(LLAMA_8B, profile, config)
    assert auto.setup.seq_tokens == config.window_tokens and auto.setup.lora_rank == config.lora_rank
    forced = plan_for_config(LLAMA_8B, profile, config.replace(gradient_checkpointing="off", micro_batch=2,
                                                               lora_dropout=0.05, precision="fp16"))
    assert forced.setup.checkpointing == "off" and forced.setup.micro_batch == 2
    assert forced.setup.compute_dtype == "fp16" and forced.setup.lora_dropout == 0.05
    assert forced.breakdown.total_bytes > auto.breakdown.total_bytes
    qlora = plan_for_config(LLAMA_8B, profile, config.replace(qlora=True, adamw_8bit=True))
    assert qlora.setup.weight_dtype == "nf4" and qlora.setup.adamw_8bit
    assert {"qlora", "8bit-adam"} <= set(qlora.options)
    assert qlora.breakdown.weights_bytes < auto.breakdown.weights_bytes / 2


def test_config_for_plan_writes_the_choices_back():
    profile = fake_profile("h100")
    plans = plan_tiers(LLAMA_8B, profile, default_config(model="x/y"))
    plan = plans[4]
    config = config_for_plan(default_config(model="x/y"), plan)
    assert config.tier == plan.tier.number and config.window_tokens == plan.setup.seq_tokens
    assert config.gradient_checkpointing == plan.setup.checkpointing
    again = plan_for_config(LLAMA_8B, profile, config)
    assert again.setup == plan.setup and again.breakdown == plan.breakdown


def test_cpu_plan_for_the_demo_config(demo_shape):
    plan = plan_for_config(demo_shape, fake_profile("cpu"), default_config().replace(gradient_checkpointing="offload"))
    assert plan.setup.checkpointing == "on"  # nothing to offload to when the CPU is the device
    assert plan.fits and plan.setup.device == "cpu"


def test_device_cpu_on_a_gpu_machine_plans_the_cpu_run_it_is(demo_shape):
    # Planned with the GPU, such a run got bf16 layers compiled for CUDA, trained them on the CPU without autocast and
    # failed on its first step (an H200 running the suite's CLI tests, which set device cpu)
    gpu = fake_profile("h100")
    config = default_config().replace(device="cpu")
    on_the_cpu = plan_for_config(demo_shape, gpu, config)
    cpu_only = plan_for_config(demo_shape, dataclasses.replace(gpu, gpus=()), config)
    assert on_the_cpu.setup.device == "cpu" and on_the_cpu.setup.compute_dtype == "fp32"
    assert not on_the_cpu.setup.compiled and not on_the_cpu.setup.autocast
    assert on_the_cpu.budget_bytes == gpu.ram_available_bytes
    assert on_the_cpu == cpu_only
    assert [plan.setup.device for plan in plan_tiers(demo_shape, gpu, config)] == ["cpu"] * len(TIERS)
    assert plan_for_config(demo_shape, gpu, default_config()).setup.device == "cuda"


def test_resolve_precision():
    assert resolve_precision(fake_profile("h100"), "auto") == "bf16"
    assert resolve_precision(fake_profile("cpu"), "auto") == "fp32"
    old_gpu = dataclasses.replace(
        fake_profile("h100"),
        capabilities=tuple(dataclasses.replace(c, available=False) if c.name == "bf16" else c
                           for c in fake_profile("h100").capabilities),
    )
    assert resolve_precision(old_gpu, "auto") == "fp16"
    assert resolve_precision(old_gpu, "bf16") == "fp16"
    assert resolve_precision(fake_profile("h100"), "fp32") == "fp32"


def test_learning_rate_and_accumulation_defaults():
    assert default_learning_rate(16, 4096) == 2e-4
    assert default_learning_rate(64, 4096) < default_learning_rate(16, 4096)
    assert default_learning_rate(8, 262144) <= default_learning_rate(8, 4096)
    assert grad_accum_for(4096, 1) == 8 and grad_accum_for(300000, 1) == 1
    # auto accumulation counts every data-parallel process's micro-batches toward the tokens per update
    one = default_config(model="x/y").with_tier(1)
    assert resolved_grad_accum(one.replace(gpus=2)) == grad_accum_for(one.window_tokens, 2) < resolved_grad_accum(one)


def test_max_micro_batch_matches_the_model():
    setup = plan_tiers(LLAMA_8B, fake_profile("h100"), default_config(model="x/y"))[0].setup
    setup = dataclasses.replace(setup, checkpointing="on")
    budget = 78 * GIB
    best = max_micro_batch(LLAMA_8B, setup, budget)
    assert best >= 1
    assert predict_memory(LLAMA_8B, dataclasses.replace(setup, micro_batch=best)).total_bytes <= budget * 0.97
    assert predict_memory(LLAMA_8B, dataclasses.replace(setup, micro_batch=best + 1)).total_bytes > budget * 0.97


class OutOfMemoryError(RuntimeError):
    """Named like torch's, as the finder recognises it by name."""


class FakeDevice:
    """A device that runs any micro-batch up to `limit` and runs out of memory above it."""

    def __init__(self, limit: int, raise_on_oom: bool = False):
        self.limit = limit
        self.raise_on_oom = raise_on_oom
        self.probes: list[int] = []

    def step(self, batch: int) -> bool:
        self.probes.append(batch)
        if batch > self.limit:
            if self.raise_on_oom:
                raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return False
        return True


@pytest.mark.parametrize("limit,predicted", [(13, 8), (13, 20), (13, 13), (1, 4), (40, 40), (7, 1)])
def test_batch_finder_finds_the_limit_from_either_side(limit, predicted):
    device = FakeDevice(limit, raise_on_oom=True)
    assert find_micro_batch(device.step, predicted) == limit
    assert len(device.probes) <= 6


def test_batch_finder_confirms_an_exact_prediction_in_two_probes():
    device = FakeDevice(13)
    assert find_micro_batch(device.step, 13) == 13
    assert device.probes[:2] == [13, 26]


def test_batch_finder_returns_0_when_nothing_fits_and_stays_within_probes():
    device = FakeDevice(0)
    assert find_micro_batch(device.step, 64, max_probes=6) == 0
    assert len(device.probes) == 6
    far = FakeDevice(1000)
    found = find_micro_batch(far.step, 2, max_probes=4)
    assert found == 16 and len(far.probes) == 4  # bounded: the best confirmed size when probes run out


def test_batch_finder_lets_other_errors_through():
    def broken(batch: int) -> bool:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError):
        find_micro_batch(broken, 4)


def test_offloaded_checkpoints_beyond_the_hosts_ram_stay_on_the_gpu():
    """An 8B model's tier-7 checkpoints (32 x 295K x 4096 x 2 B = 77 GB) do not all fit in 48 GiB of host RAM: the
    planner offloads what 70 % of it holds, keeps the rest on the GPU and counts them there."""
    from elite_core.planner import HOST_OFFLOAD_FRACTION, keep_checkpoints_within_ram

    roomy = fake_profile("h100")
    small_host = dataclasses.replace(roomy, ram_available_bytes=48 * GIB)
    config = default_config(model="x/y").replace(gradient_checkpointing="offload")
    setup = plan_for_config(LLAMA_8B, roomy, config.replace(tier=7, context_tokens=262144, target_tokens=32768)).setup
    assert setup.checkpointing == "offload"
    layer_bytes = setup.tokens * LLAMA_8B.hidden * 2
    assert keep_checkpoints_within_ram(LLAMA_8B, setup, roomy).gpu_checkpoint_layers == 0
    squeezed = keep_checkpoints_within_ram(LLAMA_8B, setup, small_host)
    offloaded = LLAMA_8B.layers - squeezed.gpu_checkpoint_layers
    assert offloaded == int(48 * GIB * HOST_OFFLOAD_FRACTION // layer_bytes) > 0
    before, after = predict_memory(LLAMA_8B, setup), predict_memory(LLAMA_8B, squeezed)
    assert after.cpu_offload_bytes == offloaded * layer_bytes <= 48 * GIB * HOST_OFFLOAD_FRACTION
    assert after.activations_bytes - before.activations_bytes == squeezed.gpu_checkpoint_layers * layer_bytes
    assert after.total_bytes > before.total_bytes
    plan = plan_for_config(LLAMA_8B, small_host, config.replace(tier=7, context_tokens=262144, target_tokens=32768))
    assert plan.setup.gpu_checkpoint_layers == squeezed.gpu_checkpoint_layers
    assert f"{squeezed.gpu_checkpoint_layers}-ckpt-on-gpu" in plan.options


def test_auto_gradient_accumulation_aims_at_32k_tokens_per_update():
    from elite_core.planner import TOKENS_PER_UPDATE, resolved_grad_accum

    config = default_config(model="x/y")
    assert config.grad_accum == 0  # auto outside the demo
    plan = plan_for_config(LLAMA_8B, fake_profile("h100"), config)
    tokens = plan.grad_accum * plan.setup.micro_batch * plan.setup.seq_tokens
    assert plan.grad_accum > 1 and abs(tokens - TOKENS_PER_UPDATE) <= plan.setup.seq_tokens / 2
    assert config_for_plan(config, plan).grad_accum == plan.grad_accum == resolved_grad_accum(config)
    fixed = config.replace(grad_accum=3)
    assert plan_for_config(LLAMA_8B, fake_profile("h100"), fixed).grad_accum == 3 == resolved_grad_accum(fixed)
    assert default_config().grad_accum == 1  # the demo shows 50 single-window steps


def test_flash_attn_only_where_it_beats_sdpa():
    from elite_core.hardware import Capability, fake_profile
    from elite_core.planner import FLASH_ATTENTION, attention_for

    h100 = fake_profile("h100")
    with_flash = tuple(Capability(c.name, True, "installed", c.fallback) if c.name == "flash-attn" else c
                       for c in h100.capabilities)
    assert attention_for(h100) == "sdpa"  # not installed
    assert attention_for(dataclasses.replace(h100, capabilities=with_flash)) == "sdpa"  # Hopper: cuDNN SDPA is faster
    ampere_gpu = dataclasses.replace(h100.gpus[0], architecture="Ampere", compute_capability=(8, 0))
    ampere = dataclasses.replace(h100, gpus=(ampere_gpu,), capabilities=with_flash)
    assert attention_for(ampere) == FLASH_ATTENTION
    assert "flash-attn" in plan_tiers(LLAMA_8B, ampere, default_config(model="x/y"))[0].options
    assert attention_for(fake_profile("cpu")) == "sdpa"


def test_gpt_oss_trains_eager_attention_even_with_flash_attn():
    """gpt-oss adds a sink to each head's scores: no SDPA in transformers, nor flash-attn 2 (its sink-capable kernels
    come from the hub). Eager keeps every score, which its long tiers must show."""
    import transformers

    from elite_core.hardware import Capability, fake_profile
    from elite_core.planner import attention_for

    shape = shape_from_hf_config(transformers.GptOssConfig(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4))
    ampere = fake_profile("h100")
    ampere = dataclasses.replace(
        ampere, gpus=(dataclasses.replace(ampere.gpus[0], architecture="Ampere", compute_capability=(8, 0)),),
        capabilities=tuple(Capability(c.name, True, "installed", c.fallback) if c.name == "flash-attn" else c
                           for c in ampere.capabilities))
    assert shape.attention_sinks and attention_for(ampere, shape) == "eager"
    plans = plan_tiers(shape, fake_profile("h100"), default_config(model="openai/gpt-oss-20b"))
    assert all(plan.setup.attention == "eager" and not plan.setup.compiled for plan in plans)
    assert plans[0].fits and not plans[-1].fits  # 262K windows of eager scores do not fit an H100


def test_layers_unlike_the_measured_ones_are_not_compiled():
    """Compiled layers were measured dense with SDPA (Llama, Qwen2): a mixture of experts' tier 1 runs eager (its
    compiled memory is unknown), the dense model's compiled."""
    moe = dataclasses.replace(LLAMA_8B, architecture="qwen3_moe", experts=128, experts_per_token=8, intermediate=768)
    config = default_config(model="x/y")
    assert plan_tiers(LLAMA_8B, fake_profile("h100"), config)[0].setup.compiled
    assert not plan_tiers(moe, fake_profile("h100"), config)[0].setup.compiled


@pytest.mark.parametrize("tier", [tier.number for tier in TIERS])
def test_a_micro_batch_the_probe_confirms_trains_what_it_probed(tier):
    """The probe builds the layers at the planned micro-batch and steps larger ones; the run then plans again at the one
    it confirmed. Everything but the micro-batch must come out the same (compiled layers did not: an H200 run probed
    micro-batch 2 compiled and trained it eager, 14 GiB more and 22 % slower)."""
    profile = fake_profile("h100")
    config = default_config(model="x/y")
    planned = config_for_plan(config, plan_tiers(LLAMA_8B, profile, config)[tier - 1])
    setup = plan_for_config(LLAMA_8B, profile, planned).setup
    for micro_batch in range(1, micro_batch_limit(planned) + 1):
        again = plan_for_config(LLAMA_8B, profile, config_with_micro_batch(planned, micro_batch)).setup
        assert again == dataclasses.replace(setup, micro_batch=micro_batch), micro_batch


def test_every_gpu_of_a_node_offloads_into_the_one_hosts_ram():
    """8 processes offloading an 8B model's tier-7 checkpoints need 8 times one's host RAM: the planner keeps as many
    layers on the GPUs as the shared RAM cannot take (planned per process, it counted one process's share against
    all the RAM, and the node ran out of it)."""
    from elite_core.planner import HOST_OFFLOAD_FRACTION

    host = dataclasses.replace(fake_profile("h100"), ram_available_bytes=560 * GIB)
    config = default_config(model="x/y").replace(gradient_checkpointing="offload", tier=7, context_tokens=262144,
                                                 target_tokens=32768)
    one, eight = (plan_for_config(LLAMA_8B, host, config.replace(gpus=gpus)) for gpus in (1, 8))
    layer_bytes = one.setup.tokens * LLAMA_8B.hidden * 2
    assert one.setup.checkpointing == eight.setup.checkpointing == "offload"
    assert one.setup.gpu_checkpoint_layers == 0  # 32 layers x 17 GB: one process's fit in 560 GiB
    offloaded = LLAMA_8B.layers - eight.setup.gpu_checkpoint_layers
    assert offloaded == int(560 * GIB * HOST_OFFLOAD_FRACTION // (8 * layer_bytes)) < LLAMA_8B.layers
    assert eight.breakdown.cpu_offload_bytes == 8 * offloaded * layer_bytes <= 560 * GIB * HOST_OFFLOAD_FRACTION
    assert eight.cpu_ram_needed_bytes == eight.breakdown.cpu_offload_bytes
    # 16 processes on 2 such nodes: each host holds its own 8 (planned as 16 on one host, half as many offloaded)
    two_nodes = plan_for_config(LLAMA_8B, host, config.replace(gpus=16, nodes=2))
    assert two_nodes.setup.gpu_checkpoint_layers == eight.setup.gpu_checkpoint_layers
    assert two_nodes.breakdown.cpu_offload_bytes == eight.breakdown.cpu_offload_bytes


def test_cpu_processes_share_the_ram_they_each_hold_a_model_in(demo_shape):
    profile = fake_profile("cpu")
    one, two = (plan_for_config(demo_shape, profile, default_config().replace(gpus=gpus)) for gpus in (1, 2))
    assert one.budget_bytes == profile.ram_available_bytes
    assert two.budget_bytes == profile.ram_available_bytes // 2
    assert two.headroom_bytes == two.budget_bytes - two.breakdown.total_bytes


def test_the_step_time_constants_are_the_fit_of_the_recorded_steps():
    """The table's speed before a probe comes from planner.STEP_TIME: they must be what bench/rate_accuracy.py fits on
    the committed H100 steps (and the per-step fixed cost on the demo's short H200 tiers), so a change to either shows
    here. And the options they price order as measured there: compiled layers faster than eager, nf4 weights slower
    than bf16."""
    from bench import rate_accuracy
    from elite_core.planner import STEP_TIME, estimate_step_time_s

    h100 = rate_accuracy.load_profile(rate_accuracy.RESULTS / "memory-h100-hardware.json")
    paths = sorted(rate_accuracy.RESULTS.glob("memory-h100*.jsonl"))
    steps = rate_accuracy.engine_steps(paths, h100, fit_set=True)
    fitted = rate_accuracy.fit_constants(steps, STEP_TIME.step_fixed_s)
    assert len(steps) == 140
    assert fitted.matmul_efficiency == pytest.approx(STEP_TIME.matmul_efficiency, abs=0.0015)
    assert fitted.layer_pass_s == pytest.approx(STEP_TIME.layer_pass_s, abs=2e-5)
    assert fitted.compiled_factor == pytest.approx(STEP_TIME.compiled_factor, abs=0.005)
    assert fitted.nf4_factor == pytest.approx(STEP_TIME.nf4_factor, abs=0.005)
    h200 = rate_accuracy.load_profile(rate_accuracy.RESULTS / "gpu-smoke-h200" / "profile.json")
    demo = rate_accuracy.run_steps(rate_accuracy.RESULTS / "rate-heldout-h200-demo.jsonl", h200)
    short = [step for step in demo if step.setup.seq_tokens <= rate_accuracy.FIXED_COST_MAX_WINDOW]
    assert len(short) == 3
    assert rate_accuracy.fit_step_fixed_s(short, STEP_TIME) == pytest.approx(STEP_TIME.step_fixed_s, abs=1e-4)

    setup = rate_accuracy.setup_for(rate_accuracy.point_of({"model": "Llama-3.1-8B", "seq": 16384, "rank": 16,
                                                             "checkpointing": "on"}))
    eager = estimate_step_time_s(LLAMA_8B, setup, h100) - STEP_TIME.step_fixed_s
    assert estimate_step_time_s(LLAMA_8B, dataclasses.replace(setup, compiled=True), h100) == pytest.approx(
        eager * STEP_TIME.compiled_factor + STEP_TIME.step_fixed_s)
    assert estimate_step_time_s(LLAMA_8B, dataclasses.replace(setup, weight_dtype="nf4"), h100) == pytest.approx(
        eager * STEP_TIME.nf4_factor + STEP_TIME.step_fixed_s)


def test_narrow_attention_heads_are_timed_at_their_measured_share_of_the_wide_rate():
    """Attention of head dimension 32 runs at 0.40 of its rate at 128 (bench/results/attention-heads-h200.txt): the
    demo model's 301K-token step is mostly attention and takes 1/0.40 as long as at the matmul rate."""
    from elite_core.memory_model import attention_flops_per_step
    from elite_core.planner import STEP_TIME, estimate_step_time_s

    assert [STEP_TIME.attention_speed(dim) for dim in (16, 32, 64, 128, 256)] == [0.40, 0.40, 0.77, 1.0, 1.0]
    assert STEP_TIME.attention_speed(96) == pytest.approx(0.77 + 0.585 * 0.23, abs=1e-3)  # log2: 96 is 0.585 past 64
    demo_shape = shape_from_hf_config(demo_model_config(), name="demo")
    assert demo_shape.head_dim == 32
    h100 = fake_profile("h100")
    setup = plan_tiers(demo_shape, h100, default_config())[6].setup
    wide = dataclasses.replace(STEP_TIME, attention_speed_by_head_dim=((128, 1.0),))
    rate = h100.gpus[0].tflops_bf16 * 1e12 * STEP_TIME.matmul_efficiency
    extra = estimate_step_time_s(demo_shape, setup, h100) - estimate_step_time_s(demo_shape, setup, h100, constants=wide)
    assert extra == pytest.approx(attention_flops_per_step(demo_shape, setup) / rate * (1 / 0.40 - 1), rel=1e-6)
    assert extra > estimate_step_time_s(demo_shape, setup, h100, constants=wide)  # most of the step


def test_an_option_whose_library_is_missing_is_named_with_what_to_do():
    from elite_core.planner import missing_libraries
    from elite_core.preflight import check_options_installed

    bare_gpu = fake_profile("h100")  # no bitsandbytes, no deepspeed
    asked = default_config(qlora=True, adamw_8bit=True, device="cuda")
    missing = missing_libraries(asked, bare_gpu)
    assert set(missing) == {"qlora", "adamw_8bit"}
    assert "QLoRA needs bitsandbytes" in missing["qlora"] and "pip install bitsandbytes" in missing["qlora"]
    # ZeRO without deepspeed is the launch check's (elite_tui.engine.check_launch), not this one's
    assert missing_libraries(default_config(deepspeed="zero2", device="cuda"), bare_gpu) == {}
    assert missing_libraries(default_config(device="cuda"), bare_gpu) == {}
    check = check_options_installed(asked, bare_gpu)
    assert not check.ok and "bitsandbytes" in check.message and "Overrides" in check.fix_hint

    with_bnb = dataclasses.replace(bare_gpu, capabilities=tuple(
        dataclasses.replace(c, available=True) if c.name == "bitsandbytes" else c for c in bare_gpu.capabilities))
    assert missing_libraries(asked, with_bnb) == {}
    check = check_options_installed(asked, with_bnb)
    assert check.ok and check.message == "bitsandbytes (QLoRA, 8-bit AdamW)"
    # a CPU run trains without these options (the tier's note says so): nothing to install
    assert missing_libraries(default_config(qlora=True, adamw_8bit=True, device="cpu"), bare_gpu) == {}
    assert missing_libraries(default_config(qlora=True), fake_profile("cpu")) == {}


def test_a_cpu_run_names_the_gpu_options_it_trains_without(demo_shape):
    cpu = fake_profile("cpu")
    bitsandbytes = plan_for_config(demo_shape, cpu, default_config(qlora=True, adamw_8bit=True).with_tier(1))
    zero = plan_for_config(demo_shape, cpu, default_config(deepspeed="zero2").with_tier(1))
    assert bitsandbytes.setup.weight_dtype == "fp32" and not bitsandbytes.setup.adamw_8bit
    assert zero.setup.deepspeed == "off"
    for plan, option in ((bitsandbytes, "QLoRA"), (bitsandbytes, "8-bit AdamW"), (zero, "DeepSpeed")):
        assert f"{option} needs a CUDA GPU: training without it" in plan.note


def test_the_probed_rate_stands_for_its_tier_row_only_at_the_probed_window():
    """A run probed at its own 256-token window (an override) says nothing direct about tier 1's 4,608-token row:
    that row is estimated and scaled by measured/estimated, as the others are."""
    from elite_core.estimates import EpochTokens, RateCalibration
    from elite_core.planner import with_epoch_times

    shape = shape_from_hf_config(demo_model_config(), name="demo")
    plans = plan_tiers(shape, fake_profile("cpu"), default_config("demo", ".", "runs"))
    epoch = EpochTokens(train_tokens=100_000, estimated=False)
    row_window = plans[0].setup.seq_tokens
    at_the_row = with_epoch_times(plans, epoch, RateCalibration(1, 5000.0, 2500.0, window_tokens=row_window))
    elsewhere = with_epoch_times(plans, epoch, RateCalibration(1, 5000.0, 2500.0, window_tokens=256))
    assert (at_the_row[0].rate_source, at_the_row[0].tokens_per_s) == ("probe", 5000.0)
    assert elsewhere[0].rate_source == "calibrated"
    estimated = with_epoch_times(plans, epoch)[0].tokens_per_s
    assert elsewhere[0].tokens_per_s == pytest.approx(2.0 * estimated)  # measured / estimated = 2


def _with_capabilities(profile, *names):
    capabilities = tuple(dataclasses.replace(c, available=True) if c.name in names else c for c in profile.capabilities)
    return dataclasses.replace(profile, capabilities=capabilities)


def test_a_run_over_several_gpus_fits_where_its_smallest_gpu_does():
    """GPU 1 has half of GPU 0's memory free: every process needs its own share, so GPU 1 decides."""
    h100 = fake_profile("h100")
    busy = dataclasses.replace(h100.gpus[0], index=1, usable_bytes=h100.gpus[0].usable_bytes // 2)
    two = dataclasses.replace(h100, gpus=(h100.gpus[0], busy))
    config = default_config("demo", ".", "runs", gpus=2, device="cuda")
    fitting = [plan for plan in plan_tiers(LLAMA_8B, two, config) if plan.fits]
    assert fitting and all(plan.breakdown.total_bytes <= busy.usable_bytes for plan in fitting)
    # planned against GPU 0 alone, some of these tiers need more than GPU 1 has
    assert any(plan.fits and plan.breakdown.total_bytes > busy.usable_bytes
               for plan in plan_tiers(LLAMA_8B, dataclasses.replace(h100, gpus=(h100.gpus[0],) * 2), config))


def test_a_zero_run_is_never_planned_with_qlora_or_8bit_adam():
    """ZeRO shards neither 4-bit weights nor 8-bit optimizer states, and the config refuses both beside it."""
    profile = _with_capabilities(fake_profile("h100"), "bitsandbytes", "deepspeed")
    small = dataclasses.replace(profile, gpus=(dataclasses.replace(profile.gpus[0], usable_bytes=20 * GIB),))
    config = default_config("demo", ".", "runs", gpus=2, device="cuda", deepspeed="zero2")
    for plan in plan_tiers(LLAMA_8B, small, config):
        assert not plan.setup.adamw_8bit and plan.setup.weight_dtype != "nf4", plan.options
        config_for_plan(config, plan)  # no ConfigError: what the table shows, the run can be


def test_soft_capped_logits_are_planned_with_the_full_loss_and_learned_positions_are_not_scaled():
    """Gemma 2 post-processes its logits, so training uses the model's own full-vocabulary loss (planned as chunked,
    its tiers 3-7 were marked "fits" at 95-1,170 GiB of real need); GPT-2's positions are a learned table of 1,024,
    which no RoPE factor stretches, so a longer window is no tier that fits."""
    from transformers import Gemma2Config, GPT2Config

    config = default_config("demo", ".", "runs", device="cuda")
    gemma = shape_from_hf_config(Gemma2Config(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                              num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                              vocab_size=256000), name="gemma-2-9b")
    plans = plan_tiers(gemma, fake_profile("h100"), config)
    assert all(plan.setup.loss == "full" for plan in plans)
    assert [plan.fits for plan in plans][2:] == [False] * 5

    gpt2 = shape_from_hf_config(GPT2Config(), name="gpt2")
    plans = plan_tiers(gpt2, fake_profile("h100"), config)
    assert not any(plan.fits for plan in plans) and all(plan.setup.rope_scaling_factor == 1.0 for plan in plans)
    assert "1,024 learned positions" in plans[0].note


def test_a_model_without_sdpa_is_planned_and_trained_with_eager_attention(tmp_path):
    """transformers runs Gemma 2 with eager attention or flash-attn only: asked for SDPA, loading failed, so no Gemma 2
    run could start. It is planned eager now (every score kept: long windows do not fit) and trains."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config

    from elite_core import training
    from elite_core.model_loading import load_causal_lm, load_model_shape

    model_dir = tmp_path / "gemma2"
    AutoModelForCausalLM.from_config(Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                  head_dim=32, pad_token_id=0)).save_pretrained(model_dir)
    shape = load_model_shape(str(model_dir))
    assert not shape.sdpa and shape.attention_softcap
    config = default_config(str(model_dir), ".", str(tmp_path / "runs"))
    plans = plan_tiers(shape, fake_profile("cpu"), config)
    assert {plan.setup.attention for plan in plans} == {"eager"} and "eager-attn" in plans[0].options
    setup = dataclasses.replace(plans[0].setup, seq_tokens=96, target_tokens=32)
    model = training.build_lora_model(config, setup, "cpu")
    input_ids = torch.randint(0, 300, (1, 96))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert load_causal_lm(str(model_dir), dtype=torch.float32, device="cpu").config._attn_implementation == "eager"
