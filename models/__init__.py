"""s3ferry's state: tables, migrations, and the one module that changes a status.

Postgres (or, on a single machine, SQLite) is the source of truth for every
upload and part. Nothing in this package talks to S3 or Celery.
"""
