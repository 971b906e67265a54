"""The L2 peer's app: its routes over the shared service core."""
