"""Tracking: where technicians are and when they arrive. Locations (filters,
ordering, trails), latest positions, ETA, the geofence, the current job, and
dispatch. Reads orders through orders.service. Plain async Python: never
imports the transport (``realtime``, ``socketio``, ``aiohttp``)."""
