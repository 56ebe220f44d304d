"""An HTTP server for editors and tools: OpenAI-, Ollama- and llama.cpp-compatible endpoints over one engine.

    python -m codellama.serve                       # the bundled tiny model on http://127.0.0.1:8000
    python -m codellama.serve --ckpt_dir CodeLlama-7b/ --api-key KEY

``service.py`` holds what the protocols share (the served model, its prompt formats, engine requests awaited
on the event loop); ``openai_api.py``, ``ollama_api.py`` and ``llamacpp_api.py`` are one adapter per protocol
(request fields in, response shapes out); ``web.py`` is their HTTP plumbing; ``app.py`` assembles the
application (routes, API key, body limit, one log line per request) and the server that stops cleanly.
Needs the ``serve`` extra: ``pip install -e '.[serve]'``.
"""
