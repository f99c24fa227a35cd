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
    plain = _tier_rows(capsys.readouterr().out)
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
