"""Pretrain the demo model's base weights on the CPython standard library, so the demo fine-tunes a model that already
knows Python (as a user's run does) instead of training random weights from scratch.

The architecture is the demo's (elite_core.demo_model.demo_model_config: 2 layers, hidden 128, byte-level, about 0.46 M
parameters); only the weights are new. They are written as DEMO_WEIGHTS (fp32 safetensors, under 2 MB), which the
package ships and elite_core.demo_model loads.

Corpus: every .py file of one CPython standard library (Lib/, its tests included, site-packages left out), each file's
bytes followed by the end-of-text token, as the dataset builder streams files. 2 % of the files (every 50th by path)
are held out; the table reports their loss.

1. Pack the corpus here (the files are the ones this interpreter ships):

    python bench/pretrain_demo_model.py pack --out .whl/demo-corpus.tar.xz

2. Train on a GPU for a wall-clock budget (the schedule is a cosine over the steps a 20-step probe says fit in it):

    python bench/pretrain_demo_model.py train --corpus .whl/demo-corpus.tar.xz --minutes 6 --out $OUT

It prints a table (step, train loss, held-out loss, tokens/s) and writes model.safetensors and pretrain.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

HOLD_OUT_EVERY = 50
SEQUENCE_TOKENS = 10 * 1024
"""The demo's CPU tier (8K context + 2K target); longer windows lean on RoPE beyond what the model saw."""
BATCH_WINDOWS = 24
PEAK_LR = 3e-3
WARMUP_STEPS = 100
PROBE_STEPS = 20
PROBE_TIMED_FROM = 5
EVAL_WINDOWS = 32
REPORT_EVERY = 100


def pack(out: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz") as archive:
        for path in files:
            archive.add(path, arcname=str(path.relative_to(stdlib)))
    print(f"{len(files)} files from {stdlib} (Python {platform.python_version()}) -> {out} "
          f"({out.stat().st_size / 2**20:.1f} MiB)")


def _token_streams(corpus: Path):
    """(train tokens, held-out tokens) as int64 tensors: each file encoded with the demo tokenizer, then EOS."""
    import torch

    from elite_core.demo_model import demo_tokenizer

    tokenizer = demo_tokenizer()
    streams = {"train": [], "held_out": []}
    with tarfile.open(corpus, "r:xz") as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile()), key=lambda m: m.name)
        for index, member in enumerate(members):
            text = archive.extractfile(member).read().decode("utf-8", errors="replace")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            streams["held_out" if index % HOLD_OUT_EVERY == 0 else "train"].extend(ids)
    return (torch.tensor(streams["train"], dtype=torch.int64), torch.tensor(streams["held_out"], dtype=torch.int64),
            len(members))


def _windows(stream, count: int, generator, device, length: int = SEQUENCE_TOKENS):
    import torch

    starts = torch.randint(0, len(stream) - length - 1, (count,), generator=generator)
    return torch.stack([stream[s:s + length] for s in starts.tolist()]).to(device)


def train(corpus: Path, minutes: float, out: Path, seed: int, batch_windows: int = BATCH_WINDOWS,
          sequence_tokens: int = SEQUENCE_TOKENS) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from elite_core.demo_model import demo_model_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_stream, held_out_stream, file_count = _token_streams(corpus)
    print(f"corpus: {file_count} files, {len(train_stream):,} train tokens, {len(held_out_stream):,} held out")
    torch.manual_seed(seed)
    config = demo_model_config()
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda")
    generator = torch.Generator().manual_seed(seed)
    held_out = _windows(held_out_stream, EVAL_WINDOWS, torch.Generator().manual_seed(seed + 1), device, sequence_tokens)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step(lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = _windows(train_stream, batch_windows, generator, device, sequence_tokens)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def held_out_loss() -> float:
        with autocast:
            return float(sum(model(input_ids=held_out[i:i + 8], labels=held_out[i:i + 8]).loss.item()
                             for i in range(0, EVAL_WINDOWS, 8)) / math.ceil(EVAL_WINDOWS / 8))

    started = time.perf_counter()
    for probe_step in range(PROBE_STEPS):
        if probe_step == PROBE_TIMED_FROM:  # the first steps pay for kernel selection
            probe_started = time.perf_counter()
        step(PEAK_LR * (probe_step + 1) / WARMUP_STEPS)
    seconds_per_step = (time.perf_counter() - probe_started) / (PROBE_STEPS - PROBE_TIMED_FROM)
    budget_s = minutes * 60 - (time.perf_counter() - started)
    total_steps = max(WARMUP_STEPS + 1, PROBE_STEPS + int(budget_s / seconds_per_step * 0.92))
    tokens_per_step = batch_windows * sequence_tokens
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else platform.processor()}); "
          f"{seconds_per_step * 1e3:.1f} ms/step of {tokens_per_step:,} tokens -> {total_steps} steps "
          f"({total_steps * tokens_per_step / 1e6:.0f} M tokens, "
          f"{total_steps * tokens_per_step / len(train_stream):.1f} passes over the corpus)")
    print(f"{'step':>6} {'train loss':>10} {'held-out':>9} {'tokens/s':>10} {'lr':>9}")
    rows = []
    window_started, window_steps, recent = time.perf_counter(), 0, []
    for number in range(PROBE_STEPS + 1, total_steps + 1):
        if number <= WARMUP_STEPS:
            lr = PEAK_LR * number / WARMUP_STEPS
        else:
            progress = (number - WARMUP_STEPS) / (total_steps - WARMUP_STEPS)
            lr = PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        recent.append(step(lr))
        window_steps += 1
        if number % REPORT_EVERY == 0 or number == total_steps:
            rate = window_steps * tokens_per_step / (time.perf_counter() - window_started)
            row = {"step": number, "train_loss": sum(recent) / len(recent), "held_out_loss": held_out_loss(),
                   "tokens_per_s": rate, "lr": lr}
            rows.append(row)
            print(f"{number:>6} {row['train_loss']:>10.4f} {row['held_out_loss']:>9.4f} {rate:>10,.0f} {lr:>9.2e}",
                  flush=True)
            window_started, window_steps, recent = time.perf_counter(), 0, []
    out.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().float().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    summary = {"corpus": corpus.name, "files": file_count, "train_tokens": len(train_stream),
               "held_out_tokens": len(held_out_stream), "steps": total_steps, "tokens_per_step": tokens_per_step,
               "sequence_tokens": sequence_tokens, "peak_lr": PEAK_LR, "seed": seed, "device": device,
               "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
               "wall_s": time.perf_counter() - started, "rows": rows}
    (out / "pretrain.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"wrote {out / 'model.safetensors'}; {summary['wall_s']:.0f} s; final held-out loss "
          f"{rows[-1]['held_out_loss']:.4f} nats/byte (the random model starts at ln 259 = {math.log(259):.3f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pack_command = commands.add_parser("pack")
    pack_command.add_argument("--out", type=Path, required=True)
    train_command = commands.add_parser("train")
    train_command.add_argument("--corpus", type=Path, required=True)
    train_command.add_argument("--minutes", type=float, default=6.0)
    train_command.add_argument("--out", type=Path, required=True)
    train_command.add_argument("--seed", type=int, default=0)
    train_command.add_argument("--batch", type=int, default=BATCH_WINDOWS, help="windows per step")
    train_command.add_argument("--sequence", type=int, default=SEQUENCE_TOKENS, help="tokens per window")
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.out)
    else:
        train(args.corpus, args.minutes, args.out, args.seed, args.batch, args.sequence)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
