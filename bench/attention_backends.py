"""Which scaled_dot_product_attention backend trains fastest at long windows on this GPU.

    python bench/attention_backends.py --seqs 16384 65536 --out bench/results/attention-h100.jsonl
    python bench/attention_backends.py --head-dims 32 64 128 --backends default   # what SDPA picks, per head size

Causal attention with Llama-3.1-8B's heads (32 query, 8 key/value, dim 128), bf16, forward + backward, as the engine runs it
through transformers' SDPA path: grouped-query (enable_gqa) and with keys/values repeated to every head. Prints TFLOPS
per backend, the peak memory, and the output/gradient difference against the flash backend. One JSON line per point.
With --head-dims the query heads times their dimension stay 4096 (a quarter as many key/value heads): the same FLOPs
at every head size, so the TFLOPS say how fast attention runs for a model's head size ("default": SDPA's own pick).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "default": None}
HEADS_TIMES_DIM = 4096


def run(backend: str, seq: int, gqa: bool, heads: int = 32, kv_heads: int = 8, dim: int = 128, repeats: int = 2,
        layout: str = "bhsd"):
    """layout "bshd": q, k, v are transposed views of (batch, seq, heads, dim) tensors, as transformers passes them."""
    generator = torch.Generator(device="cuda").manual_seed(0)

    def tensor(count: int) -> torch.Tensor:
        if layout == "bshd":
            base = torch.randn(1, seq, count, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
            return base.transpose(1, 2).requires_grad_(True)
        return torch.randn(1, count, seq, dim, device="cuda", dtype=torch.bfloat16, generator=generator,
                           requires_grad=True)

    q, k, v = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    grad = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=generator)

    def step():
        with sdpa_kernel([BACKENDS[backend]]) if BACKENDS[backend] else contextlib.nullcontext():
            if gqa:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                groups = heads // kv_heads
                out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                                     is_causal=True)
        out.backward(grad)
        return out

    try:
        out = step()  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        started = time.perf_counter()
        for _ in range(repeats):
            q.grad = k.grad = v.grad = None
            out = step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / repeats
    except Exception as exc:  # a backend that does not support the case says so and the next one runs
        return {"backend": backend, "seq": seq, "gqa": gqa, "layout": layout, "dim": dim, "ok": False,
                "error": str(exc).splitlines()[0][:160]}
    # causal: half of QK^T and of AV; backward 2.5x forward
    flops = 2 * 2 * seq * seq * heads * dim / 2 * 3.5
    result = {"backend": backend, "seq": seq, "gqa": gqa, "layout": layout, "dim": dim, "ok": True,
              "step_s": round(seconds, 4),
              "tflops": round(flops / seconds / 1e12, 1),
              "peak_extra_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)}
    return result, (out.detach().float(), q.grad.float(), k.grad.float())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", nargs="+", type=int, default=[16384, 65536])
    parser.add_argument("--head-dims", nargs="+", type=int, default=[128],
                        help="head sizes; other than 128, the heads are 4096 / dim (a quarter as many for keys/values)")
    parser.add_argument("--backends", nargs="+", choices=tuple(BACKENDS), default=["flash", "cudnn", "efficient"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd",
                        help="bshd: transposed views, the layout transformers' attention hands to SDPA")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name(0)
    rows = []
    for dim in args.head_dims:
        heads = HEADS_TIMES_DIM // dim
        for seq in args.seqs:
            reference = None
            for backend in args.backends:
                for gqa in (True, False):
                    outcome = run(backend, seq, gqa, heads=heads, kv_heads=heads // 4, dim=dim, layout=args.layout)
                    row, tensors = (outcome, None) if isinstance(outcome, dict) else outcome
                    if tensors is not None:
                        if reference is None:
                            reference = tensors
                        else:
                            row["max_rel_diff_vs_first"] = round(max(
                                float((a - b).abs().max() / b.abs().max()) for a, b in zip(tensors, reference)), 5)
                    row["gpu"] = gpu
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    torch.cuda.empty_cache()
    first = args.backends[0]
    print(f"\n{'dim':>4} {'seq':>7} {'backend':9} {'kv':8} {'TFLOPS':>7} {'s/step':>8} {'extra GiB':>9}  vs {first}")
    baseline = {(r["dim"], r["seq"], r["gqa"]): r for r in rows if r["backend"] == first and r["ok"]}
    for row in rows:
        base = baseline.get((row["dim"], row["seq"], row["gqa"]))
        ratio = f"{row['tflops'] / base['tflops']:.2f}x" if row["ok"] and base else "-"
        kv = "gqa" if row["gqa"] else "repeated"
        if row["ok"]:
            print(f"{row['dim']:>4} {row['seq']:>7} {row['backend']:9} {kv:8} {row['tflops']:>7} {row['step_s']:>8} "
                  f"{row['peak_extra_gib']:>9}  {ratio}")
        else:
            print(f"{row['dim']:>4} {row['seq']:>7} {row['backend']:9} {kv:8} failed: {row['error']}")
    if args.out:
        with args.out.open("a") as sink:
            sink.writelines(json.dumps(row) + "\n" for row in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
