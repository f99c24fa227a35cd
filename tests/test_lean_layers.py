"""The memory savers inside decoder layers change no result, and keep less for backward than transformers/peft do."""

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from elite_core import lean_layers
from elite_core.lean_layers import offload_saved_tensors, share_adapter_inputs, use_lean_norms

SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=512)


@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, Qwen2RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_norm_equals_transformers_norm(norm_class, dtype, monkeypatch):
    monkeypatch.setattr(lean_layers, "NORM_CHUNK_ROWS", 7)  # several uneven chunks
    torch.manual_seed(0)
    plain, lean = norm_class(48, eps=1e-6).to(dtype), norm_class(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        plain.weight.normal_()
        lean.weight.copy_(plain.weight)
    assert use_lean_norms(lean) == 1
    hidden = (torch.randn(2, 19, 48) * 3).to(dtype)
    grad_out = torch.randn(2, 19, 48).to(dtype)
    outputs, grads = [], []
    for norm in (plain, lean):
        x = hidden.clone().requires_grad_(True)
        out = norm(x)
        out.backward(grad_out)
        outputs.append(out)
        grads.append((x.grad, norm.weight.grad))
    assert outputs[1].dtype == outputs[0].dtype
    assert torch.equal(outputs[0], outputs[1])  # the same fp32 arithmetic, row for row
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert torch.allclose(grads[1][0].float(), grads[0][0].float(), **tolerance)
    assert torch.allclose(grads[1][1].float(), grads[0][1].float(), **tolerance)


def _lora_model(config_class, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_class(**SMALL), attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config])
def test_lean_model_gives_the_same_loss_and_adapter_gradients(config_class):
    plain, lean = _lora_model(config_class), _lora_model(config_class)
    assert use_lean_norms(lean) == 2 * SMALL["num_hidden_layers"] + 1
    input_ids = torch.randint(0, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (plain, lean):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-6)
    for (name, p), (_, q) in zip(plain.named_parameters(), lean.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in lean.named_parameters()]


def _saved_activation_bytes(model, seq: int, autocast: bool) -> tuple[int, list]:
    """Bytes autograd keeps for the first decoder layer (distinct storages, weights excluded)."""
    layer = model.get_base_model().model.layers[0]
    hidden = torch.randn(1, seq, SMALL["hidden_size"], dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(seq)[None]
    rotary = model.get_base_model().model.rotary_emb(hidden, positions)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = (storage.nbytes(), tensor.dtype)
        return tensor

    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with cast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(hidden, position_embeddings=rotary, attention_mask=None, position_ids=positions)
    return sum(n for n, _ in storages.values()), list(storages.values())


def _bf16_model_with_fp32_adapters():
    model = _lora_model(LlamaConfig).to(torch.bfloat16)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()  # peft keeps adapters in fp32 on a 16-bit model
    return model


def test_lean_layers_keep_less_for_backward_under_autocast():
    seq, width = 256, SMALL["hidden_size"]
    plain, shared, lean_norms = (_bf16_model_with_fp32_adapters() for _ in range(3))
    assert share_adapter_inputs(shared) == 7 * SMALL["num_hidden_layers"]
    use_lean_norms(lean_norms)
    plain_bytes, plain_saved = _saved_activation_bytes(plain, seq, autocast=True)
    shared_bytes, _ = _saved_activation_bytes(shared, seq, autocast=True)
    lean_bytes, lean_saved = _saved_activation_bytes(lean_norms, seq, autocast=True)
    full_width_fp32 = seq * width * 4
    assert sum(1 for n, dtype in plain_saved if dtype == torch.float32 and n == full_width_fp32) == 2  # the norms' upcasts
    assert not any(dtype == torch.float32 and n >= full_width_fp32 for n, dtype in lean_saved)
    # two fp32 copies (8 B per token and hidden unit) become the two bf16 inputs (4 B)
    assert plain_bytes - lean_bytes >= seq * width * 4
    # q/k/v stop keeping two extra bf16 copies of the normed input, gate/up one
    assert plain_bytes - shared_bytes >= seq * width * 2 * 3


def test_shared_adapter_inputs_change_no_result_under_autocast():
    plain, shared = _bf16_model_with_fp32_adapters(), _bf16_model_with_fp32_adapters()
    share_adapter_inputs(shared)
    input_ids = torch.randint(0, SMALL["vocab_size"], (1, 48), generator=torch.Generator().manual_seed(2))
    losses, grads = [], []
    for model in (plain, shared):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert torch.equal(losses[0], losses[1])
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


def test_offload_leaves_cpu_tensors_alone_and_restores_them():
    x = torch.randn(8, 8, requires_grad=True)
    with offload_saved_tensors(keep_on_gpu_bytes=0):
        y = (x * x).sum()
    y.backward()
    assert torch.allclose(x.grad, 2 * x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_keeps_the_first_bytes_on_the_gpu_and_moves_the_rest():
    weights = [torch.randn(1024, 1024, device="cuda", requires_grad=True) for _ in range(4)]
    layer_bytes = 1024 * 1024 * 4
    # cuBLAS allocates its workspace (32 MiB on Hopper) through torch's allocator at this process's first matmul: it must
    # not land between the two readings (it did once the profiler stopped doing matmuls in the test process).
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")
    kept_before = torch.cuda.memory_allocated()
    # Synchronous copies: with the overlapped ones the moved tensors still count as allocated right after this small
    # forward (an H100 showed all of them; whole-model peaks are unchanged, bench/results/offload-overlap-h100).
    with offload_saved_tensors(keep_on_gpu_bytes=2 * layer_bytes, overlap=False):
        x = torch.randn(1024, 1024, device="cuda")
        for weight in weights:
            x = torch.tanh(x @ weight)  # tanh saves its output: one 4 MiB tensor per layer
        loss = x.sum()
    assert torch.cuda.memory_allocated() - kept_before < 5 * layer_bytes  # not all four outputs stayed
    loss.backward()
    assert all(w.grad is not None and torch.isfinite(w.grad).all() for w in weights)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overlapped_offload_gives_the_synchronous_gradients_and_reuses_its_buffers():
    weights = [torch.randn(512, 512, device="cuda", requires_grad=True) for _ in range(4)]

    def gradients(overlap: bool):
        for weight in weights:
            weight.grad = None
        with offload_saved_tensors(0, overlap=overlap):
            x = torch.randn(512, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
            for weight in weights:
                x = torch.tanh(x @ weight)
            loss = x.square().sum()
        loss.backward()
        return [weight.grad.clone() for weight in weights]

    synchronous = gradients(False)
    assert all(torch.equal(a, b) for a, b in zip(synchronous, gradients(True)))
    buffers = list(lean_layers.HOST_BUFFERS.buffers)
    assert all(torch.equal(a, b) for a, b in zip(synchronous, gradients(True)))  # the second pass reuses them
    assert [b.data_ptr() for b in lean_layers.HOST_BUFFERS.buffers] == [b.data_ptr() for b in buffers]


def test_memory_model_counts_lean_norms_for_exactly_the_swapped_classes():
    from elite_core.memory_model import LEAN_NORM_MODEL_TYPES

    for model_type in LEAN_NORM_MODEL_TYPES:
        class_prefix = {"qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe"}.get(model_type, model_type.capitalize())
        assert f"{class_prefix}RMSNorm" in lean_layers.LEAN_NORM_CLASSES, model_type
    assert len(LEAN_NORM_MODEL_TYPES) == len(lean_layers.LEAN_NORM_CLASSES)
