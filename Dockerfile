# One image for every v2g process; the service picks the subcommand:
#   docker run --rm v2g-fleet aggregator
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /app
# Dependencies first, from pyproject.toml alone: a code change rebuilds only the last
# layers, not the dependency install.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && useradd --system --no-create-home --shell /usr/sbin/nologin v2g
COPY . .
RUN pip install --no-deps .

USER v2g
ENTRYPOINT ["v2g"]
CMD ["--help"]
