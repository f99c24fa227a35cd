"""The held-out evaluation leaves the compiled decoder layers as the pre-flight probe compiled them.

The planner compiles the layers on a GPU only; here they are compiled by hand on the CPU, which is enough: what is
checked is what Dynamo compiles, not how fast. Evaluated first (step 0: one window, no gradients), Dynamo compiled
the layers for it and then again for training with a dynamic batch, graphs the probe never ran."""

from __future__ import annotations

import torch

from elite_core.config import default_config
from elite_core.training import TrainingEngine, compile_decoder_layers


def test_the_evaluation_compiles_nothing_and_training_compiles_what_a_probe_does(tmp_path, tiny_repo):
    from torch._dynamo.utils import counters

    def compiled_engine(name: str) -> TrainingEngine:
        config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"), run_name=name, context_tokens=96,
                                target_tokens=32, lora_rank=4, lora_alpha=8, micro_batch=2, grad_accum=1,
                                eval_fraction=0.3, max_steps=2, checkpoint_every_seconds=0, device="cpu")
        config.run_dir.mkdir(parents=True)
        engine = TrainingEngine(config, config.run_dir, emit=lambda event: None, poll_commands=lambda: [])
        engine.setup()
        assert compile_decoder_layers(engine.model) > 0
        return engine

    def graphs_of(run) -> tuple[int, int]:
        torch._dynamo.reset()
        counters.clear()
        run()
        return counters["frames"]["total"], counters["stats"]["unique_graphs"]

    probe = compiled_engine("probe")
    probe_graphs = graphs_of(probe.train_step)
    assert probe_graphs[0] > 0  # the layers really compile

    run = compiled_engine("run")
    assert graphs_of(run.evaluate) == (0, 0)
    counters.clear()
    run.train_step()
    assert (counters["frames"]["total"], counters["stats"]["unique_graphs"]) == probe_graphs
