# The balancer as a container image: `docker build -t balancer .`, or with compose
# (docker-compose.yml builds it). The config is read from /etc/balancer/balancer.yaml: mount
# yours there (a Kubernetes ConfigMap: deploy/kubernetes/), or keep configs/docker.yaml.
#
# BASE may be any image with Python 3.11+ and its venv module, e.g. a plain Debian one
# (`--build-arg BASE=debian:bookworm` after apt-get install python3-venv): the balancer goes
# into a virtualenv of its own, so the base's system Python is never touched.
ARG BASE=python:3.12-slim
FROM ${BASE}

ENV VIRTUAL_ENV=/opt/balancer \
    PATH=/opt/balancer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Only what `pip install .` needs, so editing tests or docs does not rebuild this layer.
COPY pyproject.toml README.md /src/
COPY balancer /src/balancer
RUN python3 -m venv /opt/balancer \
    && /opt/balancer/bin/pip install --no-cache-dir --disable-pip-version-check \
        --root-user-action=ignore /src \
    && rm -rf /src \
    && useradd --system --user-group --uid 10001 --no-create-home --home-dir / \
        --shell /usr/sbin/nologin balancer

COPY configs/docker.yaml /etc/balancer/balancer.yaml

# Never root: ports below 1024 would need CAP_NET_BIND_SERVICE; the config listens on 8080.
# Numeric, so Kubernetes' runAsNonRoot can check it (deploy/kubernetes/deployment.yaml).
USER 10001:10001
# 8080: clients (configs/docker.yaml's listener); 9100: /metrics, /healthz, status page.
EXPOSE 8080 9100
# SIGTERM drains (up to shutdown_timeout); a second one closes at once. Give `docker stop`
# (-t, compose's stop_grace_period) more than shutdown_timeout.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2).status != 200)"]

ENTRYPOINT ["balancer"]
CMD ["-c", "/etc/balancer/balancer.yaml"]
