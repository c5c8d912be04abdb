-- Every request a node refused before it reached a deal — unreadable, oversized, forged,
-- misdirected, out of policy — with the peer and why. Operators see who sends what; nothing of
-- it touches a deal's stream. Append-only, like the journal.

CREATE TABLE refused_messages (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    peer        text        NOT NULL,
    protocol    text        NOT NULL,
    reason      text        NOT NULL,
    -- The proposal or piece the request was about, when it could be read.
    subject     text
);

CREATE INDEX refused_messages_peer_idx ON refused_messages (peer, received_at);

CREATE TRIGGER refused_messages_append_only
    BEFORE UPDATE OR DELETE ON refused_messages
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();

GRANT SELECT ON refused_messages TO dealledger_reader;
