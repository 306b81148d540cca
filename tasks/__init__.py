"""caretaker's jobs, one module per concern; each module registers its Celery tasks."""
