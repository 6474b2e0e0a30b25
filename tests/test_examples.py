"""Every example config in the repository parses and names only known settings."""

from __future__ import annotations

from pathlib import Path

import yaml

from ftrecycle.recycle import ChainSpec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_chain_example_loads():
    spec = ChainSpec.load(EXAMPLES / "chain.yaml")
    assert len(spec.versions) == 3 and spec.mode == "iterative" and spec.finetune.max_steps == 400


def test_accelerate_examples_are_valid_accelerate_configs():
    from accelerate.commands.config.config_args import ClusterConfig

    for name, kind in (("fsdp.yaml", "FSDP"), ("deepspeed_zero3.yaml", "DEEPSPEED")):
        raw = yaml.safe_load((EXAMPLES / "accelerate" / name).read_text())
        cfg = ClusterConfig.from_yaml_file(str(EXAMPLES / "accelerate" / name))
        assert str(cfg.distributed_type).endswith(kind) and raw["mixed_precision"] == "bf16"
