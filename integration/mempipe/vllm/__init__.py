"""mempipe's vLLM integration: the attention backend (backend.py) and its plugin (plugin.py)."""
