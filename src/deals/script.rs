//! A scripted run of the seed's flows: plays every input a deal receives from the counterparty,
//! the transfer, the chain and the sealing pipeline, in order, through [`Deals::handle`]. The
//! demo uses it to show whole deals, and tests use it to bring deals into a given state.
//! Optionally each step also reloads the deal from the journal and checks that replay gives
//! the deal the live path produced.

use ed25519_dalek::SigningKey;
use uuid::Uuid;

use super::{Deals, DealsError};
use crate::domain::retrieval::{PaymentVoucher, RetrievalDealProposal, SignedVoucher};
use crate::domain::storage::{ClientDealProposal, StorageDeal};
use crate::domain::{ChainEpoch, DealId, SectorNumber, TokenAmount};
use crate::events::chain::cid_of_bytes;
use crate::fsm::retrieval_client::{RequestPart, RetrievalClient, RetrievalClientEvent as RC};
use crate::fsm::retrieval_provider::{RetrievalProvider, RetrievalProviderEvent as RP};
use crate::fsm::retrieval_request::{RetrievalRequestEvent as RR, RetrievalRequestMachine};
use crate::fsm::storage_client::{StorageClient, StorageClientEvent as SC};
use crate::fsm::storage_provider::{StorageProvider, StorageProviderEvent as SP};
use crate::fsm::{Deal, DecideContext, Machine};
use crate::projections::rows::Projected;

/// Why a scripted step failed.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The ledger refused or failed the step.
    #[error("{machine} step {step} failed: {source}")]
    Step {
        machine: &'static str,
        step: &'static str,
        #[source]
        source: DealsError,
    },
    /// Replaying the journal gave another deal than the live path: a bug in a machine's fold.
    #[error("{machine} stream {stream_id}: replay differs from the live deal")]
    ReplayMismatch { machine: &'static str, stream_id: Uuid },
}

/// The commands each side of a storage deal receives from proposal to `Active`, in order:
/// (client's, provider's). Pure: the same proposal always gives the same commands.
pub fn storage_deal_commands(
    proposal: ClientDealProposal,
    provider_key: &SigningKey,
) -> (Vec<SC>, Vec<SP>) {
    let size = proposal.proposal.piece_size.0;
    storage_deal_commands_moving(proposal, provider_key, size)
}

/// [`storage_deal_commands`] for a transfer of `data_bytes` bytes.
pub fn storage_deal_commands_moving(
    proposal: ClientDealProposal,
    provider_key: &SigningKey,
    data_bytes: u64,
) -> (Vec<SC>, Vec<SP>) {
    let terms = proposal.proposal.clone();
    let requirement = terms.client_balance_requirement().unwrap_or_default();
    let signed = StorageDeal::sign(proposal.clone(), provider_key);
    let size = data_bytes;
    let cid = proposal.cid();
    let publish = cid_of_bytes(&cid.to_bytes());
    let deal_id =
        DealId(u64::from_be_bytes(cid.hash().digest()[..8].try_into().unwrap_or_default()) >> 20);
    let sector = SectorNumber(deal_id.0 % 1_000);
    let client = vec![
        SC::DealInitiated { proposal: Box::new(proposal.clone()) },
        SC::FundsReserved { amount: requirement },
        SC::DealAccepted { deal: Box::new(signed.clone()) },
        SC::DataTransferStarted,
        SC::DataTransferProgressed { bytes: size / 2 },
        SC::DataTransferCompleted { bytes: size },
        SC::DealPublished { deal_id, message: publish },
        SC::PublishConfirmed,
        SC::DealPreCommitted { sector },
        SC::DealActivated { epoch: terms.start_epoch },
    ];
    let provider = vec![
        SP::ProposalReceived { proposal: Box::new(proposal) },
        SP::DealAccepted { deal: Box::new(signed) },
        SP::DataTransferStarted,
        SP::DataTransferProgressed { bytes: size / 2 },
        SP::DataTransferCompleted { bytes: size },
        SP::DataVerified { piece_cid: terms.piece_cid },
        SP::FundsReserved { amount: terms.provider_collateral },
        SP::PublishSent { message: publish },
        SP::DealPublished { deal_id },
        SP::DealHandedOff,
        SP::DealPreCommitted { sector },
        SP::DealActivated { epoch: terms.start_epoch },
        SP::DealFinalized,
    ];
    (client, provider)
}

