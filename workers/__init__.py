"""caretaker's running processes and their wiring: Celery app, settings, webhook, CLI, storage."""
