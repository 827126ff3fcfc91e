"""End to end, the edge in front of real workers: a real `hexgen serve` process on the tiny random
Llama. A stop token id past the vocabulary (which once raised an IndexError in the worker's sampler
and killed the engine) is a 400 naming it, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest
import yaml

from hexcore.executor.ports import free_port
from server.serve_process import ServeProcess
from tests.conftest import deployment

API_KEY = "edge-key"


@pytest.mark.slow
def test_out_of_vocabulary_stop_token_id_is_400_and_the_next_request_succeeds(tiny_model_dir, tmp_path):
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump(deployment(tiny_model_dir, [(1, 8)])))
    server = ServeProcess(config, free_port(), "--api-key", API_KEY, "--log-level", "warning")
    url = server.url
    try:
        server.wait_healthy()
        model = httpx.get(f"{url}/v1/models", headers={"Authorization": f"bearer {API_KEY}"}).json()["data"][0]["id"]
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"model": model, "prompt": "hi", "stop_token_ids": [1_000_000_000], "min_tokens": 1, "max_tokens": 4}

        response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "stop_token_ids"
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code == 401  # no key: no look

        good = {"model": model, "prompt": "hi", "max_tokens": 4, "temperature": 0, "stop_token_ids": [0], "min_tokens": 1}
        response = httpx.post(f"{url}/v1/completions", json=good, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'hexgen_requests_rejected_total{reason="invalid_request"} 1.0' in metrics
        assert 'hexgen_requests_rejected_total{reason="unauthorized"} 1.0' in metrics
        assert 'finish_reason="abort",replica="unknown"' not in metrics
        assert server.process.poll() is None
    finally:
        server.stop()
    assert "Traceback" not in server.output, server.output
