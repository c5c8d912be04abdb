//! How each machine's deal becomes a row of its status table. One function per machine, used
//! by the inline projection and by rebuilds alike, so the two can never disagree.

use chrono::{DateTime, SecondsFormat, Utc};

use super::table::{RowValues, SqlType as T, TableSpec};
use crate::domain::cid_text;
use crate::fsm::retrieval_client::RetrievalClient;
use crate::fsm::retrieval_provider::RetrievalProvider;
use crate::fsm::retrieval_request::RetrievalRequestMachine;
use crate::fsm::storage_client::StorageClient;
use crate::fsm::storage_provider::StorageProvider;
use crate::fsm::{Deal, Label, Machine};

/// What a row needs besides the deal: facts about its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowMeta {
    /// Type of the deal's last event.
    pub last_event_type: String,
    /// When the deal's first event was recorded.
    pub first_event_at: DateTime<Utc>,
    /// When its last event was recorded.
    pub last_event_at: DateTime<Utc>,
}

/// A machine whose deals have a row in a status table.
pub trait Projected: Machine {
    /// The table the rows go to.
    const TABLE: &'static TableSpec;
    /// The deal's row, in the table's column order.
    fn row(deal: &Deal<Self>, meta: &RowMeta) -> RowValues;
}

/// `storage_deals`: both sides of storage deals.
pub static STORAGE_DEALS: TableSpec = TableSpec {
    name: "storage_deals",
    rows_table: "storage_deals_rows",
    key: "stream_id",
    columns: &[
        ("stream_id", T::Uuid),
        ("side", T::Text),
        ("proposal_cid", T::Text),
        ("piece_cid", T::Text),
        ("piece_size", T::BigInt),
        ("verified_deal", T::Bool),
        ("client", T::Text),
        ("provider", T::Text),
        ("label", T::Text),
        ("start_epoch", T::BigInt),
        ("end_epoch", T::BigInt),
        ("price_per_epoch", T::Numeric),
        ("provider_collateral", T::Numeric),
        ("client_collateral", T::Numeric),
        ("deal_id", T::BigInt),
        ("publish_cid", T::Text),
        ("sector_number", T::BigInt),
        ("state", T::Text),
        ("state_code", T::SmallInt),
        ("terminal", T::Bool),
        ("last_event_type", T::Text),
        ("version", T::Int),
        ("first_event_at", T::Timestamp),
        ("last_event_at", T::Timestamp),
        ("message", T::Text),
        ("bytes_transferred", T::BigInt),
        ("funds_reserved", T::Numeric),
        ("failure_class", T::Text),
        ("attempts", T::Int),
        ("next_retry_at", T::Timestamp),
    ],
};

/// `retrieval_deals`: both sides of retrieval deals.
pub static RETRIEVAL_DEALS: TableSpec = TableSpec {
    name: "retrieval_deals",
    rows_table: "retrieval_deals_rows",
    key: "stream_id",
    columns: &[
        ("stream_id", T::Uuid),
        ("side", T::Text),
        ("payload_cid", T::Text),
        ("piece_cid", T::Text),
        ("part_offset", T::BigInt),
        ("part_length", T::BigInt),
        ("client", T::Text),
        ("provider", T::Text),
        ("price_per_byte", T::Numeric),
        ("unseal_price", T::Numeric),
        ("payment_interval", T::BigInt),
        ("payment_interval_increase", T::BigInt),
        ("payment_channel", T::Text),
        ("request_id", T::Uuid),
        ("part_index", T::Int),
        ("state", T::Text),
        ("state_code", T::SmallInt),
        ("terminal", T::Bool),
        ("last_event_type", T::Text),
        ("version", T::Int),
        ("first_event_at", T::Timestamp),
        ("last_event_at", T::Timestamp),
        ("message", T::Text),
        ("bytes_transferred", T::BigInt),
        ("funds_paid", T::Numeric),
        ("payments", T::Int),
        ("last_voucher_amount", T::Numeric),
        ("last_voucher_nonce", T::BigInt),
        ("failure_class", T::Text),
        ("attempts", T::Int),
        ("next_retry_at", T::Timestamp),
    ],
};

/// `retrieval_requests`: the client's whole-piece view.
pub static RETRIEVAL_REQUESTS: TableSpec = TableSpec {
    name: "retrieval_requests",
    rows_table: "retrieval_requests_rows",
    key: "request_id",
    columns: &[
        ("request_id", T::Uuid),
        ("payload_cid", T::Text),
        ("piece_cid", T::Text),
        ("client", T::Text),
        ("provider", T::Text),
        ("total_bytes", T::BigInt),
        ("part_size", T::BigInt),
        ("parts", T::Int),
        ("parts_completed", T::Int),
        ("deals_failed", T::Int),
        ("bytes_done", T::BigInt),
        ("total_paid", T::Numeric),
        ("state", T::Text),
        ("state_code", T::SmallInt),
        ("terminal", T::Bool),
        ("last_event_type", T::Text),
        ("version", T::Int),
        ("first_event_at", T::Timestamp),
        ("last_event_at", T::Timestamp),
        ("message", T::Text),
    ],
};

