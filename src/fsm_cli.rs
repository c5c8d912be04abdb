//! `dealledger fsm ...`: list, show, draw and document the declared machines.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};

use dealledger::fsm::table::{self, MachineTable};

/// The `fsm` subcommands.
#[derive(Subcommand)]
pub enum FsmCommand {
    /// Lists the machines.
    List,
    /// Prints a machine's transitions and states.
    Show {
        /// storage_client, storage_provider, retrieval_client, retrieval_provider, retrieval_request
        machine: String,
        /// Prints {"machine", "initial", "states", "transitions"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Prints a machine's state diagram.
    Diagram {
        /// The machine.
        machine: String,
        /// Mermaid or Graphviz dot.
        #[arg(long, value_enum, default_value_t = DiagramFormat::Mermaid)]
        format: DiagramFormat,
    },
    /// Writes docs/fsm/<machine>.md for every machine (or checks them with --check).
    Docs {
        /// Where the docs go.
        #[arg(long, default_value = "docs/fsm")]
        dir: PathBuf,
        /// Only report stale files; exit non-zero if any.
        #[arg(long)]
        check: bool,
    },
}

/// Diagram formats.
#[derive(Clone, Copy, ValueEnum)]
pub enum DiagramFormat {
    /// Mermaid stateDiagram-v2.
    Mermaid,
    /// Graphviz dot.
    Dot,
}

fn machine(name: &str) -> anyhow::Result<MachineTable> {
    table::by_name(name).with_context(|| {
        let names: Vec<_> = table::all().iter().map(|t| t.machine).collect();
        format!("no machine {name:?}; the machines are {}", names.join(", "))
    })
}

/// Runs an `fsm` subcommand.
pub fn run(command: &FsmCommand) -> anyhow::Result<()> {
    match command {
        FsmCommand::List => {
            println!(
                "{:<20} {:>6} {:>6} {:>11}  initial",
                "machine", "states", "inputs", "transitions"
            );
            for t in table::all() {
                let inputs: std::collections::HashSet<_> =
                    t.transitions.iter().map(|r| r.input).collect();
                println!(
                    "{:<20} {:>6} {:>6} {:>11}  {}",
                    t.machine,
                    t.states.len(),
                    inputs.len(),
                    t.transitions.len(),
                    t.initial
                );
            }
        }
        FsmCommand::Show { machine: name, json } => {
            let t = machine(name)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                print!("{}", t.text());
            }
        }
        FsmCommand::Diagram { machine: name, format } => {
            let t = machine(name)?;
            match format {
                DiagramFormat::Mermaid => print!("{}", t.mermaid()),
                DiagramFormat::Dot => print!("{}", t.dot()),
            }
        }
        FsmCommand::Docs { dir, check } => {
            if *check {
                let stale = table::stale_docs(dir);
                if !stale.is_empty() {
                    bail!("stale: {stale:?}; run `dealledger fsm docs`");
                }
                println!("docs in {} are fresh", dir.display());
            } else {
                std::fs::create_dir_all(dir)?;
                for (path, content) in table::generated_docs(dir) {
                    std::fs::write(&path, content).with_context(|| path.display().to_string())?;
                    println!("wrote {}", path.display());
                }
            }
        }
    }
    Ok(())
}
