-- Retention (issue 9): the events of deals that ended long ago move to `events_archive` so the
-- hot journal stays small. Same columns, same CIDs and hash chains, still read by `audit`,
-- `verify`, rebuilds and signed checkpoints. Nothing is ever deleted: an event leaves `events`
-- only in the transaction that copied it, byte for byte, into the archive.

CREATE TABLE events_archive (
    position       bigint      PRIMARY KEY,
    stream_id      uuid        NOT NULL,
    stream_type    text        NOT NULL,
    version        integer     NOT NULL CHECK (version >= 1),
    event_type     text        NOT NULL,
    schema_version smallint    NOT NULL,
    payload        bytea       NOT NULL,
    recorded_at    timestamptz NOT NULL,
    correlation_id uuid,
    causation_id   uuid,
    tx_id          xid8        NOT NULL,
    prev_cid       bytea,
    cid            bytea       NOT NULL,
    archived_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_archive_stream_version_key UNIQUE (stream_id, version),
    CONSTRAINT events_archive_prev_cid_iff_not_first CHECK ((version = 1) = (prev_cid IS NULL))
);

COMMENT ON TABLE events_archive IS
    'dealledger journal archive: events of ended deals, moved from events; append-only';

-- Invariant: the archive is as append-only as the journal.
CREATE TRIGGER events_archive_append_only
    BEFORE UPDATE OR DELETE ON events_archive
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
CREATE TRIGGER events_archive_no_truncate
    BEFORE TRUNCATE ON events_archive
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- The one way an event may leave `events`: the transaction archiving it sets
-- `dealledger.archiving`, and the very same row (same stream, version and CID) is already in
-- the archive. Anything else is refused as before.
CREATE OR REPLACE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'events'
       AND current_setting('dealledger.archiving', true) = 'on'
       AND EXISTS (SELECT 1 FROM events_archive a
                   WHERE a.stream_id = OLD.stream_id AND a.version = OLD.version
                     AND a.cid = OLD.cid AND a.payload = OLD.payload) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'record a new event that compensates instead of changing history';
END;
$$;

-- The effects of archived events go with them (all completed: only ended deals are archived).
CREATE TABLE outbox_archive (
    id            bigint      PRIMARY KEY,
    stream_id     uuid        NOT NULL,
    stream_type   text        NOT NULL,
    version       integer     NOT NULL,
    seq           smallint    NOT NULL,
    effect_type   text        NOT NULL,
    payload       bytea       NOT NULL,
    created_at    timestamptz NOT NULL,
    attempts      integer     NOT NULL,
    completed_at  timestamptz NOT NULL,
    last_error    text,
    CONSTRAINT outbox_archive_event_fkey FOREIGN KEY (stream_id, version)
        REFERENCES events_archive (stream_id, version)
);

-- Every event, hot or archived: what audits, verification, checkpoints and rebuilds read.
CREATE VIEW journal_events AS
    SELECT position, stream_id, stream_type, version, event_type, schema_version, payload,
           recorded_at, correlation_id, causation_id, tx_id, prev_cid, cid
      FROM events
    UNION ALL
    SELECT position, stream_id, stream_type, version, event_type, schema_version, payload,
           recorded_at, correlation_id, causation_id, tx_id, prev_cid, cid
      FROM events_archive;
