"""Test support: real redis-server processes, in-process uvicorn servers, polling helpers."""
