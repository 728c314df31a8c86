"""The inference service: FastAPI routes in front of one dynamically batching worker per device.

``app.main:app`` is the ASGI entry point. Imports ``models``, never ``training``.
"""
