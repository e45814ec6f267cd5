"""The shared kernel: what every domain package uses and nothing else owns.
Who acts (Actor), the domain errors and their wire codes, the clock, keyed
locks, background tasks, the request deadline,
token buckets (rate). Imports nothing of ours."""
