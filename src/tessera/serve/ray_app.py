"""The three stage services as Ray Serve deployments (optional extra: `pip install 'tessera[ray]'`).

    tessera serve --ray --replicas 2,1,1

runs the gateway as usual, with generation, decoding and super-resolution as three Ray Serve
applications, each with its own `num_replicas`, `max_ongoing_requests` per replica and
`max_queued_requests` (backpressure: a call beyond the queue raises BackPressureError at once instead of
waiting). The gateway calls them through DeploymentHandles with LocalStages' signatures (RayStages);
generation streams its progress back. Tensors and images cross as safetensors bytes, as over HTTP.
Ray's dashboard and Serve's HTTP proxy stay off: the gateway is the only HTTP entry point."""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

from tessera.pipelines.text2image import LocalStages, TextToImage
from tessera.serve.remote import StageError, consume_generation
from tessera.serve.services import GenerateRequest, generate_stream
from tessera.serve.wire import images_to_tensor, pack, tensor_to_images, unpack

APPS = {"generation": "tessera-generation", "decoding": "tessera-decoding", "superres": "tessera-superres"}


class GenerationReplica:
    def __init__(self, models: dict | None = None, preload: tuple[str, ...] = ()):
        self.stages, self.torch_thread = LocalStages(models), ThreadPoolExecutor(1)
        for p in preload:
            self.stages.loaded(p)

    def generate(self, paradigm: str, prompts: list[str], settings: dict):
        """A generator: the same NDJSON lines as the HTTP generation service (progress, then the result)."""
        req = GenerateRequest(paradigm=paradigm, prompts=prompts, settings=settings)
        yield from generate_stream(self.stages, self.torch_thread, req)


class DecodingReplica:
    def __init__(self, models: dict | None = None, preload: tuple[str, ...] = ()):
        self.stages = LocalStages(models)
        for p in preload:
            self.stages.loaded(p)

    def decode(self, paradigm: str, packed: bytes) -> bytes:
        return pack({"images": images_to_tensor(self.stages.decode(paradigm, unpack(packed)[0]["out"]))})


class SuperresReplica:
    def __init__(self, models: dict | None = None):
        self.stages = LocalStages(models)

    def upscale(self, packed: bytes, size: int) -> bytes:
        images = tensor_to_images(unpack(packed)[0]["images"])
        return pack({"images": images_to_tensor(self.stages.upscale(images, size))})


def deploy(replicas: tuple[int, int, int] = (1, 1, 1), max_ongoing: int = 2, max_queued: int = 8,
           models: dict | None = None, preload: tuple[str, ...] = ("diffusion",), num_cpus: int | None = None):
    """Start Ray (if needed, dashboard off) and Serve (proxy off); deploy the three stages -> their handles."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    handles = {}
    for (stage, cls), n in zip((("generation", GenerationReplica), ("decoding", DecodingReplica),
                                ("superres", SuperresReplica)), replicas):
        dep = serve.deployment(cls, name=cls.__name__, num_replicas=n, max_ongoing_requests=max_ongoing,
                               max_queued_requests=max_queued, ray_actor_options={"num_cpus": 0})
        app = dep.bind(models) if stage == "superres" else dep.bind(models, preload)
        handles[stage] = serve.run(app, name=APPS[stage], route_prefix=None)
    return handles


class RayStages:
    """LocalStages' three methods over Ray Serve handles."""

    def __init__(self, handles: dict, models: dict | None = None, timeout_s: float = 600.0):
        self.handles, self.timeout_s = handles, timeout_s
        self.local = LocalStages(models)
        self.models, self.sr_model = self.local.models, self.local.sr_model

    def _call(self, stage: str, method: str, *args):
        from ray.serve.exceptions import BackPressureError

        try:
            return getattr(self.handles[stage], method).remote(*args).result(timeout_s=self.timeout_s)
        except BackPressureError as e:
            raise StageError(f"the {stage} deployment is at capacity: {e}") from e
        except Exception as e:
            raise StageError(f"the {stage} deployment failed: {e!r}") from e

    def generate(self, paradigm: str, prompts: list[str], settings: dict, callback=None):
        from ray.serve.exceptions import BackPressureError

        stream = self.handles["generation"].options(stream=True).generate.remote(paradigm, prompts, settings)
        try:
            return consume_generation(stream, callback, "the generation deployment")
        except (ValueError, StageError):
            raise
        except BackPressureError as e:
            raise StageError(f"the generation deployment is at capacity: {e}") from e
        except Exception as e:  # a replica died, ...
            raise StageError(f"the generation deployment failed: {e!r}") from e

    def wait_ready(self, timeout_s: float = 0) -> bool:
        return True  # serve.run returned: every replica is up and has loaded its models

    def decode(self, paradigm: str, out):
        return tensor_to_images(unpack(self._call("decoding", "decode", paradigm, pack({"out": out})))[0]["images"])

    def upscale(self, images, size: int):
        if not images or not size or all(im.size == (size, size) for im in images):
            return images
        packed = self._call("superres", "upscale", pack({"images": images_to_tensor(images)}), size)
        return tensor_to_images(unpack(packed)[0]["images"])


def ray_pipeline(generation: int = 1, decoding: int = 1, superres: int = 1, **kw):
    """Deploy the stages; -> a function that builds the gateway's pipeline over them (prompt / image
    safety stay in the gateway), for create_app to call on its worker thread."""
    return functools.partial(TextToImage, stages=RayStages(deploy((generation, decoding, superres), **kw)))
