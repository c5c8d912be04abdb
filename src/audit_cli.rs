//! `dealledger audit` and `dealledger verify`.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};

use dealledger::audit::timeline::{self, AuditPoint, Timeline};
use dealledger::audit::{find_streams, verify};
use dealledger::events::Journal;

/// Parses `--at`: a version number or an RFC 3339 time.
pub fn parse_point(text: &str) -> anyhow::Result<AuditPoint> {
    if let Ok(version) = text.parse::<u32>() {
        return Ok(AuditPoint::Version(version));
    }
    let time = DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("--at {text:?} is neither a version nor an RFC 3339 time"))?;
    Ok(AuditPoint::Time(time.with_timezone(&Utc)))
}

fn print_timeline(t: &Timeline) {
    println!("{} {} ({} events)", t.stream_type, t.stream_id, t.events_in_stream);
    for e in &t.entries {
        let transition = match (e.from, e.to) {
            (Some(from), Some(to)) => format!("{from} -> {to}"),
            (Some(from), None) => format!("{from} -> ILLEGAL"),
            _ => "not replayed".into(),
        };
        let signatures: Vec<String> = e
            .signatures
            .iter()
            .map(|s| {
                format!(
                    "{} by {}: {}",
                    s.document,
                    s.signer,
                    if s.valid { "valid" } else { "INVALID" }
                )
            })
            .collect();
        println!(
            "  v{:<3} {}  {:<28} {:<48} {}",
            e.version,
            e.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f"),
            e.input.unwrap_or(&e.event_type),
            transition,
            if e.effects.is_empty() {
                String::new()
            } else {
                format!("effects: {}", e.effects.join(", "))
            }
        );
        if let Some(cause) = e.causation_id {
            println!(
                "        caused by {cause} (operation {})",
                e.correlation_id.map(|c| c.to_string()).unwrap_or_default()
            );
        }
        for s in signatures {
            println!("        signature: {s}");
        }
        if let Some(schema) = e.upcast_from {
            println!(
                "        stored with schema {schema} ({}), read through its upcaster",
                e.payload_hex
            );
        }
    }
    let v = &t.verdict;
    println!(
        "  state: {} (code {})",
        t.state.unwrap_or("not reproduced"),
        t.state_code.map(|c| c.to_string()).unwrap_or_default()
    );
    match &v.chain {
        None => println!("  verdict: hash chain intact"),
        Some(bad) => {
            println!("  verdict: hash chain BROKEN at version {}: {:?}", bad.version, bad.reason)
        }
    }
    match &v.first_illegal {
        None => println!("  verdict: every transition legal"),
        Some(i) => println!("  verdict: ILLEGAL at version {}: {}", i.version, i.reason),
    }
    for (version, document) in &v.bad_signatures {
        println!("  verdict: INVALID signature on the {document} at version {version}");
    }
    match &v.projection_diffs {
        None => println!("  verdict: status row not compared (partial or offline replay)"),
        Some(d) if d.is_empty() => println!("  verdict: reproduced state equals the status row"),
        Some(d) => {
            for diff in d {
                println!("  verdict: status row differs: {}: {}", diff.kind, diff.row);
            }
        }
    }
}

/// `dealledger audit`.
pub async fn audit(
    journal: &Journal,
    key: &str,
    json: bool,
    at: Option<String>,
) -> anyhow::Result<()> {
    let at = at.as_deref().map(parse_point).transpose()?;
    let mut all_hold = true;
    let mut timelines = Vec::new();
    for stream in find_streams(journal.pool(), key).await? {
        let timeline = timeline::audit(journal, stream, at).await?;
        all_hold &= timeline.verdict.holds();
        timelines.push(timeline);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&timelines)?);
    } else {
        for t in &timelines {
            print_timeline(t);
        }
    }
    if !all_hold {
        bail!("the audit found problems");
    }
    Ok(())
}

