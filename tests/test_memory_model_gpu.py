"""On a CUDA GPU: the engine's real training step peaks within 5 % of the prediction (the bench's method, one small point)."""

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "memory_accuracy.py"
    spec = importlib.util.spec_from_file_location("memory_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_accuracy"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("checkpointing", ["on", "off"])
def test_small_qwen_step_matches_prediction(checkpointing, monkeypatch):
    bench = _bench()
    from elite_core import training
    from elite_core.config import RunConfig

    monkeypatch.setattr(training, "load_causal_lm", bench._from_config_loader(bench.hf_config))
    point = bench.Point("Qwen2.5-Coder-1.5B", 4096, 16, checkpointing)
    config = RunConfig(model=point.model, lora_rank=point.rank, lora_alpha=2 * point.rank)
    measurer = bench.Measurer()
    model = training.build_lora_model(config, bench.setup_for(point), "cuda")
    optimizer = training.make_optimizer(model, config, bench.setup_for(point), "cuda")
    row = bench.record(point, "gpu", bench.run_point(point, model, optimizer, measurer, steps=2))
    assert -3.0 <= row["error_pct"] <= 5.0, row
