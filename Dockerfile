# One image for the router (`apifast serve`), the meter (`apifast meter`) and migrations.
# An exact patch release on an exact Debian release: a rebuild gets the same interpreter.
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY apifast apifast
COPY router router
COPY plugins plugins
COPY metering metering
COPY admin admin
COPY catalog catalog
COPY orders orders
COPY embedded embedded
COPY cli cli
COPY server server
# The locked versions (scripts/lock: the dependencies and the `otel` extra), then ApiFast
# itself; no embedded engines (chdb, pgserver, nats-server: the `embedded` extra is for
# `apifast dev` only).
RUN pip install -r requirements.lock && pip install --no-deps . && useradd --system --home /app apifast && mkdir -p /data && chown apifast /data
USER apifast
ENV APIFAST_DATA_DIR=/data APIFAST_HOST=0.0.0.0 APIFAST_PORT=8000
EXPOSE 8000
CMD ["apifast", "serve"]
