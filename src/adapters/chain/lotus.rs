//! A JSON-RPC client for a Lotus full node (HTTP, bearer token). It reads what the ledger
//! needs — the head, a deal's state, a message's outcome, market balances, payment channels —
//! and translates Lotus's JSON (CIDs as `{"/": "..."}`, big integers as strings, `-1` epochs
//! meaning "not yet") into the same observations the devnet gives.
//!
//! Writes go through Lotus's own wallet: `MarketAddBalance`, `MarketWithdraw`, `PaychGet`,
//! `PaychAllocateLane`, `PaychSettle` and `PaychCollect` need the node to hold the party's key
//! (a token with `sign` permission). Publishing deals and redeeming vouchers are not done
//! through this adapter: Lotus expects its own CBOR-encoded messages and secp256k1/BLS
//! signatures, not this ledger's ed25519 documents — those calls return
//! [`ChainError::Unsupported`].
//!
//! Plain `http://` only (a node on the same host or a private network), one request per
//! connection.

use std::collections::HashMap;
use std::str::FromStr;

use cid::Cid;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Chain, ChainError, ChannelState, DealObservation, MarketBalance, MessageKey, MessageStatus,
};
use crate::domain::retrieval::{ChannelAddress, SignedVoucher};
use crate::domain::storage::StorageDeal;
use crate::domain::{ChainEpoch, DealId, PaddedPieceSize, PartyKey, SectorNumber, TokenAmount};

/// Mainnet's finality: observations are acted on only this many epochs deep.
pub const LOTUS_FINALITY: i64 = 900;

/// Epochs between `PaychSettle` and the moment a channel can be collected on Filecoin.
const PAYCH_SETTLE_DELAY: i64 = 12 * 120;

/// The largest response body read (a deal or a head is a few KiB).
const MAX_RESPONSE: usize = 8 << 20;

/// A Lotus node.
#[derive(Debug, Clone)]
pub struct Lotus {
    host: String,
    port: u16,
    path: String,
    token: Option<String>,
    finality: i64,
    addresses: HashMap<PartyKey, String>,
}

impl Lotus {
    /// A client for `url` (`http://host:port/rpc/v0`), authenticating with `token` if given.
    pub fn new(url: &str, token: Option<String>) -> Result<Self, ChainError> {
        let parsed =
            url::Url::parse(url).map_err(|e| ChainError::Unavailable(format!("{url}: {e}")))?;
        if parsed.scheme() != "http" {
            return Err(ChainError::Unsupported {
                what: format!("{} URLs (use http://)", parsed.scheme()),
            });
        }
        let host =
            parsed.host_str().ok_or_else(|| ChainError::Unavailable(format!("{url}: no host")))?;
        Ok(Self {
            host: host.to_owned(),
            port: parsed.port().unwrap_or(1234),
            path: if parsed.path().is_empty() {
                "/rpc/v0".into()
            } else {
                parsed.path().to_owned()
            },
            token,
            finality: LOTUS_FINALITY,
            addresses: HashMap::new(),
        })
    }

    /// Acts on observations `epochs` deep instead of [`LOTUS_FINALITY`].
    pub fn with_finality(mut self, epochs: i64) -> Self {
        self.finality = epochs.max(0);
        self
    }

    /// The Filecoin address (`f1…`, `f0…`) the node knows a party by.
    pub fn with_address(mut self, party: PartyKey, address: impl Into<String>) -> Self {
        self.addresses.insert(party, address.into());
        self
    }

    fn address_of(&self, party: PartyKey) -> Result<&str, ChainError> {
        self.addresses.get(&party).map(String::as_str).ok_or_else(|| ChainError::Unsupported {
            what: format!("party {party} has no Filecoin address configured"),
        })
    }

