"""Tracking domain: order lifecycle (states, transitions, events); later also
locations, ETA, geofence and dispatch. Plain async Python: never imports the
transport (``realtime``, ``socketio``, ``aiohttp``)."""
