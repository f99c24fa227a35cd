"""`elite-tui plan` prints the tier table, with --set overrides as the wizard's Overrides screen applies them; a --tier
outside the table is refused before anything is written."""

from __future__ import annotations

import pytest

from elite_core.units import format_bytes
from elite_tui.cli import main


def _tier_rows(out: str) -> dict[int, str]:
    rows = {}
    for line in out.splitlines():
        fields = line.lstrip("> ").split()
        if fields and fields[0].isdigit() and len(fields) > 5:
            rows[int(fields[0])] = line
    return rows


def test_plan_with_set_overrides_prints_the_table_those_settings_plan(tiny_repo, tmp_path, monkeypatch, capsys):
    from elite_core.config import default_config
    from elite_core.hardware import profile_hardware
    from elite_core.memory_model import shape_from_hf_config
    from elite_core.demo_model import demo_model_config
    from elite_core.planner import plan_tiers

    monkeypatch.setenv("ELITE_TUI_CACHE_DIR", str(tmp_path / "cache"))
    common = ["plan", "--repo", str(tiny_repo), "--output", str(tmp_path / "runs")]
    assert main(common) == 0
    out = capsys.readouterr().out
    plain = _tier_rows(out)
    # the legend names the CPU's rule too: a tier that fits but steps slowly is not the one marked
    assert "'>' marks the highest tier that fits and, on a CPU, steps in under 3 s" in out
    # the planner's notes under the table, each once with the tiers it holds for
    notes = out[out.index("\nnotes:\n"):].splitlines()[2:-1]
    texts = [line.split(": ", 1)[1] for line in notes]
    assert any("s per step on this CPU" in text for text in texts) and len(texts) == len(set(texts))
    assert all(line.startswith(("  tier ", "  tiers ")) for line in notes)
    assert main([*common, "--set", "micro_batch=4", "--set", "gradient_checkpointing=on"]) == 0
    overridden = _tier_rows(capsys.readouterr().out)
    assert sorted(plain) == sorted(overridden) == list(range(1, 8))

    profile = profile_hardware(str(tmp_path / "runs"))
    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"), micro_batch=4, gradient_checkpointing="on")
    for plan in plan_tiers(shape_from_hf_config(demo_model_config(), name="demo"), profile, config):
        row = overridden[plan.tier.number]
        assert format_bytes(plan.breakdown.total_bytes) in row and row.endswith(", ".join(plan.options))
        assert "no-ckpt" not in row
    assert overridden[1] != plain[1]  # four windows a micro-batch, checkpointed: another prediction


def test_plan_with_a_bad_setting_names_it_and_prints_no_table(tiny_repo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ELITE_TUI_CACHE_DIR", str(tmp_path / "cache"))
    code = main(["plan", "--repo", str(tiny_repo), "--output", str(tmp_path / "runs"), "--set", "micro_batch=-1"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "micro_batch" in err and "invalid settings" in err
    assert not _tier_rows(out)


@pytest.mark.parametrize("command", ["run", "lr-find"])
def test_a_tier_outside_the_table_is_refused_by_the_arguments(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--tier", "9", "--output", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    assert "argument --tier: invalid choice: 9 (choose from 1, 2, 3, 4, 5, 6, 7)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_run_picks_the_tier_that_plan_marks_with_the_same_overrides(tiny_repo, tmp_path, monkeypatch, capsys):
    """An 8B model on an H100 (a fake profile: no GPU here): 4 windows a micro-batch fit a lower tier than 1, and
    `run --set micro_batch=4` must train the tier `plan --set micro_batch=4` marks, not the one planned without it
    (tier 7 at 363 GiB of 78)."""
    from elite_core.config import RunConfig
    from elite_core.hardware import fake_profile
    from elite_core.memory_model import ModelShape
    from elite_tui import cli

    llama_8b = ModelShape(name="Llama-3.1-8B", architecture="llama", hidden=4096, intermediate=14336, layers=32,
                          heads=32, kv_heads=8, head_dim=128, vocab=128256, tied_embeddings=False,
                          max_position_embeddings=131072, total_params=8030261248, known=True)
    monkeypatch.setattr(cli, "_profile_hardware", lambda output, reprofile: fake_profile("h100"))
    monkeypatch.setattr(cli, "_load_shape", lambda model, trust_remote_code: llama_8b)
    where = ["--repo", str(tiny_repo), "--output", str(tmp_path / "runs")]

    def marked(*sets: str) -> int:
        assert main(["plan", *where, *sets]) == 0
        return next(int(line.split()[1]) for line in capsys.readouterr().out.splitlines() if line.startswith(">"))

    assert marked("--set", "micro_batch=4") < marked()
    assert main(["run", *where, "--run-name", "four", "--set", "micro_batch=4", "--set", "device=cuda",
                 "--print-launch"]) == 0
    capsys.readouterr()
    assert RunConfig.load(tmp_path / "runs" / "four" / "config.yaml").tier == marked("--set", "micro_batch=4")
