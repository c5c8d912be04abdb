-- The node's address book: where each counterparty was last reached. Deals in flight name
-- their counterparty by key only, so after a restart the node dials them from here.
CREATE TABLE peer_addresses (
    peer       text        PRIMARY KEY,
    address    text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
