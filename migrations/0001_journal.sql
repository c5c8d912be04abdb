-- The journal: one append-only table of events, ordered per stream by `version` and globally,
-- for consumers, by the writing transaction (`tx_id`) and then `position`.

CREATE TABLE events (
    position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id      uuid        NOT NULL,
    stream_type    text        NOT NULL,
    version        integer     NOT NULL CHECK (version >= 1),
    event_type     text        NOT NULL,
    schema_version smallint    NOT NULL,
    payload        bytea       NOT NULL,
    recorded_at    timestamptz NOT NULL,
    correlation_id uuid,
    causation_id   uuid,
    tx_id          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    prev_cid       bytea,
    cid            bytea       NOT NULL,
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version),
    -- Invariant: the first event of a stream has no predecessor, every later one has.
    CONSTRAINT events_prev_cid_iff_not_first CHECK ((version = 1) = (prev_cid IS NULL))
);

-- Commit-safe global reads walk this index: (tx_id, position) > checkpoint.
CREATE INDEX events_tx_position_idx ON events (tx_id, position);

COMMENT ON TABLE events IS
    'dealledger journal: append-only; UPDATE, DELETE and TRUNCATE are refused by trigger';

-- Invariant: the journal is append-only. The database itself refuses to change or remove events,
-- so no bug in a later layer (or a careless operator) can rewrite history silently.
CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is an append-only journal: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'record a new event that compensates instead of changing history';
END;
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
