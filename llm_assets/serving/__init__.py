"""Serving: an OpenAI-compatible HTTP server over a batching generation engine.

    app = create_app(store.local_dir(sha), sha, ServeConfig(api_key="..."))  # a Starlette app
    serve(model_dir, sha, host="127.0.0.1", port=8000, config=config)     # runs it with uvicorn
    with running(app) as url: ...                                          # in a thread, for checks and tests

See docs/serving.md.
"""

from llm_assets.lazy import lazy_exports

# The engine and the server load torch, which the package's other modules (the log records, the
# spec, the assets) never need: their names are imported on first use.
_EXPORTS = {"Engine": "engine", "Generation": "engine", "GenerationRequest": "engine",
            "ServeConfig": "server", "create_app": "server", "running": "server", "serve": "server"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
