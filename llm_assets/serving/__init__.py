"""Serving: an OpenAI-compatible HTTP server over a batching generation engine.

    app = create_app(store.local_dir(sha), sha, ServeConfig(api_key="..."))  # a Starlette app
    serve(model_dir, sha, host="127.0.0.1", port=8000, config=config)     # runs it with uvicorn
    with running(app) as url: ...                                          # in a thread, for checks and tests

See docs/serving.md.
"""

from llm_assets.serving.engine import Engine, Generation, GenerationRequest
from llm_assets.serving.server import ServeConfig, create_app, running, serve

__all__ = ["Engine", "Generation", "GenerationRequest", "ServeConfig", "create_app", "running", "serve"]
