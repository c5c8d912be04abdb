//! Runs a bench-only peer crate under `benches/peers/` (each its own workspace, never a
//! dependency of dealledger), built on demand into `target/peers`, so its figures print beside
//! ours in one run. `BENCH_PEERS=0` skips them.

use std::path::Path;
use std::process::Command;

/// Builds the peer `name` and runs it with `args`; returns the JSON object its last line of
/// stdout holds, or `None` after printing why there is none (switched off, build or run
/// failed).
pub fn run(name: &str, args: &[String]) -> Option<serde_json::Value> {
    if std::env::var("BENCH_PEERS").as_deref() == Ok("0") {
        eprintln!("BENCH_PEERS=0: the {name} peer is skipped");
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = root.join("benches/peers").join(name).join("Cargo.toml");
    let target = root.join("target/peers");
    eprintln!("building the {name} peer (first time: a few minutes)");
    let built = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .status();
    if !matches!(built, Ok(status) if status.success()) {
        eprintln!("the {name} peer did not build ({built:?}): its figures are missing");
        return None;
    }
    let binary = target.join("release").join(format!("{name}-peer"));
    eprintln!("running the {name} peer: {}", args.join(" "));
    let output = match Command::new(&binary).args(args).output() {
        Ok(output) if output.status.success() => output,
        Ok(output) => {
            eprintln!(
                "the {name} peer failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
            return None;
        }
        Err(e) => {
            eprintln!("cannot run {}: {e}", binary.display());
            return None;
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let parsed = stdout.lines().last().map(serde_json::from_str::<serde_json::Value>);
    match parsed {
        Some(Ok(value)) => Some(value),
        _ => {
            eprintln!("the {name} peer printed no JSON result:\n{stdout}");
            None
        }
    }
}
