-- Status tables folded from the journal. Written only by src/projections/; read by anyone.
-- Token amounts are numeric attoFIL, epochs bigint, CIDs and parties text in their canonical
-- string forms. Every row carries the stream version it reflects; writes are guarded by it, so
-- applying the same events twice changes nothing.

CREATE TABLE storage_deals (
    stream_id            uuid PRIMARY KEY,
    side                 text        NOT NULL,  -- storage_client | storage_provider
    proposal_cid         text,
    piece_cid            text,
    piece_size           bigint,
    verified_deal        boolean,
    client               text,
    provider             text,
    label                text,
    start_epoch          bigint,
    end_epoch            bigint,
    price_per_epoch      numeric,
    provider_collateral  numeric,
    client_collateral    numeric,
    deal_id              bigint,
    publish_cid          text,
    sector_number        bigint,
    state                text        NOT NULL,
    state_code           smallint    NOT NULL,
    terminal             boolean     NOT NULL,
    last_event_type      text        NOT NULL,
    version              integer     NOT NULL,
    first_event_at       timestamptz NOT NULL,
    last_event_at        timestamptz NOT NULL,
    message              text,
    bytes_transferred    bigint      NOT NULL,
    funds_reserved       numeric     NOT NULL
);
CREATE INDEX storage_deals_state_idx ON storage_deals (state, last_event_at);
CREATE INDEX storage_deals_provider_idx ON storage_deals (provider, state);
CREATE INDEX storage_deals_proposal_idx ON storage_deals (proposal_cid);

CREATE TABLE retrieval_deals (
    stream_id                 uuid PRIMARY KEY,
    side                      text        NOT NULL,  -- retrieval_client | retrieval_provider
    payload_cid               text,
    piece_cid                 text,
    part_offset               bigint,
    part_length               bigint,
    client                    text,
    provider                  text,
    price_per_byte            numeric,
    unseal_price              numeric,
    payment_interval          bigint,
    payment_interval_increase bigint,
    payment_channel           text,
    request_id                uuid,
    part_index                integer,
    state                     text        NOT NULL,
    state_code                smallint    NOT NULL,
    terminal                  boolean     NOT NULL,
    last_event_type           text        NOT NULL,
    version                   integer     NOT NULL,
    first_event_at            timestamptz NOT NULL,
    last_event_at             timestamptz NOT NULL,
    message                   text,
    bytes_transferred         bigint      NOT NULL,  -- received (client) or sent (provider)
    funds_paid                numeric     NOT NULL,  -- spent (client) or received (provider)
    payments                  integer     NOT NULL,
    last_voucher_amount       numeric,
    last_voucher_nonce        bigint
);
CREATE INDEX retrieval_deals_request_idx ON retrieval_deals (request_id);
CREATE INDEX retrieval_deals_state_idx ON retrieval_deals (state, last_event_at);

CREATE TABLE retrieval_requests (
    request_id       uuid PRIMARY KEY,
    payload_cid      text,
    piece_cid        text,
    client           text,
    provider         text,
    total_bytes      bigint,
    part_size        bigint,
    parts            integer     NOT NULL,
    parts_completed  integer     NOT NULL,
    deals_failed     integer     NOT NULL,
    bytes_done       bigint      NOT NULL,
    total_paid       numeric     NOT NULL,
    state            text        NOT NULL,
    state_code       smallint    NOT NULL,
    terminal         boolean     NOT NULL,
    last_event_type  text        NOT NULL,
    version          integer     NOT NULL,
    first_event_at   timestamptz NOT NULL,
    last_event_at    timestamptz NOT NULL,
    message          text
);

-- One row per transition: the timeline users chart. Kept by an asynchronous projector.
CREATE TABLE deal_transitions (
    stream_id      uuid        NOT NULL,
    version        integer     NOT NULL,
    stream_type    text        NOT NULL,
    from_state     text        NOT NULL,
    to_state       text        NOT NULL,
    input          text        NOT NULL,
    event_type     text        NOT NULL,
    recorded_at    timestamptz NOT NULL,
    correlation_id uuid,
    causation_id   uuid,
    position       bigint      NOT NULL,
    PRIMARY KEY (stream_id, version)
);
CREATE INDEX deal_transitions_time_idx ON deal_transitions (recorded_at);

-- Where each asynchronous projection is in the journal's commit-safe order. Updated in the
-- same transaction as the projection's rows: each event is applied exactly once.
CREATE TABLE projection_checkpoints (
    name       text PRIMARY KEY,
    tx_id      bigint      NOT NULL,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Deals that have not moved for longer than `threshold`, oldest first.
CREATE FUNCTION stuck_deals_since(threshold interval)
RETURNS TABLE (stream_id uuid, kind text, side text, state text, state_code smallint,
               last_event_type text, last_event_at timestamptz, stuck_for interval)
LANGUAGE sql STABLE AS $$
    SELECT stream_id, 'storage', side, state, state_code, last_event_type, last_event_at,
           now() - last_event_at
    FROM storage_deals
    WHERE NOT terminal AND state <> 'Active' AND last_event_at < now() - threshold
    UNION ALL
    SELECT stream_id, 'retrieval', side, state, state_code, last_event_type, last_event_at,
           now() - last_event_at
    FROM retrieval_deals
    WHERE NOT terminal AND last_event_at < now() - threshold
    ORDER BY last_event_at
$$;

-- Deals with no transition for an hour (Active deals are waiting for the chain, not stuck).
CREATE VIEW stuck_deals AS SELECT * FROM stuck_deals_since(interval '1 hour');

-- Deals, bytes and FIL by provider, side and state.
CREATE VIEW provider_summary AS
SELECT provider, side, state, count(*) AS deals, sum(piece_size) AS bytes,
       sum(price_per_epoch * (end_epoch - start_epoch)) AS storage_fee_attofil,
       sum(provider_collateral) AS provider_collateral_attofil
FROM storage_deals
GROUP BY provider, side, state;

-- Active deals ending before `epoch`: what expires soon.
CREATE FUNCTION active_deals_expiring_before(epoch bigint)
RETURNS SETOF storage_deals LANGUAGE sql STABLE AS $$
    SELECT * FROM storage_deals WHERE state = 'Active' AND end_epoch < epoch ORDER BY end_epoch
$$;

-- A role for dashboards and scripts: it reads the status tables and views, nothing else.
DO $$
BEGIN
    CREATE ROLE dealledger_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM dealledger_reader;
GRANT USAGE ON SCHEMA public TO dealledger_reader;
GRANT SELECT ON storage_deals, retrieval_deals, retrieval_requests, deal_transitions,
    projection_checkpoints, stuck_deals, provider_summary TO dealledger_reader;
GRANT EXECUTE ON FUNCTION stuck_deals_since(interval), active_deals_expiring_before(bigint)
    TO dealledger_reader;
