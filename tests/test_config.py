"""Config: files, overrides, and errors that name field, value and what is allowed."""

from __future__ import annotations

import pytest

from greenroom.config import ConfigError, NodeConfig, load_config, sm_disagg_budgets


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert isinstance(cfg, NodeConfig)
    assert cfg.scheduler.max_num_tokens == 8192
    assert cfg.kv.tokens_per_block == 16
    assert cfg.client_address == "tcp://127.0.0.1:7700"


def test_yaml_and_toml_files_with_overrides(tmp_path) -> None:
    y = tmp_path / "node.yaml"
    y.write_text("scheduler:\n  max_num_tokens: 2048\nkv:\n  host_blocks: 64\n")
    cfg = load_config(y, ["scheduler.max_batch_size=8", "kv.host_blocks=128"])
    assert cfg.scheduler.max_num_tokens == 2048
    assert cfg.scheduler.max_batch_size == 8
    assert cfg.kv.host_blocks == 128  # the override wins over the file

    t = tmp_path / "node.toml"
    t.write_text('role = "mixed"\n[sm_disagg]\nenabled = true\ncontext_sm_percent = 0.3\n')
    cfg = load_config(t)
    assert cfg.sm_disagg.enabled and cfg.sm_disagg.context_sm_percent == 0.3


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("scheduler.max_num_tokens=0", ["scheduler.max_num_tokens", "0", ">= 1"]),
        ("sm_disagg.context_sm_percent=1.0", ["sm_disagg.context_sm_percent", "1.0", "< 1.0"]),
        ("sm_disagg.context_sm_percent=0", ["sm_disagg.context_sm_percent", "> 0.0"]),
        ("kv.gpu_memory_utilization=1.5", ["kv.gpu_memory_utilization", "1.5", "<= 1.0"]),
        (
            "scheduler.capacity_policy=greedy",
            ["scheduler.capacity_policy", "greedy", "guaranteed_no_evict"],
        ),
        ("kv.tokens_per_block=12", ["tokens_per_block", "12", "power of two"]),
        (
            "kv.tokens_per_blok=16",
            ["kv.tokens_per_blok", "did you mean 'tokens_per_block'", "host_blocks"],
        ),
        ("modle.path=x", ["modle", "did you mean 'model'", "sections: model, kv"]),
        ("kv=3", ["kv", "3", "object"]),
        ("model.dtype=int4", ["model.dtype", "int4", "bfloat16"]),
    ],
)
def test_invalid_values_name_field_value_and_allowed(override: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_unsupported_combinations_fail_at_load() -> None:
    with pytest.raises(ConfigError, match="host_blocks"):
        load_config(overrides={"sm_disagg.enabled": True, "kv.host_blocks": 8})
    with pytest.raises(ConfigError, match="engine_host"):
        load_config(overrides={"sm_disagg.enabled": True, "engine_host": "process"})
    with pytest.raises(ConfigError, match="sm_disagg.enabled with .*pp_size = 2"):
        load_config(overrides={"parallel.pp_size": 2, "sm_disagg.enabled": True})
    with pytest.raises(ConfigError, match="role = 'context' with .*pp_size = 2"):
        load_config(overrides={"parallel.pp_size": 2, "role": "context"})
    with pytest.raises(ConfigError, match="pp_layers"):
        load_config(overrides={"parallel.pp_size": 2, "parallel.pp_layers": [1, 2, 3]})
    with pytest.raises(ConfigError, match="Helix context parallelism runs with pp_size = 1"):
        load_config(overrides={"parallel.cp_size": 2, "parallel.pp_size": 2})
    assert (
        load_config(overrides={"parallel.cp_size": 2, "parallel.tp_size": 2}).parallel.world_size
        == 4
    )
    with pytest.raises(ConfigError, match="role = 'generation' with .*cp_size = 2"):
        load_config(overrides={"parallel.cp_size": 2, "parallel.tp_size": 2, "role": "generation"})
    assert load_config(overrides={"parallel.cp_size": 2, "kv.host_blocks": 4}).kv.host_blocks == 4
    with pytest.raises(ConfigError, match="role = 'context' with .*cp_size = 2"):
        load_config(overrides={"parallel.cp_size": 2, "role": "context"})
    with pytest.raises(ConfigError, match="role = 'generation' with .*tp_size = 2"):
        load_config(overrides={"parallel.tp_size": 2, "role": "generation"})
    with pytest.raises(ConfigError, match="sm_disagg.enabled"):
        load_config(overrides={"parallel.cp_size": 2, "sm_disagg.enabled": True})
    helix = load_config(overrides={"parallel.cp_size": 4, "role": "generation"})
    assert helix.parallel.world_size == 4
    assert load_config(overrides={"parallel.cp_size": 3}).parallel.world_size == 3


def test_sm_disagg_budgets_inherit_when_not_positive() -> None:
    cfg = load_config(overrides={"scheduler.max_num_tokens": 4096, "scheduler.max_batch_size": 32})
    assert sm_disagg_budgets(cfg) == (4096, 32)
    cfg = load_config(
        overrides={"sm_disagg.context_max_num_tokens": 1024, "sm_disagg.context_max_batch_size": -1}
    )
    assert sm_disagg_budgets(cfg) == (1024, cfg.scheduler.max_batch_size)


def test_bad_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "node.ini"
    bad.write_text("x=1")
    with pytest.raises(ConfigError, match="suffix"):
        load_config(bad)
    broken = tmp_path / "node.yaml"
    broken.write_text("scheduler: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid"):
        load_config(broken)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(overrides=["scheduler.max_num_tokens"])


def test_engine_host_auto_picks_a_process_on_the_gpu_only() -> None:
    cfg = load_config()
    assert cfg.engine_host == "auto"
    assert cfg.resolved_engine_host(cuda_available=True) == "process"
    assert cfg.resolved_engine_host(cuda_available=False) == "thread"
    cpu = load_config(overrides={"model.device": "cpu"})
    assert cpu.resolved_engine_host(cuda_available=True) == "thread"
    sm = load_config(overrides={"sm_disagg.enabled": True})
    assert sm.resolved_engine_host(cuda_available=True) == "thread"
    pinned = load_config(overrides={"engine_host": "thread"})
    assert pinned.resolved_engine_host(cuda_available=True) == "thread"


def test_unknown_names_in_a_file_name_the_valid_ones(tmp_path) -> None:
    y = tmp_path / "node.yaml"
    y.write_text("schedular:\n  max_num_tokens: 2048\n")
    with pytest.raises(ConfigError, match="did you mean 'scheduler'") as err:
        load_config(y)
    assert "sm_disagg" in str(err.value)  # every valid section is listed
    y.write_text("scheduler:\n  max_num_token: 2048\n")
    with pytest.raises(ConfigError, match="scheduler.max_num_token is not") as err:
        load_config(y)
    assert "did you mean 'max_num_tokens'" in str(err.value)
    y.write_text("kv:\n  zzz: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(y)
    assert "did you mean" not in str(err.value) and "tokens_per_block" in str(err.value)


def test_sm_disagg_routing_fields() -> None:
    sd = load_config(overrides={"sm_disagg.enabled": True}).sm_disagg
    assert sd.policy == "adaptive" and sd.routing_threshold_tokens == 0  # 0: measured at start
    assert sd.generation_whole_gpu_when_idle == "auto" and sd.whole_gpu_when_idle
    fixed = load_config(overrides={"sm_disagg.policy": "fixed"}).sm_disagg
    assert not fixed.whole_gpu_when_idle
    pinned = load_config(
        overrides={"sm_disagg.policy": "fixed", "sm_disagg.generation_whole_gpu_when_idle": True}
    ).sm_disagg
    assert pinned.whole_gpu_when_idle
    assert (
        load_config(
            overrides=["sm_disagg.routing_threshold_tokens=512"]
        ).sm_disagg.routing_threshold_tokens
        == 512
    )
    assert sd.ride_knee_multiple == 8.0 and sd.ride_when_generation_idle is True
    with pytest.raises(ConfigError, match="sm_disagg.ride_knee_multiple = 0.5 is invalid"):
        load_config(overrides={"sm_disagg.ride_knee_multiple": 0.5})
    with pytest.raises(ConfigError, match="sm_disagg.policy = 'auto' is invalid.*adaptive"):
        load_config(overrides={"sm_disagg.policy": "auto"})
    with pytest.raises(ConfigError, match="sm_disagg.routing_threshold_tokens = -1 is invalid"):
        load_config(overrides={"sm_disagg.routing_threshold_tokens": -1})
    with pytest.raises(ConfigError, match="generation_whole_gpu_when_idle = 'yes' is invalid"):
        load_config(overrides={"sm_disagg.generation_whole_gpu_when_idle": "yes"})


def test_scheduler_routing_from_the_config() -> None:
    from greenroom.actors.scheduler import prompt_routing

    assert prompt_routing(load_config()) is None  # mixed mode
    on = {"sm_disagg.enabled": True}
    r = prompt_routing(load_config(overrides={**on, "sm_disagg.routing_threshold_tokens": 300}))
    assert r.adaptive and r.threshold_tokens == 300
    assert not prompt_routing(load_config(overrides={**on, "sm_disagg.policy": "fixed"})).adaptive
    with pytest.raises(ValueError, match="measures it at start"):
        prompt_routing(load_config(overrides=on))
