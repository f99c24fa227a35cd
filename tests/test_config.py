import pytest

from elite_core.config import ConfigError, RunConfig, default_config, parse_field, validation_errors
from elite_core.tiers import TIERS


def test_yaml_round_trip_keeps_every_field(tmp_path):
    config = default_config(repo="/some/repo", output_dir=str(tmp_path), run_name="r1").with_tier(4)
    config = config.replace(lora_target_modules=("q_proj", "v_proj"), adamw_8bit=True, learning_rate=1.5e-4)
    path = tmp_path / "config.yaml"
    config.save(path)
    assert RunConfig.load(path) == config


def test_with_tier_takes_the_tiers_windows_and_rank():
    for tier in TIERS:
        config = RunConfig().with_tier(tier.number)
        assert (config.context_tokens, config.target_tokens, config.lora_rank) == (
            tier.context_tokens, tier.target_tokens, tier.default_lora_rank)
        assert config.window_tokens == tier.total_tokens
    assert [t.default_lora_rank for t in TIERS] == [48, 32, 24, 12, 8, 8, 6]


def test_every_invalid_field_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        RunConfig(lora_rank=0, learning_rate=-1.0, precision="int3", run_name="a/b")
    assert set(caught.value.errors) == {"lora_rank", "learning_rate", "precision", "run_name"}


def test_nodes_must_split_the_processes_evenly():
    assert RunConfig(gpus=16, nodes=2).nodes == 2
    for gpus, nodes in ((3, 2), (2, 4), (2, 0)):
        with pytest.raises(ConfigError) as caught:
            RunConfig(gpus=gpus, nodes=nodes)
        assert set(caught.value.errors) == {"nodes"}


def test_wrong_types_from_yaml_are_named():
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_yaml("lora_rank: sixteen\nadamw_8bit: 3\n")
    assert "lora_rank" in caught.value.errors and "adamw_8bit" in caught.value.errors


def test_unknown_settings_are_rejected():
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_yaml("lora_rnak: 8\n")
    assert caught.value.errors == {"lora_rnak": "unknown setting"}


def test_broken_yaml_is_one_line_that_says_where(tmp_path, capsys):
    from elite_tui.cli import main

    with pytest.raises(ConfigError) as caught:
        RunConfig.from_yaml("model: demo\n  bad: [\n")
    assert caught.value.errors == {"config": "not valid YAML at line 2, column 6: mapping values are not allowed here"}
    broken = tmp_path / "run.yaml"
    broken.write_text("model: demo\n  bad: [\n")
    assert main(["run", "--config", str(broken)]) == 2
    assert "config: not valid YAML at line 2, column 6" in capsys.readouterr().err


def test_parse_field_turns_typed_text_into_values():
    assert parse_field("micro_batch", " 4 ") == 4
    assert parse_field("context_tokens", "32,768") == 32768
    assert parse_field("learning_rate", "3e-4") == pytest.approx(3e-4)
    assert parse_field("adamw_8bit", "yes") is True
    assert parse_field("lora_target_modules", "q_proj, v_proj") == ("q_proj", "v_proj")
    with pytest.raises(ConfigError) as caught:
        parse_field("micro_batch", "two")
    assert "micro_batch" in caught.value.errors


def test_demo_defaults_train_lora_alone_as_a_users_run_does():
    config = default_config()
    assert config.is_demo and config.extra_trainable_modules == ()
    assert validation_errors(config) == {}


def test_a_short_run_evaluates_often_enough_for_a_held_out_curve():
    config = RunConfig(eval_every_steps=50, min_evaluations=5)
    assert config.eval_interval(10_000) == 50  # long runs: every eval_every_steps
    assert config.eval_interval(56) == 11  # 8 epochs of 7 steps: 5 evaluations, not 1
    assert config.eval_interval(3) == 1
    assert config.replace(min_evaluations=0).eval_interval(56) == 50
    assert config.replace(eval_every_steps=0).eval_interval(56) == 0  # never stays never
