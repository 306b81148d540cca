-- The records every caretaker concern builds on: occurrences, runs and their steps,
-- incidents, notifications, and one append-only event log.

CREATE TABLE occurrences (
    id               bigserial PRIMARY KEY,
    source           text NOT NULL,
    fingerprint      text NOT NULL,
    starts_at        timestamptz NOT NULL,
    ends_at          timestamptz,
    status           text NOT NULL CHECK (status IN ('firing', 'resolved')),
    labels           jsonb NOT NULL,
    annotations      jsonb NOT NULL DEFAULT '{}',
    generator_url    text NOT NULL DEFAULT '',
    group_key        text NOT NULL DEFAULT '',
    truncated_alerts integer NOT NULL DEFAULT 0,
    received_at      timestamptz NOT NULL DEFAULT now(),
    last_seen_at     timestamptz NOT NULL DEFAULT now(),
    dispatched_at    timestamptz,
    routed_at        timestamptz,
    resolved_at      timestamptz,
    incident_id      bigint,
    UNIQUE (source, fingerprint, starts_at)
);
CREATE INDEX occurrences_unrouted ON occurrences (received_at) WHERE routed_at IS NULL;
CREATE INDEX occurrences_fingerprint ON occurrences (source, fingerprint);

CREATE TABLE incidents (
    id               bigserial PRIMARY KEY,
    source           text NOT NULL,
    dedup_key        text NOT NULL,
    status           text NOT NULL CHECK (status IN ('open', 'acknowledged', 'resolved')),
    severity         text NOT NULL,
    title            text NOT NULL,
    labels           jsonb NOT NULL DEFAULT '{}',
    truncated_alerts integer NOT NULL DEFAULT 0,
    opened_at        timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    acknowledged_at  timestamptz,
    acknowledged_by  text,
    resolved_at      timestamptz,
    resolved_by      text
);
-- At most one incident per dedup key is open at any time, whatever the number of workers.
CREATE UNIQUE INDEX incidents_one_open ON incidents (source, dedup_key) WHERE status <> 'resolved';
CREATE INDEX incidents_status ON incidents (status, opened_at);

ALTER TABLE occurrences ADD FOREIGN KEY (incident_id) REFERENCES incidents (id);

CREATE TABLE runs (
    id            bigserial PRIMARY KEY,
    occurrence_id bigint NOT NULL UNIQUE REFERENCES occurrences (id),
    runbook       text NOT NULL,
    status        text NOT NULL
                  CHECK (status IN ('running', 'waiting', 'recovered', 'escalated', 'failed',
                                    'cancelled')),
    trigger       text NOT NULL,
    on_failure    jsonb NOT NULL,
    incident_id   bigint REFERENCES incidents (id),
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
CREATE INDEX runs_active ON runs (status) WHERE status IN ('running', 'waiting');
CREATE INDEX runs_incident ON runs (incident_id);

CREATE TABLE steps (
    id               bigserial PRIMARY KEY,
    run_id           bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    position         integer NOT NULL,
    name             text NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('check', 'recover', 'verify', 'escalate')),
    action           text NOT NULL,
    params           jsonb NOT NULL,
    spec             jsonb NOT NULL,
    status           text NOT NULL
                     CHECK (status IN ('pending', 'running', 'waiting', 'succeeded', 'failed',
                                       'skipped')),
    tries            integer NOT NULL DEFAULT 0,
    worker           text,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    dispatched_at    timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    result           jsonb,
    error            text,
    UNIQUE (run_id, position)
);
CREATE INDEX steps_pending ON steps (dispatched_at) WHERE status = 'pending';
CREATE INDEX steps_leased ON steps (lease_expires_at) WHERE status = 'running';

CREATE TABLE notifications (
    id            bigserial PRIMARY KEY,
    incident_id   bigint NOT NULL REFERENCES incidents (id),
    channel       text NOT NULL,
    event         text NOT NULL,
    payload       jsonb NOT NULL,
    status        text NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    dispatched_at timestamptz,
    sent_at       timestamptz,
    error         text
);
CREATE INDEX notifications_pending ON notifications (dispatched_at) WHERE status = 'pending';

CREATE TABLE events (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind          text NOT NULL,
    actor         text NOT NULL,
    occurrence_id bigint,
    run_id        bigint,
    step_id       bigint,
    incident_id   bigint,
    message       text NOT NULL,
    data          jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX events_incident ON events (incident_id) WHERE incident_id IS NOT NULL;
CREATE INDEX events_run ON events (run_id) WHERE run_id IS NOT NULL;
CREATE INDEX events_occurrence ON events (occurrence_id) WHERE occurrence_id IS NOT NULL;
CREATE INDEX events_at ON events (at);

-- The event log is append-only: history is never rewritten (retention may delete old rows).
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only (event id %)', OLD.id;
END $$;
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();

CREATE TABLE heartbeats (
    name text PRIMARY KEY,
    at   timestamptz NOT NULL
);
