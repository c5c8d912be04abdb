-- Each inline status table becomes a view over a base table `<name>_rows` (issue 4's rebuild):
-- a rebuild builds a whole new base table without blocking readers, with `COPY ... FREEZE`
-- and indexes built in bulk afterwards, and then points the view at it
-- (src/projections/swap.rs). Users go on querying `storage_deals`, `retrieval_deals` and
-- `retrieval_requests`; the views are simple, so PostgreSQL plans queries on them as on the
-- tables. The projections write the base tables. The views list every column, in the order
-- src/projections/rows.rs writes them.

-- What refers to the tables is dropped here and created again on the views, unchanged.
DROP VIEW provider_summary;
DROP VIEW paused_deals;
DROP FUNCTION active_deals_expiring_before(bigint);

ALTER TABLE storage_deals RENAME TO storage_deals_rows;
ALTER INDEX storage_deals_pkey RENAME TO storage_deals_rows_pkey;
CREATE VIEW storage_deals AS
SELECT stream_id, side, proposal_cid, piece_cid, piece_size, verified_deal, client, provider,
       label, start_epoch, end_epoch, price_per_epoch, provider_collateral, client_collateral,
       deal_id, publish_cid, sector_number, state, state_code, terminal, last_event_type,
       version, first_event_at, last_event_at, message, bytes_transferred, funds_reserved,
       failure_class, attempts, next_retry_at
  FROM storage_deals_rows;

ALTER TABLE retrieval_deals RENAME TO retrieval_deals_rows;
ALTER INDEX retrieval_deals_pkey RENAME TO retrieval_deals_rows_pkey;
CREATE VIEW retrieval_deals AS
SELECT stream_id, side, payload_cid, piece_cid, part_offset, part_length, client, provider,
       price_per_byte, unseal_price, payment_interval, payment_interval_increase,
       payment_channel, request_id, part_index, state, state_code, terminal, last_event_type,
       version, first_event_at, last_event_at, message, bytes_transferred, funds_paid,
       payments, last_voucher_amount, last_voucher_nonce, failure_class, attempts,
       next_retry_at
  FROM retrieval_deals_rows;

ALTER TABLE retrieval_requests RENAME TO retrieval_requests_rows;
ALTER INDEX retrieval_requests_pkey RENAME TO retrieval_requests_rows_pkey;
CREATE VIEW retrieval_requests AS
SELECT request_id, payload_cid, piece_cid, client, provider, total_bytes, part_size, parts,
       parts_completed, deals_failed, bytes_done, total_paid, state, state_code, terminal,
       last_event_type, version, first_event_at, last_event_at, message
  FROM retrieval_requests_rows;

-- Deals, bytes and FIL by provider, side and state.
CREATE VIEW provider_summary AS
SELECT provider, side, state, count(*) AS deals, sum(piece_size) AS bytes,
       sum(price_per_epoch * (end_epoch - start_epoch)) AS storage_fee_attofil,
       sum(provider_collateral) AS provider_collateral_attofil
FROM storage_deals
GROUP BY provider, side, state;

-- Deals waiting for an operator: paused in a recoverable failure.
CREATE VIEW paused_deals AS
    SELECT 'storage' AS kind, stream_id, side, state, message, attempts, last_event_at
      FROM storage_deals WHERE state LIKE '%Paused'
    UNION ALL
    SELECT 'retrieval', stream_id, side, state, message, attempts, last_event_at
      FROM retrieval_deals WHERE state LIKE '%Paused';

-- Active deals ending before `epoch`: what expires soon.
CREATE FUNCTION active_deals_expiring_before(epoch bigint)
RETURNS SETOF storage_deals LANGUAGE sql STABLE AS $$
    SELECT * FROM storage_deals WHERE state = 'Active' AND end_epoch < epoch ORDER BY end_epoch
$$;

-- The reader reads the views; the base tables are the views' business (a rebuild replaces
-- them, without grants).
REVOKE ALL ON storage_deals_rows, retrieval_deals_rows, retrieval_requests_rows
    FROM dealledger_reader;
GRANT SELECT ON storage_deals, retrieval_deals, retrieval_requests, provider_summary,
    paused_deals TO dealledger_reader;
GRANT EXECUTE ON FUNCTION active_deals_expiring_before(bigint) TO dealledger_reader;
