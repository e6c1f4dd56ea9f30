"""The HTTP service: batched inference for the models in `models/` (see app/main.py)."""
