"""Scheduling: technicians' calendars and when they can be booked (working
hours, minus booked and held time, minus the drive between homes). Plain
Python: never imports the transport. Reads tracking's geometry and ETA
model. The routes, holds and the /booking namespace are issue 16's next
steps (docs/scheduling.md)."""
