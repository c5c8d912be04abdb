//! What a retrieval provider asks the chain about payment channels (seed: the PullValidator
//! "verifies it through the PaymentChannel"): is there a funded channel from this client before
//! any byte flows, and would the channel honour this voucher before it is taken.

use std::future::Future;
use std::pin::Pin;

use super::Chain;
use crate::domain::retrieval::SignedVoucher;
use crate::domain::{PartyKey, TokenAmount};

/// A boxed future: the check is used behind `dyn`, by adapters that do not know the chain.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// The provider's view of payment channels.
pub trait PaymentChannels: Send + Sync {
    /// Succeeds when a channel from `client` to `provider` holds at least `amount` not yet
    /// redeemed.
    fn check_funded(
        &self,
        client: PartyKey,
        provider: PartyKey,
        amount: TokenAmount,
    ) -> CheckFuture<'_>;

    /// Succeeds when `voucher` is on a channel from `client` to `provider` and the chain would
    /// accept it (payer's signature, fresh nonce, covered by the channel's funds).
    fn check_voucher<'a>(
        &'a self,
        voucher: &'a SignedVoucher,
        client: PartyKey,
        provider: PartyKey,
    ) -> CheckFuture<'a>;
}

impl<C: Chain> PaymentChannels for C {
    fn check_funded(
        &self,
        client: PartyKey,
        provider: PartyKey,
        amount: TokenAmount,
    ) -> CheckFuture<'_> {
        Box::pin(async move {
            let channel = self
                .channel_between(client, provider)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no payment channel from {client} to {provider}"))?;
            let state = self
                .channel(&channel)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("payment channel {} not found", channel.0))?;
            let available = state.balance.saturating_sub(state.redeemed);
            if state.settling_at.is_some() || state.collected {
                return Err(format!("payment channel {} is settling", channel.0));
            }
            if available < amount {
                return Err(format!(
                    "payment channel {} holds {} unredeemed, the deal costs {}",
                    channel.0, available.0, amount.0
                ));
            }
            Ok(())
        })
    }

    fn check_voucher<'a>(
        &'a self,
        voucher: &'a SignedVoucher,
        client: PartyKey,
        provider: PartyKey,
    ) -> CheckFuture<'a> {
        Box::pin(async move {
            let channel = &voucher.voucher.channel;
            let state = self
                .channel(channel)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("the voucher's channel {} does not exist", channel.0))?;
            if state.from != client || state.to != provider {
                return Err(format!("channel {} is not from this client to us", channel.0));
            }
            Chain::check_voucher(self, voucher).await.map_err(|e| e.to_string())
        })
    }
}
