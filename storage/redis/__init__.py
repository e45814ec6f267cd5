"""Every Redis implementation of the domains' live state: positions, agent
statuses, presence, rate limits, and the per-node fallbacks used while Redis
is away. (The Socket.IO manager's pub/sub link is the transport's:
realtime/transport/cluster.py.)"""
