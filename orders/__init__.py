"""Orders: the lifecycle (states, transitions, who may move an order where)
and the service that creates, moves and reads orders and their event
streams. Plain async Python: never imports the transport (``realtime``,
``socketio``, ``aiohttp``)."""
