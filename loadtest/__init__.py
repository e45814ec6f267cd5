"""Load generator, scenarios and the reference peer for side-by-side runs."""
