-- What a waiting run waits for (a change window, ...); NULL while it runs.

ALTER TABLE runs ADD COLUMN waiting_for text;
CREATE INDEX runs_waiting ON runs (waiting_for) WHERE status = 'waiting';
