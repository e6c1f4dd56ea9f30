"""One router per concern: health (liveness, readiness, config, metrics), models, uploads, generate."""
