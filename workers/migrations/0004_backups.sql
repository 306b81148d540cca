-- Backups, their verification by restore, disaster-recovery drills, and per-target leases.

CREATE TABLE backups (
    id          bigserial PRIMARY KEY,
    target      text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('database', 'directory')),
    store       text NOT NULL,
    key         text NOT NULL,
    format      text NOT NULL,
    size_bytes  bigint NOT NULL CHECK (size_bytes >= 0),
    sha256      text NOT NULL,
    -- source, time, format, size, sha256 and, for a database, per-table row counts.
    manifest    jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    status      text NOT NULL DEFAULT 'unverified'
                CHECK (status IN ('unverified', 'verified', 'invalid', 'verification_failed',
                                  'deleted')),
    checked_at  timestamptz,
    reason      text,
    UNIQUE (store, key)
);
CREATE INDEX backups_target ON backups (target, created_at DESC);

-- Every verification attempt, kept: a backup's status is its latest one.
CREATE TABLE backup_checks (
    id          bigserial PRIMARY KEY,
    backup_id   bigint NOT NULL REFERENCES backups (id),
    status      text NOT NULL CHECK (status IN ('verified', 'invalid', 'verification_failed')),
    reason      text,
    details     jsonb NOT NULL DEFAULT '{}',
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX backup_checks_backup ON backup_checks (backup_id, finished_at DESC);

CREATE TABLE drills (
    id             bigserial PRIMARY KEY,
    target         text NOT NULL,
    backup_id      bigint REFERENCES backups (id),
    status         text NOT NULL CHECK (status IN ('passed', 'missed', 'failed')),
    restore_s      double precision,
    backup_age_s   double precision,
    rto_s          double precision,
    rpo_s          double precision,
    reason         text,
    details        jsonb NOT NULL DEFAULT '{}',
    started_at     timestamptz NOT NULL,
    finished_at    timestamptz NOT NULL DEFAULT now()
);

-- Work on a target that must never overlap (verifying, restoring) holds its lease; an
-- expired lease (its holder died) may be taken over.
CREATE TABLE target_leases (
    target      text PRIMARY KEY,
    holder      text NOT NULL,
    purpose     text NOT NULL,
    expires_at  timestamptz NOT NULL
);