/// Every status table kept inline.
pub static INLINE_TABLES: [&TableSpec; 3] = [&STORAGE_DEALS, &RETRIEVAL_DEALS, &RETRIEVAL_REQUESTS];

fn text(value: impl ToString) -> Option<String> {
    Some(value.to_string())
}

fn time(value: DateTime<Utc>) -> Option<String> {
    Some(value.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// The columns every status table ends its state block with.
fn state_columns<M: Machine>(deal: &Deal<M>, meta: &RowMeta) -> [Option<String>; 7] {
    [
        text(deal.state.name()),
        text(deal.state.code().unwrap_or_default()),
        text(deal.is_terminal()),
        text(&meta.last_event_type),
        text(deal.version),
        time(meta.first_event_at),
        time(meta.last_event_at),
    ]
}

/// The failure columns storage and retrieval rows end with: the class of the deal's last
/// failure, its attempts, and when the runner tries next.
fn failure_columns<M: Machine>(deal: &Deal<M>) -> [Option<String>; 3] {
    let f = &deal.failure;
    [
        f.class.map(|c| c.name().to_owned()),
        text(f.attempts),
        f.next_retry_at_ms.and_then(DateTime::<Utc>::from_timestamp_millis).and_then(time),
    ]
}

/// The storage columns both sides share, from the proposal and the deal's chain facts.
struct StorageFacts<'a> {
    proposal: Option<&'a crate::domain::storage::ClientDealProposal>,
    proposal_cid: Option<cid::Cid>,
    deal_id: Option<crate::domain::DealId>,
    publish_cid: Option<cid::Cid>,
    sector: Option<crate::domain::SectorNumber>,
    message: &'a Option<String>,
    bytes: u64,
    funds_reserved: crate::domain::TokenAmount,
}

fn storage_row<M: Machine>(deal: &Deal<M>, meta: &RowMeta, facts: StorageFacts<'_>) -> RowValues {
    let p = facts.proposal.map(|cp| &cp.proposal);
    let mut row = vec![
        text(deal.id),
        text(M::NAME),
        facts.proposal_cid.as_ref().map(cid_text),
        p.map(|p| cid_text(&p.piece_cid.cid())),
        p.map(|p| p.piece_size.0.to_string()),
        p.map(|p| p.verified_deal.to_string()),
        p.map(|p| p.client.to_string()),
        p.map(|p| p.provider.to_string()),
        p.map(|p| p.label.clone()),
        p.map(|p| p.start_epoch.0.to_string()),
        p.map(|p| p.end_epoch.0.to_string()),
        p.map(|p| p.storage_price_per_epoch.0.to_string()),
        p.map(|p| p.provider_collateral.0.to_string()),
        p.map(|p| p.client_collateral.0.to_string()),
        facts.deal_id.map(|d| d.0.to_string()),
        facts.publish_cid.as_ref().map(cid_text),
        facts.sector.map(|s| s.0.to_string()),
    ];
    row.extend(state_columns(deal, meta));
    row.extend([facts.message.clone(), text(facts.bytes), text(facts.funds_reserved.0)]);
    row.extend(failure_columns(deal));
    row
}

impl Projected for StorageClient {
    const TABLE: &'static TableSpec = &STORAGE_DEALS;

    fn row(deal: &Deal<Self>, meta: &RowMeta) -> RowValues {
        let d = &deal.data;
        storage_row(
            deal,
            meta,
            StorageFacts {
                proposal: d.proposal.as_ref(),
                proposal_cid: d.proposal_cid,
                deal_id: d.deal_id,
                publish_cid: d.publish_message,
                sector: d.sector,
                message: &d.message,
                bytes: d.bytes_sent,
                funds_reserved: d.funds_reserved,
            },
        )
    }
}

impl Projected for StorageProvider {
    const TABLE: &'static TableSpec = &STORAGE_DEALS;

    fn row(deal: &Deal<Self>, meta: &RowMeta) -> RowValues {
        let d = &deal.data;
        storage_row(
            deal,
            meta,
            StorageFacts {
                proposal: d.proposal.as_ref(),
                proposal_cid: d.proposal_cid,
                deal_id: d.deal_id,
                publish_cid: d.publish_message,
                sector: d.sector,
                message: &d.message,
                bytes: d.bytes_received,
                funds_reserved: d.funds_reserved,
            },
        )
    }
}

/// The retrieval columns both sides share.
struct RetrievalFacts<'a> {
    terms: Option<&'a crate::domain::retrieval::RetrievalDealProposal>,
    channel: Option<String>,
    part_of: Option<crate::fsm::retrieval_client::RequestPart>,
    message: &'a Option<String>,
    bytes: u64,
    paid: crate::domain::TokenAmount,
    payments: u32,
    voucher: Option<&'a crate::domain::retrieval::SignedVoucher>,
}

