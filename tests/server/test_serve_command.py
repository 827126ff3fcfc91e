"""`hexgen serve` argument handling: file values, command-line overrides, the printed deployment."""

from __future__ import annotations

import json

import pytest

from server.cli import build_parser
from server.serve_command import deployment_from_args, describe


@pytest.fixture
def model_dir(tmp_path):
    """Just enough of an HF directory for resolve_model_dir and the layer count."""
    directory = tmp_path / "tiny"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"num_hidden_layers": 5}))
    (directory / "model.safetensors").write_bytes(b"")
    return directory


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_no_config_serves_the_model_whole_on_one_device(model_dir):
    config = deployment_from_args(parse("--model", str(model_dir), "--port", "9001"))
    assert config.model == str(model_dir) and config.server.port == 9001
    assert [[(stage.devices, stage.layers) for stage in replica.stages] for replica in config.replicas] == [[(["cpu"], 5)]]


def test_command_line_overrides_the_file(tmp_path, model_dir):
    path = tmp_path / "deploy.yaml"
    path.write_text(
        "model: elsewhere\n"
        "replicas:\n"
        "  - stages: [{devices: [cpu, cpu], layers: 3}, {devices: [cpu], layers: 2}]\n"
        "server: {host: 0.0.0.0, port: 8100, api_key: from-file}\n"
    )
    config = deployment_from_args(parse("--config", str(path), "--model", str(model_dir), "--port", "9002", "--api-key", "k"))
    assert (config.model, config.server.host, config.server.port, config.server.api_key) == (str(model_dir), "0.0.0.0", 9002, "k")
    assert [stage.tp for stage in config.replicas[0].stages] == [2, 1]
    untouched = deployment_from_args(parse("--config", str(path)))
    assert (untouched.model, untouched.server.port, untouched.server.api_key) == ("elsewhere", 8100, "from-file")


def test_invalid_port_is_a_clean_error(model_dir):
    with pytest.raises(ValueError, match="port"):
        deployment_from_args(parse("--model", str(model_dir), "--port", "70000"))


def test_describe_lists_replicas_stages_tp_layers_and_devices(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(
        "model: /models/m\nserved_model_name: m\n"
        "replicas:\n"
        "  - {name: a, stages: [{devices: [cpu, cpu], layers: 6}, {devices: [cpu], layers: 2}]}\n"
        "  - {name: b, stages: [{devices: [cpu], layers: 8}]}\n"
    )
    text = describe(deployment_from_args(parse("--config", str(path))))
    assert "2 replica(s)" in text
    assert "replica a: 2 stage(s), 3 worker(s)" in text
    assert "stage 0: TP 2, layers 0-5 (6), devices cpu, cpu" in text
    assert "stage 1: TP 1, layers 6-7 (2), devices cpu" in text
    assert "replica b: 1 stage(s)" in text and "stage 0: TP 1, layers 0-7 (8), devices cpu" in text
