-- Analysis: per-series baselines, the anomalies found against them, and log-scan state.

-- The baseline a series' new points are scored against. `scored_until` is the newest point
-- already judged, so the next run scores only what arrived after it.
CREATE TABLE series_baselines (
    series_key   text PRIMARY KEY,
    name         text NOT NULL,
    labels       jsonb NOT NULL DEFAULT '{}',
    method       text NOT NULL CHECK (method IN ('mad', 'zscore')),
    center       double precision NOT NULL,
    scale        double precision NOT NULL CHECK (scale > 0),
    points       integer NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    scored_until timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE anomalies (
    id          bigserial PRIMARY KEY,
    series_key  text NOT NULL,
    name        text NOT NULL,
    labels      jsonb NOT NULL DEFAULT '{}',
    at          timestamptz NOT NULL,
    value       double precision NOT NULL,
    score       double precision NOT NULL,
    method      text NOT NULL,
    center      double precision NOT NULL,
    scale       double precision NOT NULL,
    found_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (series_key, at)
);
CREATE INDEX anomalies_found ON anomalies (found_at);

-- Where the last scan of a log file stopped: the file is known by device and inode, so a
-- rotation (the live name now a new file) is noticed and the old one finished under its new name.
CREATE TABLE log_offsets (
    log_name    text NOT NULL,
    device      bigint NOT NULL,
    inode       bigint NOT NULL,
    path        text NOT NULL,
    "offset"    bigint NOT NULL CHECK ("offset" >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (log_name, device, inode)
);

-- Lines matching each pattern, per scan; the baseline is built from earlier days' counts.
CREATE TABLE log_counts (
    id          bigserial PRIMARY KEY,
    log_name    text NOT NULL,
    pattern     text NOT NULL,
    day         date NOT NULL,
    lines       bigint NOT NULL,
    matches     bigint NOT NULL,
    scanned_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (log_name, pattern, day)
);
