-- Signed journal checkpoints: a Merkle root over every stream's head (version and CID), signed
-- by the node's identity key. A checkpoint pins history: rewriting any stream's chain before it,
-- even consistently, changes a head CID the signature covers.

CREATE TABLE journal_checkpoints (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at timestamptz NOT NULL,
    streams    bigint      NOT NULL,
    events     bigint      NOT NULL,
    root_cid   bytea       NOT NULL,
    signer     bytea       NOT NULL,
    signature  bytea       NOT NULL
);

CREATE TABLE journal_checkpoint_heads (
    checkpoint_id bigint  NOT NULL REFERENCES journal_checkpoints (id),
    stream_id     uuid    NOT NULL,
    version       integer NOT NULL,
    cid           bytea   NOT NULL,
    PRIMARY KEY (checkpoint_id, stream_id)
);

-- Invariant: checkpoints are as append-only as the journal they pin.
CREATE TRIGGER journal_checkpoints_append_only
    BEFORE UPDATE OR DELETE ON journal_checkpoints
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
CREATE TRIGGER journal_checkpoint_heads_append_only
    BEFORE UPDATE OR DELETE ON journal_checkpoint_heads
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
