-- Failure classes (issue 9): each status row shows whether the deal's last failure was
-- recoverable (retried automatically up to the runner's limit, then paused for an operator) or
-- fatal, how many attempts it took, and when the runner tries next while it is retrying.
-- Appended at the end of the tables, in the order src/projections/rows.rs writes them.

ALTER TABLE storage_deals
    ADD COLUMN failure_class text CHECK (failure_class IN ('recoverable', 'fatal')),
    ADD COLUMN attempts      integer NOT NULL DEFAULT 0,
    ADD COLUMN next_retry_at timestamptz;

ALTER TABLE retrieval_deals
    ADD COLUMN failure_class text CHECK (failure_class IN ('recoverable', 'fatal')),
    ADD COLUMN attempts      integer NOT NULL DEFAULT 0,
    ADD COLUMN next_retry_at timestamptz;

-- Deals waiting for an operator: paused in a recoverable failure.
CREATE VIEW paused_deals AS
    SELECT 'storage' AS kind, stream_id, side, state, message, attempts, last_event_at
      FROM storage_deals WHERE state LIKE '%Paused'
    UNION ALL
    SELECT 'retrieval', stream_id, side, state, message, attempts, last_event_at
      FROM retrieval_deals WHERE state LIKE '%Paused';

GRANT SELECT ON paused_deals TO dealledger_reader;
