FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY config ./config
RUN pip install . && useradd --system --uid 10001 --home-dir /app relay \
    && mkdir -p /app/data && chown relay /app/data

USER relay
VOLUME ["/app/data"]
EXPOSE 8080
ENV RELAY_SERVER__HOST=0.0.0.0 RELAY_LOG__FORMAT=json
# Asks the port the relay is configured with (RELAY_SERVER__PORT or the config file).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["relay", "health", "--timeout", "2"]
ENTRYPOINT ["relay"]
CMD ["serve", "--config", "config/relay.toml"]