    /// Calls `Filecoin.<method>` and returns its `result`.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, ChainError> {
        let body = json!({ "jsonrpc": "2.0", "method": format!("Filecoin.{method}"), "params": params, "id": 1 })
            .to_string();
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.as_deref().map(|a| ("Authorization", a)).into_iter().collect();
        let response = crate::adapters::http::request(
            &self.host,
            self.port,
            "POST",
            &self.path,
            &headers,
            Some(("application/json", body.as_bytes())),
            MAX_RESPONSE,
        )
        .await
        .map_err(|e| match e {
            crate::adapters::http::HttpError::Io { .. } => ChainError::Unavailable(e.to_string()),
            crate::adapters::http::HttpError::Malformed(m) => {
                ChainError::Malformed(format!("{method}: {m}"))
            }
        })?;
        let body = match response.status {
            200 => response.body,
            401 | 403 => {
                return Err(ChainError::Refused {
                    reason: format!(
                        "{method}: HTTP {}: the token is missing or lacks permission",
                        response.status
                    ),
                });
            }
            status => return Err(ChainError::Malformed(format!("{method}: HTTP {status}"))),
        };
        parse_rpc(method, &body)
    }

    /// The tipset key at `height` (Lotus answers with the tipset at or below it).
    async fn tipset_at(&self, height: i64) -> Result<Value, ChainError> {
        let tipset = self.call("ChainGetTipSetByHeight", json!([height.max(0), null])).await?;
        tipset
            .get("Cids")
            .cloned()
            .ok_or_else(|| ChainError::Malformed("ChainGetTipSetByHeight: no Cids".into()))
    }

    async fn final_height(&self) -> Result<i64, ChainError> {
        Ok(self.head().await?.0 - self.finality)
    }
}

/// The `result` of a JSON-RPC response, or its error as a typed error.
fn parse_rpc(method: &str, body: &[u8]) -> Result<Value, ChainError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ChainError::Malformed(format!("{method}: {e}")))?;
    if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
        let message = error.get("message").and_then(Value::as_str).unwrap_or("unknown error");
        return Err(if message.contains("not found") {
            ChainError::NotFound { what: format!("{method}: {message}") }
        } else if message.contains("not enough funds") || message.contains("insufficient funds") {
            // Lotus's words for a short wallet or escrow (mpool and the market actor).
            ChainError::InsufficientFunds { reason: format!("{method}: {message}") }
        } else {
            ChainError::Refused { reason: format!("{method}: {message}") }
        });
    }
    value
        .get("result")
        .cloned()
        .ok_or_else(|| ChainError::Malformed(format!("{method}: no result")))
}

/// `{"/": "bafy..."}` → a CID.
fn cid_of(value: &Value) -> Result<Cid, ChainError> {
    let text = value
        .get("/")
        .and_then(Value::as_str)
        .ok_or_else(|| ChainError::Malformed(format!("not a CID link: {value}")))?;
    Cid::from_str(text).map_err(|e| ChainError::Malformed(format!("CID {text}: {e}")))
}

/// A big integer as Lotus writes it (a decimal string).
fn big(value: &str) -> Result<TokenAmount, ChainError> {
    value
        .parse::<u128>()
        .map(TokenAmount)
        .map_err(|_| ChainError::Malformed(format!("amount {value:?}")))
}

