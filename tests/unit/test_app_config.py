"""The Celery settings are consistent with each other (see workers/app.py for why each is set)."""

from __future__ import annotations

from models.settings import Settings
from workers import broker as app_module


def test_long_idempotent_task_settings() -> None:
    conf = app_module.make_app(Settings()).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_soft_time_limit < conf.task_time_limit < conf.broker_transport_options["visibility_timeout"]
    assert 0 < conf.worker_soft_shutdown_timeout < 90  # docker-compose stop_grace_period
    assert conf.result_expires >= 24 * 3600
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"


def test_the_app_reads_its_urls_from_settings() -> None:
    app = app_module.make_app(Settings(broker_url="redis://h:1/2", result_backend="redis://h:1/3", queue="q"))
    assert (app.conf.broker_url, app.conf.result_backend, app.conf.task_default_queue) == (
        "redis://h:1/2", "workers.backend:RedisBackend+redis://h:1/3", "q")
    assert type(app.backend).__name__ == "RedisBackend" and app.backend.url == "redis://h:1/3"
