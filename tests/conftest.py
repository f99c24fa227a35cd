"""Fixtures shared across the suite: a tiny real repository, fixed hardware profiles, fixed model shapes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

if "PYTEST_XDIST_WORKER" in os.environ:
    # The suite runs in one worker per core (README's command): a torch thread pool per core in every worker, and in
    # every training child they start, would oversubscribe the cores. Set before anything imports torch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

TINY_REPO_FILES = 24
"""Enough source text for a few 4,608-token windows of the byte-level demo tokenizer, and still quick to build."""


def write_tiny_repo(root: Path, files: int = TINY_REPO_FILES) -> Path:
    """A small, deterministic Python project: real text for the dataset builder, no randomness."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("# tiny\n\nA small project used by the tests.\n", encoding="utf-8")
    package = root / "tiny"
    package.mkdir(exist_ok=True)
    for index in range(files):
        lines = [f'"""Module {index}: arithmetic helpers."""', ""]
        for function in range(12):
            lines += [
                f"def add_{index}_{function}(left: int, right: int) -> int:",
                f'    """Add two numbers, then {function} more."""',
                f"    total = left + right + {function}",
                "    return total",
                "",
            ]
        (package / f"module_{index:02d}.py").write_text("\n".join(lines), encoding="utf-8")
    return root


@pytest.fixture(autouse=True)
def no_process_outlives_its_test(request):
    """Training children run in their own session, so that an SSH drop does not reach them; a test that fails or times
    out while one trains would leave it running, and its load would skew every later test (a CPU run at 301K tokens
    once went on for minutes after its test). After each test, whatever still runs on that test's files is killed."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    marker = str(request.getfixturevalue("tmp_path"))
    yield
    import psutil

    leftovers = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.info["pid"] != os.getpid() and any(marker in part for part in process.info["cmdline"] or ()):
            leftovers.append(process)
    for process in leftovers:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=10)


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    return write_tiny_repo(tmp_path / "repo")


@pytest.fixture
def h100_profile():
    from elite_core.hardware import fake_profile

    return fake_profile("h100")


@pytest.fixture
def cpu_profile():
    from elite_core.hardware import fake_profile

    return fake_profile("cpu")


def qwen_coder_1_5b_shape():
    """Qwen2.5-Coder-1.5B's shape, written out so tests need no download and no transformers import."""
    from elite_core.memory_model import ModelShape, count_params

    shape = ModelShape(
        name="Qwen/Qwen2.5-Coder-1.5B",
        architecture="qwen2",
        hidden=1536,
        intermediate=8960,
        layers=28,
        heads=12,
        kv_heads=2,
        head_dim=128,
        vocab=151936,
        tied_embeddings=True,
        max_position_embeddings=32768,
        total_params=0,
        known=True,
        attention_bias=True,
    )
    return dataclasses.replace(shape, total_params=count_params(shape))


@pytest.fixture
def qwen_shape():
    return qwen_coder_1_5b_shape()