/// Plays deals step by step.
pub struct Script<'a> {
    deals: &'a Deals,
    ctx: DecideContext,
    verify_replay: bool,
    /// Bytes the next storage deals transfer (their padded piece size when unset).
    pub data_bytes: Option<u64>,
    /// Steps played so far.
    pub steps: u32,
}

/// The identities a scripted run signs with.
pub struct Parties<'a> {
    /// The client's key (signs proposals and vouchers).
    pub client: &'a SigningKey,
    /// The provider's key (counter-signs deals).
    pub provider: &'a SigningKey,
}

impl<'a> Script<'a> {
    /// A script deciding at `ctx`; with `verify_replay`, every step is checked against replay.
    pub fn new(deals: &'a Deals, ctx: DecideContext, verify_replay: bool) -> Self {
        Self { deals, ctx, verify_replay, data_bytes: None, steps: 0 }
    }

    /// Plays one command.
    pub async fn step<M: Projected>(
        &mut self,
        stream_id: Uuid,
        command: M::Event,
    ) -> Result<Deal<M>, ScriptError> {
        use crate::events::JournalEvent;
        let step = command.event_type();
        let fail = |source| ScriptError::Step { machine: M::NAME, step, source };
        let decision =
            self.deals.handle::<M>(stream_id, command, &self.ctx, None).await.map_err(fail)?;
        if self.verify_replay {
            let replayed = self.deals.load::<M>(stream_id).await.map_err(fail)?;
            if replayed != decision.deal {
                return Err(ScriptError::ReplayMismatch { machine: M::NAME, stream_id });
            }
        }
        self.steps += 1;
        Ok(decision.deal)
    }

    /// A storage deal from proposal to `Active` on both sides (seed storage flow 1-10, then
    /// sealing and activation). Returns the (client, provider) streams.
    pub async fn storage_deal_to_active(
        &mut self,
        proposal: ClientDealProposal,
        parties: &Parties<'_>,
    ) -> Result<(Uuid, Uuid), ScriptError> {
        self.play_storage(proposal, parties, false).await
    }

    /// The chain's part of a storage deal whose data has been transferred and verified (client
    /// in CheckForAcceptance, provider in ReserveProviderFunds): funds, publish, sealing and
    /// activation, up to `Active` on both sides.
    pub async fn chain_to_active(
        &mut self,
        proposal: ClientDealProposal,
        parties: &Parties<'_>,
    ) -> Result<(Uuid, Uuid), ScriptError> {
        self.play_storage(proposal, parties, true).await
    }

    /// Plays [`storage_deal_commands_moving`] on both sides; with `after_transfer`, only the
    /// commands from DealPublished (client) and FundsReserved (provider) on.
    async fn play_storage(
        &mut self,
        proposal: ClientDealProposal,
        parties: &Parties<'_>,
        after_transfer: bool,
    ) -> Result<(Uuid, Uuid), ScriptError> {
        let client = Deals::storage_stream_id(StorageClient::NAME, &proposal);
        let provider = Deals::storage_stream_id(StorageProvider::NAME, &proposal);
        let data_bytes = self.data_bytes.unwrap_or(proposal.proposal.piece_size.0);
        let (client_commands, provider_commands) =
            storage_deal_commands_moving(proposal, parties.provider, data_bytes);
        let client_commands = client_commands
            .into_iter()
            .skip_while(|c| after_transfer && !matches!(c, SC::DealPublished { .. }));
        for command in client_commands {
            self.step::<StorageClient>(client, command).await?;
        }
        let provider_commands = provider_commands
            .into_iter()
            .skip_while(|c| after_transfer && !matches!(c, SP::FundsReserved { .. }));
        for command in provider_commands {
            self.step::<StorageProvider>(provider, command).await?;
        }
        Ok((client, provider))
    }

    /// Ends an active deal on both sides: expired at its end epoch, or slashed.
    pub async fn end_deal(
        &mut self,
        (client, provider): (Uuid, Uuid),
        slashed: bool,
        epoch: ChainEpoch,
    ) -> Result<(), ScriptError> {
        let (c, p) = if slashed {
            (SC::DealSlashed { epoch }, SP::DealSlashed { epoch })
        } else {
            (SC::DealExpired { epoch }, SP::DealExpired { epoch })
        };
        self.step::<StorageProvider>(provider, p).await?;
        self.step::<StorageClient>(client, c).await?;
        Ok(())
    }

