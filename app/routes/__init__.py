"""One router per concern: health (liveness, readiness, config, metrics), models, uploads, generate,
page (GET /, the page to try the models) and docs (/docs and /redoc)."""
