-- The outbox: effects the machines decided, written in the same transaction as the events that
-- caused them, so that a crash can never record a transition and lose what it must trigger.

CREATE TABLE outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id     uuid        NOT NULL,
    stream_type   text        NOT NULL,
    -- The event that caused the effect, and the effect's place among that event's effects.
    version       integer     NOT NULL,
    seq           smallint    NOT NULL,
    effect_type   text        NOT NULL,
    payload       bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    available_at  timestamptz NOT NULL DEFAULT now(),
    claimed_until timestamptz,
    attempts      integer     NOT NULL DEFAULT 0,
    completed_at  timestamptz,
    last_error    text,
    CONSTRAINT outbox_effect_key UNIQUE (stream_id, version, seq),
    -- Invariant: every effect belongs to a recorded event.
    CONSTRAINT outbox_event_fkey FOREIGN KEY (stream_id, version)
        REFERENCES events (stream_id, version)
);

CREATE INDEX outbox_pending_idx ON outbox (available_at, id) WHERE completed_at IS NULL;
