"""Serving: the gateway (OpenAI-compatible images API, job queue, live progress, auto-complete, feedback,
metrics, web page) and the generation / decoding / super-resolution stage services.

    app.py       the gateway app (create_app, ServeConfig)
    schemas.py   request / response models and limits
    store.py     SQLite: jobs (the queue), image index, feedback
    worker.py    the job worker: dynamic batching, progress, cancel, deadlines
    complete.py  prompt auto-complete
    services.py  the stage services' apps; remote.py calls them by URL; wire.py is what they exchange
    ray_app.py   the same stages as Ray Serve deployments (optional `ray` extra)
"""
