"""The Celery side: the app, the part and completion tasks, the S3 client and source readers."""
