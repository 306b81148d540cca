# One image for every caretaker process; the compose `command:` names the CLI subcommand.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md beat_schedule.py /tmp/src/
COPY workers /tmp/src/workers
COPY tasks /tmp/src/tasks
RUN pip install /tmp/src && rm -rf /tmp/src

# Beat's schedule file and Flower's database are written to the working directory, so it
# belongs to the unprivileged user the processes run as.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/caretaker \
        caretaker
USER caretaker
WORKDIR /var/lib/caretaker

EXPOSE 9095 5555
ENTRYPOINT ["caretaker"]
CMD ["--help"]
