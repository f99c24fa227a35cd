"""Dataset build throughput: the installed site-packages as the repository, the demo tokenizer and a locally trained BPE.

    python bench/dataset_throughput.py [--root DIR] [--workers N] [--max-load 1.0] [--out bench/results/dataset-cpu.txt]

Prints MB/s (bytes of candidate files read per second of wall time) and the peak RSS of the whole process tree
(the build's process plus its workers), sampled every 50 ms. The CPU may be shared: each build waits until the
1-minute load average is below --max-load, and the load before and after is printed with the result.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import psutil

from elite_core.dataset import build_dataset, format_summary
from elite_core.units import format_bytes

BPE_VOCAB_SIZE = 8192
BPE_SAMPLE_BYTES = 20 * 1024 * 1024


class TreeRssSampler:
    """Peak of the summed RSS of this process and its descendants."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_main_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            try:
                main_rss = me.memory_info().rss
                total = main_rss
                for child in me.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                continue
            self.peak_bytes = max(self.peak_bytes, total)
            self.peak_main_bytes = max(self.peak_main_bytes, main_rss)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def train_bpe_tokenizer(root: Path, directory: Path) -> Path:
    """A byte-level BPE trained on a sample of the repository's Python files, saved as a local model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    sample, sampled_bytes = [], 0
    for path in sorted(root.rglob("*.py")):
        if sampled_bytes >= BPE_SAMPLE_BYTES:
            break
        try:
            if path.is_symlink() or path.stat().st_size > 200_000:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        sample.append(text)
        sampled_bytes += len(text)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    started = time.monotonic()
    backend.train_from_iterator(sample, trainer=trainer)
    print(f"trained BPE vocab {backend.get_vocab_size()} on {sampled_bytes / 1e6:.1f} MB in {time.monotonic() - started:.1f} s")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    # load_tokenizer wants a model directory; a config is enough, no weights are ever read.
    LlamaConfig(vocab_size=backend.get_vocab_size(), eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id).to_json_file(directory / "config.json")
    return directory


def wait_for_quiet_cpu(max_load: float, timeout_s: float = 600.0) -> None:
    """The CPU is shared: wait until the 1-minute load average is below max_load (or give up after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while max_load > 0 and os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(5)


def run_one(label: str, root: Path, tokenizer_source: str, workers: int | None, scratch: Path,
            max_load: float = 0.0) -> str:
    dataset_dir = scratch / f"dataset-{label}"
    shutil.rmtree(dataset_dir, ignore_errors=True)
    wait_for_quiet_cpu(max_load)
    load_before = os.getloadavg()
    last = []
    with TreeRssSampler() as sampler:
        started = time.monotonic()
        summary = build_dataset(root, dataset_dir, tokenizer_source=tokenizer_source, workers=workers,
                                progress=last.append)
        elapsed_s = time.monotonic() - started
    progress = last[-1]
    read_mb = progress.bytes_done / 1e6
    with TreeRssSampler() as rebuild_sampler:
        started = time.monotonic()
        again = build_dataset(root, dataset_dir, tokenizer_source=tokenizer_source, workers=workers)
        unchanged_s = time.monotonic() - started
    assert not again.rebuilt
    load_after = os.getloadavg()
    token_bytes = sum((dataset_dir / f"{split}.tokens").stat().st_size for split in ("train", "eval"))
    lines = [
        f"[{label}] tokenizer={tokenizer_source if label == 'demo' else 'local BPE, vocab %d' % BPE_VOCAB_SIZE} "
        f"workers={workers or os.cpu_count()}",
        f"  candidate files read: {progress.files_done:,} ({read_mb:,.1f} MB) in {elapsed_s:.1f} s "
        f"-> {read_mb / elapsed_s:.2f} MB/s, {progress.files_done / elapsed_s:,.0f} files/s",
        f"  kept: {summary.files:,} files, {summary.bytes / 1e6:,.1f} MB of text -> {summary.bytes / 1e6 / elapsed_s:.2f} MB/s; "
        f"tokens {summary.tokens:,} ({summary.tokens / max(1, summary.bytes):.3f} tokens/byte), token files {format_bytes(token_bytes)}",
        f"  wall time: tokenizer load + walk {last[0].elapsed_s:.1f} s, files {progress.elapsed_s - last[0].elapsed_s:.1f} s, "
        f"assemble + manifest {elapsed_s - progress.elapsed_s:.1f} s",
        f"  peak RSS: process tree {format_bytes(sampler.peak_bytes)}, build process {format_bytes(sampler.peak_main_bytes)}",
        f"  skipped {len(summary.skipped):,}, secrets excluded {len(summary.secrets_excluded):,}, "
        f"duplicates removed {summary.duplicates_removed:,}",
        f"  unchanged rebuild check: {unchanged_s:.2f} s (peak RSS {format_bytes(rebuild_sampler.peak_bytes)})",
        f"  load average (1/5/15 min) before {_loads(load_before)}, after {_loads(load_after)}",
    ]
    print("\n".join(lines), flush=True)
    (scratch / f"summary-{label}.txt").write_text(format_summary(summary), encoding="utf-8")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--scratch", type=Path, default=None, help="where token files go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results here")
    parser.add_argument("--only", choices=("demo", "bpe"), default=None)
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="wait before each build until the 1-minute load average is below this (0: do not wait)")
    args = parser.parse_args()

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="elite-dataset-bench-"))
    walked_bytes = sum(
        entry.stat(follow_symlinks=False).st_size for entry in _walk_files(args.root)
    )
    cpu = platform.processor() or platform.machine()
    header = [
        f"machine: {os.cpu_count()}-core CPU ({cpu}), {format_bytes(psutil.virtual_memory().total)} RAM, no GPU used",
        f"repository: {args.root} ({format_bytes(walked_bytes)} in regular files, before any filtering)",
        f"python {platform.python_version()}, date {time.strftime('%Y-%m-%d')}",
    ]
    print("\n".join(header), flush=True)
    results = []
    if args.only in (None, "demo"):
        results.append(run_one("demo", args.root, "demo", args.workers, scratch, args.max_load))
    if args.only in (None, "bpe"):
        tokenizer_dir = scratch / "bpe-tokenizer"
        # Trained in a child process, so the build's peak RSS below holds no trace of the training.
        trainer = multiprocessing.get_context("spawn").Process(target=train_bpe_tokenizer, args=(args.root, tokenizer_dir))
        trainer.start()
        trainer.join()
        if trainer.exitcode != 0:
            raise SystemExit(f"BPE training failed (exit code {trainer.exitcode})")
        results.append(run_one("bpe", args.root, str(tokenizer_dir), args.workers, scratch, args.max_load))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(header + results) + "\n", encoding="utf-8")
    if args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)


def _loads(loads: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.2f}" for value in loads)


def _walk_files(root: Path):
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        yield entry
        except OSError:
            continue


if __name__ == "__main__":
    main()
