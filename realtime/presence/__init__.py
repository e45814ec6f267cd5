"""Who is online on which node: technicians and agents, memory and Redis backends."""
