"""The job worker: one thread that takes queued jobs from the store, draws compatible ones in one batch
(dynamic batching: whatever compatible work is waiting when the worker is free), publishes live
progress, honours cancellation and deadlines, and writes images + results back.

One worker per process is deliberate: generation is CPU-bound and already uses every core through
torch's threads; scale-out is more processes (or Ray replicas) of the stage services, not threads here.
The worker thread also builds and warms the pipeline, so that it is the only thread of the process that
runs torch ops: each thread that does creates its own OpenMP team, and once a second team exists the
teams stop spin-waiting between ops (more threads than cores) — measured here, the same generation
took 2.5x longer on a second thread than on the only one."""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict

from tessera.pipelines.records import png_info
from tessera.pipelines.text2image import Request as PipelineRequest
from tessera.safety import UnsafePromptError
from tessera.serve.schemas import ImageGenerationRequest
from tessera.serve.store import Store, new_id

log = logging.getLogger("tessera.serve")
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MAX_TRACKED = 10000


class JobAborted(Exception):
    """Every job of the running batch was cancelled or ran past its deadline."""


class Worker:
    def __init__(self, pipeline, store: Store, max_batch: int = 8, max_images: int = 16, poll_s: float = 0.2,
                 preload: tuple[str, ...] = ()):
        """`pipeline`: a TextToImage, or a function that builds one (called on the worker thread)."""
        built = hasattr(pipeline, "run")
        self.pipeline, self._build = (pipeline, None) if built else (None, pipeline)
        self.store, self.preload = store, preload
        self.ready, self.warm_error = False, None
        self.max_batch, self.max_images, self.poll_s = max_batch, max_images, poll_s
        self.events: OrderedDict[str, list[dict]] = OrderedDict()  # job id -> its progress events, in order
        self.cancelled: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.busy_s = 0.0                     # seconds spent running batches (for Retry-After estimates)
        self.jobs_done = 0

    # -- control --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="tessera-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def notify(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Queued: cancelled at once. Running: stops at the next sampling step if its whole batch is
        cancelled, else its images are dropped when the batch ends. False if already finished."""
        if self.store.cancel_queued(job_id):
            self._publish(job_id, stage="cancelled")
            return True
        row = self.store.job(job_id)
        if row is None or row["status"] != "running":
            return False
        self.cancelled.add(job_id)
        return True

    def seconds_per_job(self) -> float:
        return self.busy_s / self.jobs_done if self.jobs_done else 2.0

    # -- loop -----------------------------------------------------------------------------------------------
    def _warm(self) -> None:
        """Build the pipeline if needed; load prompt safety and the preloaded generators (or wait for the
        stage services, which load their own)."""
        if self.pipeline is None:
            self.pipeline = self._build()
        self.pipeline.prepare(PipelineRequest("a red apple"))
        stages = self.pipeline.stages
        if hasattr(stages, "wait_ready"):
            if not stages.wait_ready():
                raise RuntimeError(f"stage services not ready: {stages.ready()}")
        else:
            for p in self.preload:
                stages.loaded(p)

    def _loop(self) -> None:
        if not self.ready:
            try:
                self._warm()
                self.ready = True
            except Exception as e:  # /readyz reports it; queued jobs wait for a restart
                log.exception("warm-up failed")
                self.warm_error = repr(e)
                return
        while not self._stop.is_set():
            jobs = self.store.claim(self.max_batch, self.max_images)
            if not jobs:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            t = time.perf_counter()
            try:
                self._run(jobs)
            except Exception as e:  # never let one batch kill the worker; the jobs fail visibly
                log.exception("batch failed")
                for j in jobs:
                    self.store.finish(j["id"], "failed", error={"code": "internal_error", "message": repr(e)})
            self.busy_s += time.perf_counter() - t
            self.jobs_done += len(jobs)
            for j in jobs:
                self.cancelled.discard(j["id"])
                self._publish(j["id"], stage="done")

    def _publish(self, job_id: str, stage: str, step: int = 0, total: int = 0, eta: float | None = None) -> None:
        """Append a progress event; the events of the last MAX_TRACKED jobs are kept in memory."""
        self.events.setdefault(job_id, []).append({"stage": stage, "step": step, "total": total, "eta": eta})
        self.events.move_to_end(job_id)
        while len(self.events) > MAX_TRACKED:
            self.events.popitem(last=False)

    def progress(self, job_id: str) -> dict | None:
        events = self.events.get(job_id)
        return events[-1] if events else None

    def _run(self, jobs) -> None:
        ids = [j["id"] for j in jobs]
        reqs = [ImageGenerationRequest.model_validate_json(j["request"]) for j in jobs]
        started = {"generate": None}

        def aborted() -> bool:
            now = time.time()
            return all(i in self.cancelled or (j["deadline"] is not None and now > j["deadline"])
                       for i, j in zip(ids, jobs))

        def on_stage(name: str) -> None:
            if aborted():
                raise JobAborted()
            started[name] = time.perf_counter()
            for i in ids:
                self._publish(i, stage=name, step=0, total=0, eta=None)

        def callback(step: int, total: int) -> None:
            if aborted():
                raise JobAborted()
            spent = time.perf_counter() - (started["generate"] or time.perf_counter())
            eta = round(spent / max(step, 1) * (total - step), 3)
            for i in ids:
                self._publish(i, stage="generate", step=step, total=total, eta=eta)

        try:
            results = self.pipeline.run([r.to_pipeline() for r in reqs], callback, on_stage)
        except JobAborted:
            for j in jobs:
                self._finish_aborted(j)
            return
        except Exception as e:  # a stage service down, ...: the batch fails visibly, the server goes on
            log.warning("batch of %d failed: %r", len(jobs), e)
            for i in ids:
                self.store.finish(i, "failed", error={"code": "stage_failed", "message": str(e) or repr(e)})
            return
        for j, req, r in zip(jobs, reqs, results):
            self._store_result(j, req, r)

    def _finish_aborted(self, job) -> None:
        if job["id"] in self.cancelled:
            self.store.finish(job["id"], "cancelled")
        else:
            self.store.finish(job["id"], "failed", error={"code": "deadline_exceeded",
                                                            "message": "the deadline passed while running"})

    def _store_result(self, job, req: ImageGenerationRequest, r) -> None:
        if job["id"] in self.cancelled:
            self.store.finish(job["id"], "cancelled")
        elif isinstance(r, UnsafePromptError):
            self.store.finish(job["id"], "failed", error={
                "code": "content_policy_violation", "param": "prompt", "category": r.verdict.category,
                "message": f"{r} — nothing was generated"})
        elif isinstance(r, Exception):
            self.store.finish(job["id"], "failed", error={"code": "invalid_request", "message": str(r)})
        elif not r.images:  # harm detection withheld every image: an error, never `data: []`
            w = r.withheld[0] if r.withheld else {"category": None, "score": 0.0}
            self.store.finish(job["id"], "failed", error={
                "code": "content_policy_violation", "category": w["category"], "withheld": r.withheld,
                "message": f"every image was withheld by harm detection (category {w['category']!r}, score "
                           f"{w['score']}); nothing was returned"})
        else:
            self.store.finish(job["id"], "succeeded", result=self._save(job["id"], req, r))

    def _save(self, job_id: str, req: ImageGenerationRequest, r) -> dict:
        """Images to disk (PNG with its parameters), rows in the image index -> the job's stored result."""
        rows, record = [], {**r.settings, "revised_prompt": r.revised_prompt, "withheld": r.withheld}
        for idx, im in enumerate(r.images):
            image_id = new_id()
            path = self.store.images_dir / f"{image_id}.{req.output_format}"
            kwargs = ({"pnginfo": png_info(req.prompt, {**record, "index": idx})} if req.output_format == "png"
                      else {"quality": 90})
            im.convert("RGB").save(path, FORMATS[req.output_format], **kwargs)
            rows.append({"id": image_id, "job_id": job_id, "idx": idx, "file": path.name, "format": req.output_format,
                         "prompt": req.prompt, "revised_prompt": r.revised_prompt, "seed": r.seed,
                         "paradigm": r.settings["paradigm"]})
        self.store.add_images(rows)
        return {"created": int(time.time()), "image_ids": [row["id"] for row in rows],
                "revised_prompt": r.revised_prompt, "seed": r.seed, "paradigm": r.settings["paradigm"],
                "model": r.settings["model"], "timings": r.timings, "withheld": r.withheld, "batch": r.batch,
                "settings": json.loads(json.dumps(r.settings, default=str))}
