# One image for every v2g process; the service picks the subcommand:
#   docker run --rm v2g-fleet aggregator
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .
RUN pip install . \
    && useradd --system --no-create-home --shell /usr/sbin/nologin v2g

USER v2g
ENTRYPOINT ["v2g"]
CMD ["--help"]
