"""Transport edge and composition root of the realtime server.

The only package that imports ``socketio`` or ``aiohttp``; the domain packages
(``tracking``, ``chat``) and ``storage`` never import it.
"""
