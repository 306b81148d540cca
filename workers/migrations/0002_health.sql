-- Health-check history and stored reports.

CREATE TABLE check_results (
    id          bigserial PRIMARY KEY,
    target      text NOT NULL,
    grp         text NOT NULL,
    check_name  text NOT NULL,
    status      text NOT NULL CHECK (status IN ('healthy', 'warning', 'critical', 'unknown')),
    value       double precision,
    summary     text NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}',
    duration_s  double precision NOT NULL,
    checked_at  timestamptz NOT NULL DEFAULT now()
);
-- The latest result of a target is the first row of this index.
CREATE INDEX check_results_latest ON check_results (target, checked_at DESC);
CREATE INDEX check_results_at ON check_results (checked_at);

CREATE TABLE reports (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL,
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    body         jsonb NOT NULL
);
CREATE INDEX reports_kind ON reports (kind, created_at DESC);
