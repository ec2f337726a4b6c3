"""The example accelerate configs under configs/accelerate/ parse and name what accelerate needs.

Nothing is launched: each file is read as YAML, checked for the keys `accelerate launch`
reads, and loaded with accelerate's own config class (which rejects unknown keys).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_DIR = ROOT / "configs" / "accelerate"
EXPECTED = {"ddp_8gpu.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "cpu_2proc.yaml"}
CONFIGS = sorted(ACCELERATE_DIR.glob("*.yaml"))


def test_the_example_configs_are_shipped():
    assert EXPECTED <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_has_the_keys_accelerate_expects(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    for key in ("compute_environment", "distributed_type", "num_processes", "mixed_precision"):
        assert key in data, f"{path.name}: missing {key}"
    assert data["compute_environment"] == "LOCAL_MACHINE"
    assert data["distributed_type"] in {t.value for t in DistributedType}
    assert isinstance(data["num_processes"], int) and data["num_processes"] >= 1
    assert data["mixed_precision"] in {"no", "bf16", "fp16"}
    if data["distributed_type"] == "FSDP":
        fsdp = data["fsdp_config"]
        assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_version"] == 1  # the trainer refuses accelerate's FSDP2 (train.fsdp shards both models)
        assert fsdp["fsdp_cpu_ram_efficient_loading"] is False  # the teacher is never wrapped
    if data["distributed_type"] == "DEEPSPEED":
        ds = data["deepspeed_config"]
        assert ds["zero_stage"] in (2, 3)
        assert ds.get("zero3_init_flag") is False  # zero.Init would partition the frozen teacher
    # accelerate's own loader: rejects unknown keys, fills defaults; nothing is launched
    loaded = ClusterConfig.from_yaml_file(str(path))
    assert loaded.num_processes == data["num_processes"]


def test_expected_configs_match_their_names():
    load = {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in CONFIGS}
    assert (load["ddp_8gpu.yaml"]["distributed_type"], load["ddp_8gpu.yaml"]["num_processes"]) == ("MULTI_GPU", 8)
    assert load["ddp_8gpu.yaml"]["mixed_precision"] == "bf16"
    assert load["deepspeed_zero2.yaml"]["deepspeed_config"]["zero_stage"] == 2
    assert load["deepspeed_zero3.yaml"]["deepspeed_config"]["zero_stage"] == 3
    assert load["deepspeed_zero3.yaml"]["deepspeed_config"]["zero3_save_16bit_model"] is True
    # the 2-process CPU config must start two ranks: accelerate's MULTI_GPU launcher does
    # (torch.distributed.run), its --cpu / MULTI_CPU path would start a single process
    cpu = load["cpu_2proc.yaml"]
    assert (cpu["distributed_type"], cpu["num_processes"]) == ("MULTI_GPU", 2)
