"""The HTTP server: the OpenAI and Ollama APIs over one engine (see app.py for the routes)."""