    /// One payment stop: the client learns what arrived and what is asked, checks its funds and
    /// pays with `voucher`, and the provider takes it.
    async fn pay(
        &mut self,
        (client, provider): (Uuid, Uuid),
        received: RC,
        requested: RC,
        voucher: Box<SignedVoucher>,
    ) -> Result<(), ScriptError> {
        self.step::<RetrievalClient>(client, received).await?;
        self.step::<RetrievalClient>(client, requested).await?;
        self.step::<RetrievalClient>(client, RC::FundsAvailable).await?;
        self.step::<RetrievalClient>(client, RC::PaymentSent { voucher: voucher.clone() }).await?;
        self.step::<RetrievalProvider>(provider, RP::PaymentReceived { voucher }).await?;
        Ok(())
    }

    /// Fetches one part of a request through a client deal and a provider deal: pull, pause
    /// and pay at each interval, pay the last time, complete, and tell the request. Returns
    /// the number of vouchers paid.
    pub async fn retrieve_part(
        &mut self,
        request_id: Uuid,
        part_index: u32,
        terms: RetrievalDealProposal,
        parties: &Parties<'_>,
    ) -> Result<u32, ScriptError> {
        let (client, provider) = (Uuid::now_v7(), Uuid::now_v7());
        let part_of = Some(RequestPart { request_id, part_index });
        let channel = crate::domain::retrieval::ChannelAddress(format!(
            "t2-{}",
            &request_id.simple().to_string()[..12]
        ));
        let lane = u64::from(part_index);
        let voucher = |amount: TokenAmount, nonce: u64| {
            Box::new(SignedVoucher::sign(
                PaymentVoucher { channel: channel.clone(), lane, nonce, amount },
                parties.client,
            ))
        };
        let proposal = Box::new(terms.clone());
        self.step::<RetrievalClient>(
            client,
            RC::DealProposed { proposal: proposal.clone(), part_of },
        )
        .await?;
        self.step::<RetrievalRequestMachine>(
            request_id,
            RR::PartStarted { part_index, deal_stream: client },
        )
        .await?;
        self.step::<RetrievalProvider>(provider, RP::DealAccepted { proposal }).await?;
        self.step::<RetrievalProvider>(provider, RP::PieceUnsealed).await?;
        let setup = if part_index == 0 {
            RC::PaymentChannelCreateInitiated
        } else {
            RC::PaymentChannelAddFundsInitiated
        };
        for event in [
            RC::DealAccepted,
            setup,
            RC::PaymentChannelReady { channel: channel.clone() },
            RC::LaneAllocated { lane },
        ] {
            self.step::<RetrievalClient>(client, event).await?;
        }
        self.step::<RetrievalProvider>(provider, RP::DataTransferStarted).await?;
        let length = terms.part.length;
        let mut payments = 0u32;
        loop {
            let sent = terms.bytes_unlocked_after(payments).min(length);
            if sent == length {
                break;
            }
            let owed = self
                .step::<RetrievalProvider>(provider, RP::BlocksSent { bytes: sent })
                .await?
                .data
                .owed;
            let (received, requested) =
                (RC::BlocksReceived { bytes: sent }, RC::PaymentRequested { owed });
            let paid = voucher(owed, payments.into());
            self.pay((client, provider), received, requested, paid).await?;
            payments += 1;
        }
        let owed = self
            .step::<RetrievalProvider>(provider, RP::AllBlocksSent { bytes: length })
            .await?
            .data
            .owed;
        let (received, requested) =
            (RC::AllBlocksReceived { bytes: length }, RC::LastPaymentRequested { owed });
        self.pay((client, provider), received, requested, voucher(owed, payments.into())).await?;
        self.step::<RetrievalProvider>(provider, RP::CompletionSent).await?;
        self.step::<RetrievalClient>(client, RC::ProviderCompleted).await?;
        let paid = self.step::<RetrievalClient>(client, RC::CompletionVerified).await?.data.paid;
        self.step::<RetrievalRequestMachine>(
            request_id,
            RR::PartCompleted { part_index, deal_stream: client, bytes: length, paid },
        )
        .await?;
        Ok(payments + 1)
    }
}
