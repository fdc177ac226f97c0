"""`localrun serve`: an OpenAI-compatible HTTP API over the engine (routes in app.py, engine in engine.py)."""
