"""storegate gateway: the in-store service (pure core + I/O edges)."""
