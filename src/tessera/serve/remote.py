"""Stages that call the stage services by URL (serve/services.py), with LocalStages' signatures; a stage
without a URL runs in this process. A service that is down or answers 5xx raises StageError: the job
fails visibly with the service named, and the gateway goes on serving."""
from __future__ import annotations

import base64
import json
import time

import httpx

from tessera.pipelines.text2image import LocalStages
from tessera.serve.services import STAGES
from tessera.serve.wire import images_to_tensor, pack, tensor_to_images, unpack


class StageError(RuntimeError):
    pass


class RemoteStages:
    def __init__(self, urls: dict[str, str], local: LocalStages | None = None, timeout_s: float = 600.0,
                 api_key: str | None = None):
        unknown = set(urls) - set(STAGES)
        if unknown:
            raise ValueError(f"stage URLs {sorted(unknown)}: stages are {STAGES}")
        self.urls = {k: v.rstrip("/") for k, v in urls.items() if v}
        self.local = local or LocalStages()
        self.timeout = httpx.Timeout(timeout_s, connect=5.0)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.models, self.sr_model = self.local.models, self.local.sr_model

    def _post(self, stage: str, path: str, **kw) -> httpx.Response:
        url = f"{self.urls[stage]}{path}"
        try:
            r = httpx.post(url, timeout=self.timeout, headers=self.headers, **kw)
        except httpx.HTTPError as e:
            raise StageError(f"the {stage} service at {self.urls[stage]} failed: {e!r}") from e
        _raise_for(stage, self.urls[stage], r)
        return r

    def generate(self, paradigm: str, prompts: list[str], settings: dict, callback=None):
        if "generation" not in self.urls:
            return self.local.generate(paradigm, prompts, settings, callback)
        url = self.urls["generation"]
        body = {"paradigm": paradigm, "prompts": prompts, "settings": settings}
        try:
            with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=self.timeout,
                              headers=self.headers) as r:
                if r.status_code != 200:
                    r.read()
                    _raise_for("generation", url, r)
                return consume_generation(r.iter_lines(), callback, f"the generation service at {url}")
        except httpx.HTTPError as e:
            raise StageError(f"the generation service at {url} failed: {e!r}") from e

    def decode(self, paradigm: str, out):
        if "decoding" not in self.urls:
            return self.local.decode(paradigm, out)
        r = self._post("decoding", "/v1/decode", params={"paradigm": paradigm}, content=pack({"out": out}))
        return tensor_to_images(unpack(r.content)[0]["images"])

    def upscale(self, images, size: int):
        if "superres" not in self.urls:
            return self.local.upscale(images, size)
        if not images or not size or all(im.size == (size, size) for im in images):
            return images
        body = pack({"images": images_to_tensor(images)})
        r = self._post("superres", "/v1/upscale", params={"size": size}, content=body)
        return tensor_to_images(unpack(r.content)[0]["images"])

    def ready(self) -> dict[str, bool]:
        """Each remote service's /readyz."""
        out = {}
        for stage, url in self.urls.items():
            try:
                out[stage] = httpx.get(f"{url}/readyz", timeout=2.0, headers=self.headers).status_code == 200
            except httpx.HTTPError:
                out[stage] = False
        return out

    def wait_ready(self, timeout_s: float = 120.0) -> bool:
        end = time.time() + timeout_s
        while time.time() < end:
            if all(self.ready().values()):
                return True
            time.sleep(0.5)
        return False


def consume_generation(lines, callback, where: str):
    """Read the generation stream (services.generate_stream): progress to `callback`, then the result."""
    for line in lines:
        item = json.loads(line)
        if "step" in item:
            if callback is not None:
                callback(item["step"], item["total"])
        elif "error" in item:
            err = item["error"]
            if err["type"] == "invalid_request":
                raise ValueError(err["message"])
            raise StageError(f"{where} failed: {err['message']}")
        else:
            tensors, _ = unpack(base64.b64decode(item["tensor"]))
            return tensors["out"], item["params"]
    raise StageError(f"{where} closed the stream without a result")


def _raise_for(stage: str, url: str, r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    detail = r.text[:500]
    if r.status_code < 500 and r.status_code not in (408, 429):
        raise ValueError(f"the {stage} service rejected the request ({r.status_code}): {detail}")
    raise StageError(f"the {stage} service at {url} answered {r.status_code}: {detail}")
