"""Fuzzing: schemathesis against the gateway's OpenAPI spec over real HTTP (no 5xx on any operation, valid
or not), and hypothesis on the request model (whatever it accepts, the pipeline accepts).

The fuzzed server runs the real gateway, job queue, prompt safety and harm detection; its generation /
decoding / SR stages are a fast test double (plain images), because thousands of requests through the
real generators would take hours on 2 cores. The real stages are exercised in test_serve.py."""
import httpx
import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis.checks import not_a_server_error
from test_serve import uvicorn_server

from tessera.pipelines.text2image import DEFAULT_MODELS, TextToImage
from tessera.serve.app import ServeConfig, create_app
from tessera.serve.schemas import ImageGenerationRequest


class PlainStages:
    """Stand-in for LocalStages: one flat-colour 128 px image per prompt."""
    models, sr_model = dict(DEFAULT_MODELS), "plain"

    def generate(self, paradigm, prompts, settings, callback=None):
        import torch
        for i in range(3):
            if callback:
                callback(i + 1, 3)
        return torch.full((len(prompts), 3), 0.5), {"model": self.models[paradigm], **settings}

    def decode(self, paradigm, out):
        return [Image.new("RGB", (128, 128), (200, 120, 40)) for _ in range(len(out))]

    def upscale(self, images, size):
        return [im.resize((size, size)) for im in images] if size else images

    def loaded(self, paradigm):
        return None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    app = create_app(ServeConfig(data_dir=str(tmp_path_factory.mktemp("fuzz")), max_queue=1000),
                     TextToImage(stages=PlainStages()))
    with uvicorn_server(app) as url:
        yield url


def test_no_server_errors(served):
    """Every operation of the spec, positive and negative cases (schemathesis' defaults), over HTTP."""
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/images/generations", "/v1/jobs/{job_id}", "/v1/feedback"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            case.call_and_validate(base_url=served, checks=[not_a_server_error], timeout=60)

        run()
    jobs = httpx.get(f"{served}/v1/metrics").json()["jobs"]
    assert jobs["succeeded"] >= 5, jobs  # valid requests went all the way through, not only rejections


@given(st.builds(ImageGenerationRequest, prompt=st.text(min_size=1, max_size=300).filter(str.strip),
                 model=st.none() | st.sampled_from(["ar", "masked", "diffusion", *DEFAULT_MODELS.values()])))
@settings(max_examples=300, deadline=None)
def test_every_accepted_request_is_one_the_pipeline_accepts(req):
    try:
        pipe_req = req.to_pipeline()
    except ValueError as e:  # the one cross-field rule of the API: model and paradigm must agree
        assert "does not match paradigm" in str(e)
        return
    pipe_req.validate()  # raises if the API let through something the pipeline rejects (-> 400, not 5xx)
