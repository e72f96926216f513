"""Model name -> model files: the bundled model, the stores users already keep, an Ollama registry.

Nothing here loads a model (``loader/`` does): these modules find, pull and account for files.
"""
