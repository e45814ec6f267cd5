"""The edge and composition root of the realtime server: Socket.IO namespaces,
the HTTP API, pages, settings, auth, and create_app. The only package that
imports ``socketio`` or ``aiohttp``, and within it only ``realtime.transport``
reaches into their internals. The domain packages (``kernel``, ``orders``,
``tracking``, ``chat``) and ``storage`` never import it (tests/test_layering.py).
"""
