# Two images from one file:
#   docker build -t stacchip-db .                    the tool; default command: a Batch entrypoint
#   docker build --target stac-api -t stac-api .     stac-fastapi-pgstac at the version we test with
# rasterio's wheels bundle GDAL and PROJ, so no system GIS packages are needed.

FROM python:3.11-slim AS stac-api
# The versions the tests serve with (constraints.txt pins stac-fastapi-pgstac and uvicorn).
COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir -c /tmp/constraints.txt stac-fastapi-pgstac uvicorn \
    && rm /tmp/constraints.txt
# Reads PGUSER, PGPASSWORD, PGHOST, PGPORT, PGDATABASE (stac-fastapi-pgstac's PostgresSettings).
EXPOSE 8080
CMD ["uvicorn", "stac_fastapi.pgstac.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8080"]

FROM python:3.11-slim AS stacchip-db
# postgresql-client: psql/pg_isready for operators; no server in the image (use a real one).
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/stacchip-db
COPY pyproject.toml README.md constraints.txt ./
COPY stacchip_db ./stacchip_db
COPY alembic ./alembic
COPY sql ./sql
# constraints.txt: the exact versions the tests passed with (scripts/lock.sh refreshes it).
RUN pip install --no-cache-dir -c constraints.txt . && rm -rf /opt/stacchip-db
WORKDIR /work
# A Batch job definition sets the processor's command (stacchip-landsat, stacchip-naip, …)
# and the environment: AWS_BATCH_JOB_ARRAY_INDEX (set by Batch), STACCHIP_MGRS_SOURCE or
# STACCHIP_SAMPLE_SOURCE, STACCHIP_BUCKET, STACCHIP_DATABASE_URL.
CMD ["stacchip-sentinel-2"]
