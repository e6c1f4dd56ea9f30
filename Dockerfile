# The service on the shipped weights. The base is Debian bookworm with Python 3.11; where a
# registry is reachable `debian:bookworm-slim` plus python3-venv works, otherwise build it
# locally from Debian packages with docker/make-base.sh (see README, "Deployment").
ARG BASE=genserve-base:bookworm
FROM ${BASE}

# The start-up checks' verdicts go under /tmp, not the default ~/.cache (the `genserve` user has no
# home): under a read-only root filesystem, /tmp needs a writable volume anyway (deploy/k8s mounts an
# emptyDir there, and another for the cache, which it names in GENSERVE_CHECK_CACHE_DIR).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    GENSERVE_WEIGHTS_DIR=/srv/weights GENSERVE_HOST=0.0.0.0 GENSERVE_PORT=8000 \
    GENSERVE_CHECK_CACHE_DIR=/tmp/genserve-checks
WORKDIR /srv

# Extra CA certificates for a TLS-intercepting proxy (docker/ca-certificates/*.crt; none by default).
COPY docker/ca-certificates/ /usr/local/share/ca-certificates/
RUN update-ca-certificates > /dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt

# Dependencies first, so code changes do not reinstall torch.
COPY pyproject.toml README.md ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --quiet --upgrade pip \
 && /opt/venv/bin/python -c "import tomllib; print(chr(10).join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt
RUN /opt/venv/bin/pip install --quiet -r /tmp/requirements.txt

COPY models models
COPY app app
COPY weights weights
RUN /opt/venv/bin/pip install --quiet --no-deps . && useradd --system --uid 10001 genserve
USER genserve
EXPOSE ${GENSERVE_PORT}
# Healthy while /ready answers 200 on GENSERVE_PORT, read when the probe runs (so `-e GENSERVE_PORT=...`
# moves it too); /ready is 503 while starting and while draining.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD ["/opt/venv/bin/python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:' + os.environ.get('GENSERVE_PORT', '8000') + '/ready'; sys.exit(urllib.request.urlopen(url, timeout=2).status != 200)"]
# SIGTERM starts the drain (README, "Deployment"): /ready 503 for GENSERVE_DRAIN_DELAY_S, then up to
# GENSERVE_GRACEFUL_TIMEOUT_S for the requests in hand; give `docker stop -t` / stop_grace_period more.
STOPSIGNAL SIGTERM
CMD ["/opt/venv/bin/python", "-m", "app"]
