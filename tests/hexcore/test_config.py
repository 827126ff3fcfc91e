"""Bad deployment files fail at load time with messages that name the replica, the stage and the numbers."""

from __future__ import annotations

import pytest

from hexcore.config import Device, load_config, parse_config
from hexcore.executor.deployment import resolve
from tests.conftest import deployment


def test_yaml_example_from_the_issue_loads(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text("""
model: default
served_model_name: null
dtype: float32
max_model_len: null
replicas:
  - name: r0
    stages:
      - devices: [cpu, cpu]
        layers: 20
      - devices: [cpu]
        layers: 10
server: {host: 127.0.0.1, port: 8000}
""")
    config = load_config(path)
    assert [stage.tp for stage in config.replicas[0].stages] == [2, 1]
    assert config.replicas[0].num_layers == 30


@pytest.mark.parametrize("raw, message", [
    ({"replicas": [{"stages": [{"devices": ["cpu"], "layers": 8}]}], "bogus": 1}, "bogus"),
    ({"replicas": [{"stages": [{"devices": ["cpu"], "layers": 8, "tp": 2}]}]}, "tp"),
    ({"replicas": [{"stages": [{"devices": ["tpu:0"], "layers": 8}]}]}, "unknown device 'tpu:0'"),
    ({"replicas": [{"stages": [{"devices": [], "layers": 8}]}]}, "devices"),
    ({"replicas": [{"stages": [{"devices": ["cpu"], "layers": 0}]}]}, "layers"),
    ({"dtype": "int8"}, "dtype"),
])
def test_schema_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_config(raw)


def test_devices_parse():
    assert Device.parse("nodeA/cuda:3") == Device(node="nodeA", kind="cuda", index=3)
    assert Device.parse("cpu").torch_name == "cpu"
    assert str(Device.parse("cuda")) == "cuda:0"


def test_layers_must_sum_to_the_model(tiny_model_dir):
    config = parse_config(deployment(tiny_model_dir, [(1, 5), (1, 2)]))
    with pytest.raises(ValueError, match=r"replica 'r0': stage layers sum to 7 \(5 \+ 2\) but the model has 8 layers"):
        resolve(config)


def test_tp_must_divide_the_heads(tiny_model_dir):
    config = parse_config(deployment(tiny_model_dir, [(1, 8)], [(1, 4), (3, 4)]))
    with pytest.raises(ValueError, match=r"replica 'r1', stage 1: TP degree 3 does not divide the model's 4 attention heads"):
        resolve(config)


def test_tp_must_divide_the_kv_heads(tiny_model_dir):
    config = parse_config(deployment(tiny_model_dir, [(4, 8)]))
    with pytest.raises(ValueError, match="TP degree 4 does not divide the model's 2 KV heads"):
        resolve(config)


def test_missing_model_directory(tmp_path):
    config = parse_config({"model": str(tmp_path / "nowhere"), "replicas": [{"stages": [{"devices": ["cpu"], "layers": 1}]}]})
    with pytest.raises(ValueError, match="model directory .*nowhere.* not found"):
        resolve(config)


def test_missing_deployment_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "absent.yaml")
