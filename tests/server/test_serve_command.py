"""`hexgen serve` argument handling: file values and command-line overrides."""

from __future__ import annotations

import json
import socket

import pytest

from server.entrypoint import build_parser, main
from server.serve_command import deployment_from_args


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


def test_layout_that_does_not_fit_the_model_fails_before_serving(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "deploy.yaml"
    path.write_text(f"model: {tiny_model_dir}\nreplicas:\n  - stages: [{{devices: [cpu], layers: 7}}]\n")
    assert main(["serve", "--config", str(path), "--port", "0"]) == 2
    assert "stage layers sum to 7" in capsys.readouterr().err


def test_port_in_use_is_a_clean_error(tiny_model_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny_model_dir), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
