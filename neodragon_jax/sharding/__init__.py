"""Mesh, logical-axis rule sets, activation constraints and sharding checks."""

from neodragon_jax.sharding.checks import ShardingCheckError, ShardingReport, check_sharded, sharding_report
from neodragon_jax.sharding.constraints import activate, active_rules, constrain, use_rules
from neodragon_jax.sharding.mesh import (
    MeshError,
    initialize_distributed,
    make_abstract_mesh,
    make_mesh,
    mesh_devices_needed,
    parse_mesh_shape,
    resolve_mesh_shape,
)
from neodragon_jax.sharding.rules import (
    RULE_SETS,
    RuleSet,
    activation_spec,
    batch_shardings,
    get_rules,
    param_shardings,
    param_specs,
    replicated,
    resolve_spec,
)

__all__ = [
    "MeshError", "RULE_SETS", "RuleSet", "ShardingCheckError", "ShardingReport", "activate", "activation_spec",
    "active_rules", "batch_shardings", "check_sharded", "constrain", "get_rules", "initialize_distributed",
    "make_abstract_mesh", "make_mesh", "mesh_devices_needed", "param_shardings", "param_specs",
    "parse_mesh_shape", "replicated", "resolve_mesh_shape", "resolve_spec", "sharding_report", "use_rules",
]
