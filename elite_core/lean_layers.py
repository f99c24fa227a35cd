"""Memory savers inside the decoder layers that leave the math unchanged, for long windows.

At a 300K-token window each tensor of hidden width is 2.4 GB in bf16, so what autograd keeps per layer decides the
longest window: transformers' RMSNorm keeps an fp32 copy of its input (twice the bf16 size, two norms per layer), and
peft casts every adapter's input to the adapter's fp32 dtype, so under autocast each targeted module keeps its own bf16
copy of an input it could share. Both are removed here; tests check the results are unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch

NORM_CHUNK_ROWS = 16384
"""Rows per chunk of the norm's fp32 arithmetic: its temporaries stay at a few MB instead of 4 bytes x the window."""

LEAN_NORM_CLASSES = frozenset({
    "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm", "Qwen3RMSNorm",
    "Qwen3MoeRMSNorm", "Phi3RMSNorm",
})
"""Norms computing transformers' `weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)`; others
(Gemma's 1 + weight, LayerNorm) keep their own code."""

class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm that keeps only its 16-bit input and one fp32 scale per row for backward (autograd on transformers'
    version keeps the fp32 upcast of the input), computing a chunk of rows at a time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1])
        out = torch.empty(rows.shape, dtype=torch.result_type(weight, rows), device=rows.device)
        inv_rms = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], NORM_CHUNK_ROWS):
            chunk = rows[start:start + NORM_CHUNK_ROWS].float()
            scale = torch.rsqrt(chunk.pow(2).mean(-1, keepdim=True) + eps)
            inv_rms[start:start + NORM_CHUNK_ROWS] = scale
            out[start:start + NORM_CHUNK_ROWS] = weight * (chunk * scale).to(hidden.dtype)
        ctx.save_for_backward(hidden, weight, inv_rms)
        return out.view(*hidden.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, inv_rms = ctx.saved_tensors
        width = hidden.shape[-1]
        rows = hidden.reshape(-1, width)
        grads = grad_out.reshape(-1, width)
        grad_hidden = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(width, dtype=torch.float32, device=rows.device) if ctx.needs_input_grad[1] else None
        for start in range(0, rows.shape[0], NORM_CHUNK_ROWS):
            end = start + NORM_CHUNK_ROWS
            scale = inv_rms[start:end]
            normed = rows[start:end].float() * scale
            if grad_weight is not None:
                grad_weight += (grads[start:end] * normed.to(hidden.dtype)).float().sum(0)
            if grad_hidden is not None:
                # The gradient reaches the 16-bit normed tensor in its dtype, as in autograd's graph, then upcasts.
                grad_normed = (grads[start:end] * weight).to(hidden.dtype).float()
                mean_dot = (grad_normed * normed).mean(-1, keepdim=True)
                grad_hidden[start:end] = (scale * (grad_normed - normed * mean_dot)).to(hidden.dtype)
        return (grad_hidden.view_as(hidden) if grad_hidden is not None else None,
                grad_weight.to(weight.dtype) if grad_weight is not None else None, None)


def _lean_norm_forward(module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNormFunction.apply(hidden_states, module.weight, module.variance_epsilon)


def use_lean_norms(model) -> int:
    """Swap the forward of every RMSNorm of a known form for the lean one (on the instance: parameter names, and so
    the saved adapter, do not change). Returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        if (type(module).__name__ in LEAN_NORM_CLASSES and hasattr(module, "variance_epsilon")
                and not getattr(module, "_elite_lean", False)):
            module.forward = functools.partial(_lean_norm_forward, module)
            module._elite_lean = True
            swapped += 1
    return swapped


def share_adapter_inputs(model) -> int:
    """Stop peft from casting each adapter's input to the adapter's fp32 dtype. Only for training under autocast: the
    adapter's matmul then runs in the autocast dtype either way, so results are the same, but q/k/v (and gate/up) share
    one saved input instead of keeping a copy each. Returns how many adapter layers changed."""
    changed = 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed


class PinnedHostBuffers:
    """Page-locked host buffers for offloaded checkpoints, made once and reused every micro-batch (the same layers save
    the same shapes each time). Registered with cudaHostRegister at their exact size: torch's pinned allocator rounds
    each block up to a power of two (at 301K tokens, 79 GB became more than 128)."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []

    def buffer(self, index: int, like: torch.Tensor) -> torch.Tensor:
        if index < len(self.buffers) and self.buffers[index].shape == like.shape and self.buffers[index].dtype == like.dtype:
            return self.buffers[index]
        host = torch.empty(like.shape, dtype=like.dtype, device="cpu")
        code = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(), 0)
        if code != torch.cuda.cudart().cudaError.success:  # cannot lock more memory: pageable still works, not async
            host = torch.empty(like.shape, dtype=like.dtype, device="cpu")
        else:
            weakref.finalize(host, _unregister, host.data_ptr())
        if index < len(self.buffers):
            self.buffers[index] = host
        else:
            self.buffers.append(host)
        return host


def _unregister(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


HOST_BUFFERS = PinnedHostBuffers()
"""One set per process: a training run offloads the same checkpoints at every step."""


@contextlib.contextmanager
def offload_saved_tensors(keep_on_gpu_bytes: int = 0, overlap: bool = True):
    """torch's save_on_cpu, except that the first keep_on_gpu_bytes of saved GPU tensors stay on the GPU, and the copies
    to the host run on a side stream into reused page-locked buffers, overlapped with the forward's compute.

    With checkpointed layers the tensors saved here are the layers' inputs, first layer first: keeping some on the GPU
    is how a window whose checkpoints would not all fit in the host's RAM still trains. A buffer is reused by the next
    micro-batch's forward, which starts after this one's backward has read it back. overlap=False: synchronous copies
    into fresh pageable memory (the engine before; kept for the benchmark's side-by-side).
    """
    kept = 0
    saved = 0
    side = torch.cuda.Stream() if overlap and torch.cuda.is_available() else None

    def pack(tensor: torch.Tensor):
        nonlocal kept, saved
        size = tensor.numel() * tensor.element_size()
        if not tensor.is_cuda or kept + size <= keep_on_gpu_bytes:
            kept += size if tensor.is_cuda else 0
            return tensor
        if side is None:
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, device="cpu")
            host.copy_(tensor)
            return (tensor.device, host, None)
        host = HOST_BUFFERS.buffer(saved, tensor)
        saved += 1
        side.wait_stream(torch.cuda.current_stream())  # the tensor is computed before it is copied
        with torch.cuda.stream(side):
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        tensor.record_stream(side)  # its memory is not reused until the copy is done
        return (tensor.device, host, copied)

    def unpack(packed):
        if isinstance(packed, tuple):
            device, host, copied = packed
            if copied is None:
                return host.to(device, non_blocking=False)
            torch.cuda.current_stream().wait_event(copied)
            return host.to(device, non_blocking=True)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