fn retrieval_row<M: Machine>(
    deal: &Deal<M>,
    meta: &RowMeta,
    facts: RetrievalFacts<'_>,
) -> RowValues {
    let t = facts.terms;
    let mut row = vec![
        text(deal.id),
        text(M::NAME),
        t.map(|t| cid_text(&t.payload_cid)),
        t.and_then(|t| t.piece_cid.map(|p| cid_text(&p.cid()))),
        t.map(|t| t.part.offset.to_string()),
        t.map(|t| t.part.length.to_string()),
        t.map(|t| t.client.to_string()),
        t.map(|t| t.provider.to_string()),
        t.map(|t| t.price_per_byte.0.to_string()),
        t.map(|t| t.unseal_price.0.to_string()),
        t.map(|t| t.payment_interval.to_string()),
        t.map(|t| t.payment_interval_increase.to_string()),
        facts.channel,
        facts.part_of.map(|p| p.request_id.to_string()),
        facts.part_of.map(|p| p.part_index.to_string()),
    ];
    row.extend(state_columns(deal, meta));
    row.extend([
        facts.message.clone(),
        text(facts.bytes),
        text(facts.paid.0),
        text(facts.payments),
        facts.voucher.map(|v| v.voucher.amount.0.to_string()),
        facts.voucher.map(|v| v.voucher.nonce.to_string()),
    ]);
    row.extend(failure_columns(deal));
    row
}

impl Projected for RetrievalClient {
    const TABLE: &'static TableSpec = &RETRIEVAL_DEALS;

    fn row(deal: &Deal<Self>, meta: &RowMeta) -> RowValues {
        let d = &deal.data;
        retrieval_row(
            deal,
            meta,
            RetrievalFacts {
                terms: d.proposal.as_ref(),
                channel: d.channel.as_ref().map(|c| c.0.clone()),
                part_of: d.part_of,
                message: &d.message,
                bytes: d.bytes_received,
                paid: d.paid,
                payments: d.payments,
                voucher: d.last_voucher.as_ref(),
            },
        )
    }
}

impl Projected for RetrievalProvider {
    const TABLE: &'static TableSpec = &RETRIEVAL_DEALS;

    fn row(deal: &Deal<Self>, meta: &RowMeta) -> RowValues {
        let d = &deal.data;
        retrieval_row(
            deal,
            meta,
            RetrievalFacts {
                terms: d.proposal.as_ref(),
                channel: d.best_voucher.as_ref().map(|v| v.voucher.channel.0.clone()),
                part_of: None,
                message: &d.message,
                bytes: d.bytes_sent,
                paid: d.paid,
                payments: d.payments,
                voucher: d.best_voucher.as_ref(),
            },
        )
    }
}

impl Projected for RetrievalRequestMachine {
    const TABLE: &'static TableSpec = &RETRIEVAL_REQUESTS;

    fn row(deal: &Deal<Self>, meta: &RowMeta) -> RowValues {
        let d = &deal.data;
        let r = d.request.as_ref();
        let mut row = vec![
            text(deal.id),
            r.map(|r| cid_text(&r.payload_cid)),
            r.and_then(|r| r.piece_cid.map(|p| cid_text(&p.cid()))),
            r.map(|r| r.client.to_string()),
            r.map(|r| r.provider.to_string()),
            r.map(|r| r.total_bytes.to_string()),
            r.map(|r| r.part_size.to_string()),
            text(d.parts.len()),
            text(d.parts.iter().filter(|p| p.completed).count()),
            text(d.parts.iter().map(|p| p.failures).sum::<u32>()),
            text(d.bytes_done),
            text(d.total_paid.0),
        ];
        row.extend(state_columns(deal, meta));
        row.push(d.message.clone());
        row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_has_one_value_per_column() {
        use crate::fsm::fixtures::*;
        let meta = RowMeta {
            last_event_type: "x".into(),
            first_event_at: Utc::now(),
            last_event_at: Utc::now(),
        };
        let id = uuid::Uuid::nil();
        assert_eq!(StorageClient::row(&Deal::new(id), &meta).len(), STORAGE_DEALS.columns.len());
        assert_eq!(StorageProvider::row(&Deal::new(id), &meta).len(), STORAGE_DEALS.columns.len());
        assert_eq!(
            RetrievalClient::row(&Deal::new(id), &meta).len(),
            RETRIEVAL_DEALS.columns.len()
        );
        assert_eq!(
            RetrievalProvider::row(&Deal::new(id), &meta).len(),
            RETRIEVAL_DEALS.columns.len()
        );
        assert_eq!(
            RetrievalRequestMachine::row(&Deal::new(id), &meta).len(),
            RETRIEVAL_REQUESTS.columns.len()
        );
        let _ = signed_proposal();
    }
}
