-- Security scan: advisories found against the installed distributions of service targets.

-- One row per advisory affecting a package of a target, from the scan that first found it to
-- the scan that no longer does (`resolved_at`). A finding found again after it was resolved
-- opens a new row, so the history of each stays as it was.
CREATE TABLE security_findings (
    id                bigserial PRIMARY KEY,
    target            text NOT NULL,
    package           text NOT NULL,
    installed_version text NOT NULL,
    advisory_id       text NOT NULL,
    aliases           text[] NOT NULL DEFAULT '{}',
    severity          text NOT NULL
                      CHECK (severity IN ('critical', 'high', 'medium', 'low', 'none', 'unknown')),
    summary           text NOT NULL DEFAULT '',
    fixed_version     text,
    first_seen_at     timestamptz NOT NULL DEFAULT now(),
    last_seen_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at       timestamptz,
    CHECK (resolved_at IS NULL OR resolved_at >= first_seen_at)
);
CREATE UNIQUE INDEX security_findings_open
    ON security_findings (target, package, advisory_id) WHERE resolved_at IS NULL;
CREATE INDEX security_findings_target ON security_findings (target, first_seen_at);
