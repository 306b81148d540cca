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

-- Where the scans of a log stopped, one row per file. A file is known by its content, not by
-- its inode: `fingerprint` hashes the first `fingerprint_bytes` bytes of its decompressed
-- content together with that length, so a file renamed by rotation, or rotated and compressed
-- into a new inode, is still the file already partly read. `offset_bytes` counts the bytes of
-- the decompressed content already counted; `finished` marks a compressed file read to its end
-- (or taken as history by the first scan), which is never read again.
CREATE TABLE log_offsets (
    log_name          text NOT NULL,
    fingerprint       text NOT NULL,
    fingerprint_bytes integer NOT NULL CHECK (fingerprint_bytes > 0),
    path              text NOT NULL,
    device            bigint NOT NULL,
    inode             bigint NOT NULL,
    offset_bytes      bigint NOT NULL CHECK (offset_bytes >= 0),
    finished          boolean NOT NULL DEFAULT false,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (log_name, fingerprint)
);

-- Lines scanned, and lines matching each pattern, per log and UTC day; every scan of the day
-- adds to the day's rows in the transaction that moves the offsets. A day without rows was not
-- scanned, a day scanned with nothing matching has zeros; baselines are built from the rows.
CREATE TABLE log_counts (
    log_name    text NOT NULL,
    day         date NOT NULL,
    pattern     text NOT NULL,
    lines       bigint NOT NULL CHECK (lines >= 0),
    matches     bigint NOT NULL CHECK (matches >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (log_name, day, pattern)
);
