import dataclasses
import json

import numpy as np
import pytest
import torch.nn as nn

import flexlora
from flexlora import FlexLoRAConfig


def test_defaults_are_valid_and_roundtrip_json():
    c = FlexLoRAConfig()
    assert c.r_init <= c.r_max and c.scaling == c.alpha / c.r_init
    d = json.loads(json.dumps(c.to_dict()))
    assert FlexLoRAConfig.from_dict(d) == c


def test_every_field_has_help():
    for f in dataclasses.fields(FlexLoRAConfig):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(r_init=9, r_max=8), "r_init"),
        (dict(r_max=0, r_init=0), "r_max"),
        (dict(r_max=2.5), "r_max"),
        (dict(alpha=0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(init_std=0.0), "init_std"),
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules=""), "target_modules"),
        (dict(r_min=5, r_init=4), "r_min"),
        (dict(total_steps=0), "total_steps"),
        (dict(t_warmup=800, t_final=200, total_steps=1000), "t_warmup"),
        (dict(delta_t=0), "delta_t"),
        (dict(b0=-1), "b0"),
        (dict(schedule="linear"), "schedule"),
        (dict(importance="magic"), "importance"),
        (dict(allocation_mode="grow"), "allocation_mode"),
        (dict(expand_init="ones"), "expand_init"),
        (dict(orth_reg=-0.1), "orth_reg"),
        (dict(sensitivity_beta=1.0), "sensitivity_beta"),
        (dict(entropy_eps=0.0), "entropy_eps"),
        (dict(alpha=float("inf")), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(alpha=1e39, r_init=2, r_max=4), "alpha"),  # s = alpha / r_init is inf in float32
        (dict(init_std=float("nan")), "init_std"),
        (dict(init_std=float("inf")), "init_std"),
        (dict(orth_reg=float("inf")), "orth_reg"),
        (dict(entropy_eps=float("inf")), "entropy_eps"),
        (dict(total_steps=100, t_warmup=10, t_final=150), "t_final"),  # t_final's fault, not t_warmup's
        (dict(total_steps=100, t_final=100, t_warmup=0), "t_final"),
        (dict(r_max=np.bool_(True)), "r_max"),
        (dict(alpha=True), "alpha"),
        (dict(target_modules=None), "target_modules"),
        (dict(target_modules=5), "target_modules"),
        (dict(target_modules="("), "target_modules"),
        (dict(modules_to_save=3), "modules_to_save"),
        (dict(modules_to_save=[""]), "modules_to_save"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_fields_name_the_field_and_range(kwargs, field):
    with pytest.raises(ValueError, match=rf"FlexLoRAConfig\.{field} must be"):
        FlexLoRAConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown fields.*'rank'"):
        FlexLoRAConfig.from_dict({"rank": 8})


def test_zero_initial_rank_scaling_is_alpha():
    c = FlexLoRAConfig(r_init=0, r_min=0, alpha=4.0)
    assert c.scaling == 4.0


def test_bad_regex_is_reported_at_config_time():
    # wrap would otherwise fail later with a bare re.error naming no field
    with pytest.raises(ValueError, match=r"FlexLoRAConfig\.target_modules must be a valid regex.*got '\('"):
        FlexLoRAConfig(target_modules="(")


def test_modules_to_save_none_means_none():
    assert FlexLoRAConfig(modules_to_save=None).modules_to_save == ()


def test_r_init_zero_alone_says_to_set_r_min():
    # r_min defaults to 1, so the user who only set r_init=0 must be told which field to change
    with pytest.raises(ValueError, match=r"FlexLoRAConfig\.r_min must be .*with r_init=0 set r_min=0"):
        FlexLoRAConfig(r_init=0)


def test_numpy_scalars_are_accepted_as_python_numbers():
    # the message said "must be an int >= 1, got np.int64(16)"
    c = FlexLoRAConfig(r_max=np.int64(16), r_init=np.int32(4), alpha=np.float32(8.0), total_steps=np.int64(500),
                       orth_reg=np.float64(0.05), seed=np.uint8(3))
    assert (c.r_max, c.r_init, c.alpha, c.total_steps, c.orth_reg, c.seed) == (16, 4, 8.0, 500, 0.05, 3)
    assert all(type(v) in (int, float) for v in (c.r_max, c.r_init, c.alpha, c.total_steps, c.orth_reg, c.seed))
    assert json.loads(json.dumps(c.to_dict()))["r_max"] == 16


@pytest.mark.parametrize(
    "field, value",
    [("r_min", -3), ("expand_init", "orthogonl"), ("total_steps", 30.5), ("delta_t", 0), ("orth_reg", -1.0),
     ("schedule", "linear")],
)
def test_fields_changed_after_construction_are_checked_before_use(field, value):
    # before: wrap and RankAllocator trusted the fields, so r_min=-3 pruned a module to rank 0 and a
    # misspelt expand_init silently fell back to zero_impact
    cfg = FlexLoRAConfig(r_init=2, r_max=4, target_modules=["0", "1"], total_steps=30, t_warmup=2, t_final=4,
                         delta_t=2, b0=1)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=rf"FlexLoRAConfig\.{field} must be"):
        flexlora.wrap(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), cfg)
    cfg2 = FlexLoRAConfig(r_init=2, r_max=4, target_modules=["0", "1"], total_steps=30, t_warmup=2, t_final=4,
                          delta_t=2, b0=1)
    model = flexlora.wrap(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), cfg2)
    allocator = flexlora.RankAllocator(model)
    allocator.step(1)
    setattr(cfg2, field, value)  # mid-run
    with pytest.raises(ValueError, match=rf"FlexLoRAConfig\.{field} must be"):
        allocator.step(2)
    assert allocator.ranks() == {"0": 2, "1": 2}
    with pytest.raises(ValueError, match=rf"FlexLoRAConfig\.{field} must be"):
        flexlora.RankAllocator(model)
