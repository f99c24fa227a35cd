"""On a CUDA GPU: the engine's real training step peaks within 5 % of the prediction (the bench's method, one small point)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parents[1]

# The step runs in a fresh process, as in the bench and in training: the prediction counts one process's CUDA context
# and kernels, and the measurement counts everything outside torch's allocator. Run after the other GPU tests in one
# process, the same point measured 0.9 GiB more on an H200 (-14 % with checkpointing, -6 % without; empty_cache did
# not remove it, the cause was not isolated).
POINT_SCRIPT = """
import json, sys
from bench import memory_accuracy as bench
from elite_core import training
from elite_core.config import RunConfig

measurer = bench.Measurer()  # before CUDA starts: the GPU's memory in use without this process
training.load_causal_lm = bench._from_config_loader(bench.hf_config)
point = bench.Point("Qwen2.5-Coder-1.5B", 4096, 16, sys.argv[1])
config = RunConfig(model=point.model, lora_rank=point.rank, lora_alpha=2 * point.rank)
model = training.build_lora_model(config, bench.setup_for(point), "cuda")
optimizer = training.make_optimizer(model, config, bench.setup_for(point), "cuda")
print(json.dumps(bench.record(point, "gpu", bench.run_point(point, model, optimizer, measurer, steps=2))))
"""


@pytest.mark.parametrize("checkpointing", ["on", "off"])
def test_small_qwen_step_matches_prediction(checkpointing):
    done = subprocess.run([sys.executable, "-c", POINT_SCRIPT, checkpointing],
                          capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert -3.0 <= row["error_pct"] <= 5.0, row