/// `dealledger verify`.
pub async fn verify(journal: &Journal, since: Option<i64>, json: bool) -> anyhow::Result<()> {
    let terminal = std::io::stderr().is_terminal();
    let bar = if terminal { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} verify: {pos} events ({per_sec}) {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let handle = bar.clone();
    let report = verify::verify_all(journal, since, &mut move |n| handle.set_position(n)).await;
    bar.finish_and_clear();
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "verified {} events in {} streams in {:.2} s ({:.0} events/s)",
            report.events,
            report.streams,
            report.seconds,
            report.events as f64 / report.seconds.max(1e-9)
        );
        for b in &report.broken {
            println!(
                "BROKEN {} {} at version {}: {}",
                b.stream_type, b.stream_id, b.version, b.reason
            );
        }
    }
    if !report.broken.is_empty() {
        bail!("{} broken streams", report.broken.len());
    }
    Ok(())
}

/// `dealledger checkpoint [--every MINUTES]`: signs the head of every stream with the node
/// key, once or periodically until interrupted.
pub async fn checkpoint(
    journal: &Journal,
    home: &std::path::Path,
    every: Option<u64>,
) -> anyhow::Result<()> {
    use dealledger::audit::identity;
    let key = identity::load_or_create(home)?;
    let Some(minutes) = every else {
        return sign_one(journal, &key).await;
    };
    let mut ticks = tokio::time::interval(Duration::from_secs(minutes.max(1) * 60));
    loop {
        tokio::select! {
            _ = ticks.tick() => sign_one(journal, &key).await?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn sign_one(journal: &Journal, key: &ed25519_dalek::SigningKey) -> anyhow::Result<()> {
    use dealledger::audit::checkpoint;
    let signed = checkpoint::create(journal, key, Utc::now()).await?;
    println!(
        "checkpoint {}: {} streams, {} events, root {}, signed by {}",
        signed.id,
        signed.statement.streams,
        signed.statement.events,
        signed.root().map(|c| c.to_string()).unwrap_or_default(),
        signed.signer
    );
    Ok(())
}

/// `dealledger checkpoint verify`: checks the journal against a checkpoint and every chain.
pub async fn verify_checkpoint(journal: &Journal, id: Option<i64>) -> anyhow::Result<()> {
    use dealledger::audit::checkpoint;
    let Some(found) = checkpoint::verify_against(journal, id).await? else {
        bail!("no checkpoint yet: run `dealledger checkpoint`");
    };
    println!(
        "checkpoint {} signed by {}: signature {}, root {}, {} pinned heads changed",
        found.id,
        found.signer,
        if found.signature_valid { "valid" } else { "INVALID" },
        if found.root_matches { "matches its heads" } else { "DOES NOT match its heads" },
        found.changed.len()
    );
    for (stream, version) in &found.changed {
        println!(
            "CHANGED {stream} at version {version}: history before the checkpoint was rewritten"
        );
    }
    verify(journal, None, false).await?;
    if !found.holds() {
        bail!("the journal no longer holds what checkpoint {} pinned", found.id);
    }
    Ok(())
}

/// `dealledger export`.
pub async fn export(journal: &Journal, key: &str, out: &std::path::Path) -> anyhow::Result<()> {
    let streams = find_streams(journal.pool(), key).await?;
    if streams.len() != 1 {
        bail!("{key} names {} streams; export one stream id", streams.len());
    }
    let bundle = dealledger::audit::bundle::export(journal, streams[0]).await?;
    std::fs::write(out, bundle.to_bytes()?).with_context(|| out.display().to_string())?;
    println!(
        "wrote {} ({} events{})",
        out.display(),
        bundle.events.len(),
        if bundle.checkpoint.is_some() {
            ", with a signed checkpoint"
        } else {
            ", no checkpoint yet"
        }
    );
    Ok(())
}

/// `dealledger verify-bundle`: needs no database.
pub fn verify_bundle(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    use dealledger::audit::bundle::DealBundle;
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    let bundle = DealBundle::from_bytes(&bytes)?;
    let verdict = bundle.verify()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&verdict)?);
    } else {
        print_timeline(&verdict.timeline);
        match &verdict.checkpoint {
            None => println!("  checkpoint: none in the bundle (only the chain is proven)"),
            Some(c) => println!(
                "  checkpoint by {}: signature {}, Merkle proof {}, pinned version {} {}",
                c.signer,
                if c.signature_valid { "valid" } else { "INVALID" },
                if c.proof_valid { "valid" } else { "INVALID" },
                c.pinned_version,
                if c.head_matches { "matches" } else { "DOES NOT match" }
            ),
        }
    }
    if !verdict.holds() {
        bail!("the bundle does not verify");
    }
    Ok(())
}
