"""Generation, decoding and super-resolution as three separate processes (`tessera serve STAGE`) behind the
gateway; killing the decoding service mid-request fails that job visibly and the gateway keeps serving."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from test_serve import FAST, decode_b64, wait_done

from conftest import free_port
from tessera.serve.app import ServeConfig, create_app


def start_service(stage: str, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tessera.cli", "serve", stage, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"{url} exited: {proc.stderr.read().decode()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready")


@pytest.fixture(scope="module")
def services():
    procs = {}
    try:
        for stage in ("generation", "decoding", "superres"):
            port = free_port()
            procs[stage] = (start_service(stage, port), port)
        for stage, (proc, port) in procs.items():
            wait_ready(f"http://127.0.0.1:{port}", proc)
        yield procs
    finally:
        for proc, _ in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_three_services_behind_the_gateway_and_a_killed_decoder(tmp_path, services):
    urls = {stage: f"http://127.0.0.1:{port}" for stage, (_, port) in services.items()}
    app = create_app(ServeConfig(data_dir=str(tmp_path / "serve"), stage_urls=urls, preload=()))
    with TestClient(app) as c:
        end = time.time() + 120
        while c.get("/readyz").status_code != 200 and time.time() < end:
            time.sleep(0.2)
        # every stage remote: the generation service streams its steps back, SR makes 256 px
        r = c.post("/v1/images/generations", json={"prompt": "grinning face emoji", "size": "256x256", "steps": 4,
                                                    "seed": 1, "n": 2})
        assert r.status_code == 200, r.text
        assert [decode_b64(d).size for d in r.json()["data"]] == [(256, 256)] * 2
        assert r.json()["tessera"]["model"] == "unet-xs"

        # kill the decoding service while a job is generating
        job = c.post("/v1/images/generations", json={"prompt": "red apple emoji", **FAST, "steps": 60},
                     headers={"Prefer": "respond-async"}).json()
        while (c.get(f"/v1/jobs/{job['id']}").json().get("progress") or {}).get("stage") != "generate":
            time.sleep(0.02)
        decoder, _ = services["decoding"]
        os.killpg(decoder.pid, signal.SIGKILL)
        decoder.wait()
        done = wait_done(c, job["id"])
        assert done["status"] == "failed" and done["error"]["code"] == "stage_failed"
        assert "decoding service" in done["error"]["message"]
        # the gateway goes on: health, metrics, and a sync request that fails visibly with 502
        assert c.get("/healthz").status_code == 200
        assert c.get("/v1/metrics").json()["jobs"]["failed"] == 1
        r = c.post("/v1/images/generations", json={"prompt": "snowman emoji", **FAST})
        assert r.status_code == 502 and "decoding service" in r.json()["error"]["message"]
        # a decoding service back on the same port: requests succeed again
        port = services["decoding"][1]
        services["decoding"] = (start_service("decoding", port), port)
        wait_ready(urls["decoding"], services["decoding"][0])
        r = c.post("/v1/images/generations", json={"prompt": "snowman emoji", **FAST})
        assert r.status_code == 200 and decode_b64(r.json()["data"][0]).size == (128, 128)


def test_stage_services_reject_malformed_bodies(services):
    url = f"http://127.0.0.1:{services['superres'][1]}"
    r = httpx.post(f"{url}/v1/upscale", params={"size": 256}, content=b"not safetensors")
    assert r.status_code == 400 and "safetensors" in r.text
    r = httpx.post(f"{url}/v1/upscale", params={"size": 99999}, content=b"x")
    assert r.status_code == 422
    gen = f"http://127.0.0.1:{services['generation'][1]}"
    r = httpx.post(f"{gen}/v1/generate", json={"paradigm": "gan", "prompts": ["a"]})
    assert r.status_code == 422


def test_tessera_serve_command_end_to_end(tmp_path):
    """The gateway as users start it: `tessera serve --port P --data-dir D`, then one request over HTTP."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "tessera.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp_path / "serve"), "--max-batch", "4", "--public-url", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_ready(url, proc)
        r = httpx.post(f"{url}/v1/images/generations", timeout=120,
                       json={"prompt": "sunflower emoji", "size": "256x256", "steps": 3, "response_format": "url", "seed": 2})
        assert r.status_code == 200, r.text
        image = httpx.get(r.json()["data"][0]["url"], timeout=30)  # absolute: from --public-url
        assert image.headers["content-type"] == "image/png" and image.content.startswith(b"\x89PNG")
        assert httpx.get(f"{url}/", timeout=10).text.startswith("<!doctype html>")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert (tmp_path / "serve" / "serve.sqlite").is_file() and len(list((tmp_path / "serve" / "images").iterdir())) == 1


def test_a_stage_service_with_a_key_refuses_requests_without_it(tmp_path):
    """`tessera serve generation --api-key K`: 401 without K on every route; with K, the stage validates its
    settings by the gateway's limits; a gateway with the same key drives it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tessera.cli", "serve", "generation", "--port", str(port),
                             "--api-key", "stage-key-1", "--preload", "masked"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url, key = f"http://127.0.0.1:{port}", {"Authorization": "Bearer stage-key-1"}
    try:
        end = time.time() + 120
        while time.time() < end and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", headers=key, timeout=1).status_code == 200:
                    break
            time.sleep(0.3)
        body = {"paradigm": "masked", "prompts": ["a cat"], "settings": {"steps": 2}}
        assert httpx.post(f"{url}/v1/generate", json=body, timeout=30).status_code == 401
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 401
        wrong = {"Authorization": "Bearer stage-key-2"}
        assert httpx.post(f"{url}/v1/generate", json=body, headers=wrong, timeout=30).status_code == 401
        for bad in ({"steps": 10**6}, {"evil": 1}, {"cfg_scale": 1e9}):
            r = httpx.post(f"{url}/v1/generate", json={**body, "settings": bad}, headers=key, timeout=30)
            assert r.status_code == 422, (bad, r.text)
        r = httpx.post(f"{url}/v1/generate", json={**body, "prompts": ["a cat"] * 33}, headers=key, timeout=30)
        assert r.status_code == 422
        app = create_app(ServeConfig(data_dir=str(tmp_path / "serve"), stage_urls={"generation": url}, preload=(),
                                     api_keys=("stage-key-1",)))
        with TestClient(app) as c:
            r = c.post("/v1/images/generations", headers=key,
                       json={"prompt": "a red apple", "paradigm": "masked", "size": "128x128", "steps": 2, "seed": 1})
            assert r.status_code == 200, r.text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
