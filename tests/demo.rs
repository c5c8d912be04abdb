//! The README's first command, in its small configuration, on a fresh home: it must finish,
//! and what it prints must show every deal where the seed's flows put it.

use std::process::Command;

#[test]
fn the_demo_runs_every_deal_to_its_expected_end() {
    let home = dealledger::db::testing::scratch_dir("demo").expect("a scratch directory");
    let output = Command::new(env!("CARGO_BIN_EXE_dealledger"))
        .args(["demo", "--deals", "2", "--size", "65536"])
        .env("DEALLEDGER_HOME", &home)
        .env_remove("DATABASE_URL")
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the demo failed:\n{stdout}\n{stderr}");
    let rows = |side: &str, state: &str| {
        stdout.lines().filter(|l| l.contains(side) && l.contains(&format!(" {state} "))).count()
    };
    // Two deals expired, one slashed and one failed on its piece commitment, on both sides.
    for side in ["storage_client", "storage_provider"] {
        assert_eq!(rows(side, "Expired"), 2, "{side} Expired:\n{stdout}");
        assert_eq!(rows(side, "Slashed"), 1, "{side} Slashed:\n{stdout}");
        assert_eq!(rows(side, "Error"), 1, "{side} Error:\n{stdout}");
    }
    assert!(stdout.contains("the data's commitment is"), "{stdout}");
    assert!(
        stdout.contains(": Completed (3 of 3 parts, 65536 of 65536 bytes verified"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "chain intact, transitions all legal, signatures valid, status row reproduced"
        ),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&home);
}