/// Lotus's "not yet" epochs are -1.
fn epoch(value: i64) -> Option<ChainEpoch> {
    (value >= 0).then_some(ChainEpoch(value))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LotusDeal {
    proposal: LotusProposal,
    state: LotusDealState,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LotusProposal {
    #[serde(rename = "PieceCID")]
    piece_cid: Value,
    piece_size: u64,
    client: String,
    provider: String,
    start_epoch: i64,
    end_epoch: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LotusDealState {
    sector_start_epoch: i64,
    last_updated_epoch: i64,
    slash_epoch: i64,
    #[serde(default)]
    sector_number: Option<u64>,
}

/// A `StateMarketStorageDeal` result as the observation the watcher feeds to the machines.
pub fn deal_observation(deal_id: DealId, result: &Value) -> Result<DealObservation, ChainError> {
    let deal: LotusDeal = serde_json::from_value(result.clone())
        .map_err(|e| ChainError::Malformed(format!("StateMarketStorageDeal: {e}")))?;
    let p = deal.proposal;
    let s = deal.state;
    let sector_start_epoch = epoch(s.sector_start_epoch);
    Ok(DealObservation {
        deal_id,
        proposal_cid: None,
        piece_cid: cid_of(&p.piece_cid)?,
        piece_size: PaddedPieceSize(p.piece_size),
        client: p.client,
        provider: p.provider,
        start_epoch: ChainEpoch(p.start_epoch),
        end_epoch: ChainEpoch(p.end_epoch),
        sector: s.sector_number.filter(|_| sector_start_epoch.is_some()).map(SectorNumber),
        precommit_epoch: None,
        sector_start_epoch,
        slash_epoch: epoch(s.slash_epoch),
        closed_epoch: None,
        timed_out_epoch: None,
        last_updated_epoch: epoch(s.last_updated_epoch),
    })
}

/// A `StateSearchMsg` result (`null` = not found yet) as a message status at `final_height`.
pub fn message_status_of(result: &Value, final_height: i64) -> Result<MessageStatus, ChainError> {
    if result.is_null() {
        return Ok(MessageStatus::Pending);
    }
    let height = result
        .get("Height")
        .and_then(Value::as_i64)
        .ok_or_else(|| ChainError::Malformed("StateSearchMsg: no Height".into()))?;
    if height > final_height {
        return Ok(MessageStatus::Pending);
    }
    let code = result
        .pointer("/Receipt/ExitCode")
        .and_then(Value::as_i64)
        .ok_or_else(|| ChainError::Malformed("StateSearchMsg: no Receipt.ExitCode".into()))?;
    if code != 0 {
        return Ok(MessageStatus::Failed {
            epoch: ChainEpoch(height),
            reason: format!("exit code {code}"),
        });
    }
    let deal_id = result.pointer("/ReturnDec/IDs/0").and_then(Value::as_u64).map(DealId);
    Ok(MessageStatus::Landed { epoch: ChainEpoch(height), deal_id })
}

fn amount_field(value: &Value, field: &str, method: &str) -> Result<TokenAmount, ChainError> {
    let text = value
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| ChainError::Malformed(format!("{method}: no {field}")))?;
    big(text)
}

fn unsupported(what: &str) -> ChainError {
    ChainError::Unsupported { what: what.into() }
}

impl Chain for Lotus {
    async fn head(&self) -> Result<ChainEpoch, ChainError> {
        let head = self.call("ChainHead", json!([])).await?;
        head.get("Height")
            .and_then(Value::as_i64)
            .map(ChainEpoch)
            .ok_or_else(|| ChainError::Malformed("ChainHead: no Height".into()))
    }

    fn finality(&self) -> i64 {
        self.finality
    }

    async fn market_balance(&self, party: PartyKey) -> Result<MarketBalance, ChainError> {
        let balance =
            self.call("StateMarketBalance", json!([self.address_of(party)?, null])).await?;
        Ok(MarketBalance {
            escrow: amount_field(&balance, "Escrow", "StateMarketBalance")?,
            locked: amount_field(&balance, "Locked", "StateMarketBalance")?,
        })
    }

    async fn add_balance(
        &self,
        party: PartyKey,
        amount: TokenAmount,
        _key: MessageKey,
    ) -> Result<Cid, ChainError> {
        let address = self.address_of(party)?;
        let message =
            self.call("MarketAddBalance", json!([address, address, amount.0.to_string()])).await?;
        cid_of(&message)
    }

    async fn withdraw_balance(
        &self,
        party: PartyKey,
        amount: TokenAmount,
        _key: MessageKey,
    ) -> Result<Cid, ChainError> {
        let address = self.address_of(party)?;
        let message =
            self.call("MarketWithdraw", json!([address, address, amount.0.to_string()])).await?;
        cid_of(&message)
    }

    async fn publish_storage_deal(&self, _deal: &StorageDeal) -> Result<Cid, ChainError> {
        Err(unsupported("publishing ed25519-signed deals through Lotus"))
    }

    async fn message_status(&self, message: Cid) -> Result<MessageStatus, ChainError> {
        let final_height = self.final_height().await?;
        let found = self
            .call("StateSearchMsg", json!([[], { "/": message.to_string() }, -1, true]))
            .await?;
        message_status_of(&found, final_height)
    }

    async fn deal(&self, deal_id: DealId) -> Result<Option<DealObservation>, ChainError> {
        let tipset = self.tipset_at(self.final_height().await?).await?;
        match self.call("StateMarketStorageDeal", json!([deal_id.0, tipset])).await {
            Ok(result) => deal_observation(deal_id, &result).map(Some),
            Err(ChainError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn get_or_create_channel(
        &self,
        from: PartyKey,
        to: PartyKey,
        amount: TokenAmount,
        _key: MessageKey,
    ) -> Result<ChannelAddress, ChainError> {
        let info = self
            .call(
                "PaychGet",
                json!([self.address_of(from)?, self.address_of(to)?, amount.0.to_string()]),
            )
            .await?;
        info.get("Channel")
            .and_then(Value::as_str)
            .map(|c| ChannelAddress(c.to_owned()))
            .ok_or_else(|| ChainError::Malformed("PaychGet: no Channel".into()))
    }

    async fn channel_between(
        &self,
        from: PartyKey,
        to: PartyKey,
    ) -> Result<Option<ChannelAddress>, ChainError> {
        let funds = self
            .call(
                "PaychAvailableFundsByFromTo",
                json!([self.address_of(from)?, self.address_of(to)?]),
            )
            .await?;
        Ok(funds.get("Channel").and_then(Value::as_str).map(|c| ChannelAddress(c.to_owned())))
    }

    async fn channel(&self, channel: &ChannelAddress) -> Result<Option<ChannelState>, ChainError> {
        let funds = self.call("PaychAvailableFunds", json!([channel.0])).await?;
        let party = |field: &str| {
            let address = funds.get(field).and_then(Value::as_str).unwrap_or_default();
            self.addresses.iter().find(|(_, a)| a.as_str() == address).map(|(p, _)| *p)
        };
        let (Some(from), Some(to)) = (party("From"), party("To")) else {
            return Err(unsupported("a channel between parties with no configured address"));
        };
        Ok(Some(ChannelState {
            address: channel.clone(),
            from,
            to,
            balance: amount_field(&funds, "ConfirmedAmt", "PaychAvailableFunds")?,
            redeemed: amount_field(&funds, "VoucherReedeemedAmt", "PaychAvailableFunds")?,
            lanes: 0,
            settling_at: None,
            collected: false,
        }))
    }

    async fn allocate_lane(
        &self,
        channel: &ChannelAddress,
        _key: MessageKey,
    ) -> Result<u64, ChainError> {
        let lane = self.call("PaychAllocateLane", json!([channel.0])).await?;
        lane.as_u64().ok_or_else(|| ChainError::Malformed("PaychAllocateLane: not a lane".into()))
    }

    async fn check_voucher(&self, _voucher: &SignedVoucher) -> Result<(), ChainError> {
        Err(unsupported("checking ed25519 vouchers through Lotus"))
    }

    async fn submit_voucher(&self, _voucher: &SignedVoucher) -> Result<TokenAmount, ChainError> {
        Err(unsupported("redeeming ed25519 vouchers through Lotus"))
    }

    async fn settle(&self, channel: &ChannelAddress) -> Result<ChainEpoch, ChainError> {
        self.call("PaychSettle", json!([channel.0])).await?;
        // The payment channel actor's settle delay: 12 hours of 30-second epochs.
        Ok(ChainEpoch(self.head().await?.0 + PAYCH_SETTLE_DELAY))
    }

    async fn collect(&self, channel: &ChannelAddress) -> Result<(), ChainError> {
        self.call("PaychCollect", json!([channel.0])).await?;
        Ok(())
    }
}
