"""MongoDB (AsyncMongoClient) and Redis (redis.asyncio) implementations of the
stores the domain packages define; indexes; the embedded MongoDB-protocol
server launcher. Never imports the transport (``realtime``)."""
