//! The declared tables, read back from the machines: every (state, input) pair is asked of
//! `transition` and `output`, so listings, diagrams and docs can never drift from the
//! `state_machine!` declarations.

use serde::Serialize;

use super::label::kebab;
use super::{Label, Machine};

/// One state of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateRow {
    /// The state's name.
    pub name: &'static str,
    /// Its status code (go-fil-markets' numbering where one exists).
    pub code: Option<u16>,
    /// Whether it accepts no input.
    pub terminal: bool,
    /// What the state means.
    #[serde(skip)]
    pub meaning: &'static str,
}

/// One declared transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransitionRow {
    /// State before.
    pub from: &'static str,
    /// The input.
    pub input: &'static str,
    /// State after.
    pub to: &'static str,
    /// The effects the transition triggers, by output name (kebab-case).
    pub effects: Vec<&'static str>,
}

/// A machine's whole declaration, as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineTable {
    /// The machine's name.
    pub machine: &'static str,
    /// The initial state.
    pub initial: &'static str,
    /// Every state, in declaration order of the state enum.
    pub states: Vec<StateRow>,
    /// Every transition, ordered by state then input.
    pub transitions: Vec<TransitionRow>,
    /// Every input with who sends it, in declaration order.
    pub producers: Vec<(&'static str, String)>,
}

/// Reads a machine's table back from its declaration.
pub fn table<M: Machine>() -> MachineTable {
    let states = M::State::ALL
        .iter()
        .map(|&s| StateRow {
            name: s.name(),
            code: s.code(),
            terminal: M::is_terminal(s),
            meaning: s.doc(),
        })
        .collect();
    let mut transitions = Vec::new();
    for &from in M::State::ALL {
        for &input in M::Input::ALL {
            if let Some(to) = M::transition(from, input) {
                transitions.push(TransitionRow {
                    from: from.name(),
                    input: input.name(),
                    to: to.name(),
                    effects: M::output(from, input).map(|o| kebab(o.name())).into_iter().collect(),
                });
            }
        }
    }
    let producers = M::Input::ALL.iter().map(|&i| (i.name(), M::producer(i).to_string())).collect();
    MachineTable { machine: M::NAME, initial: M::INITIAL.name(), states, transitions, producers }
}

/// The tables of every machine of the ledger.
pub fn all() -> Vec<MachineTable> {
    vec![
        table::<super::storage_client::StorageClient>(),
        table::<super::storage_provider::StorageProvider>(),
        table::<super::retrieval_client::RetrievalClient>(),
        table::<super::retrieval_provider::RetrievalProvider>(),
        table::<super::retrieval_request::RetrievalRequestMachine>(),
    ]
}

/// The table of the machine called `name`.
pub fn by_name(name: &str) -> Option<MachineTable> {
    all().into_iter().find(|t| t.machine == name)
}

impl MachineTable {
    /// A Mermaid `stateDiagram-v2`.
    pub fn mermaid(&self) -> String {
        let mut out = String::from("stateDiagram-v2\n");
        out.push_str(&format!("    [*] --> {}\n", self.initial));
        for t in &self.transitions {
            let effects = if t.effects.is_empty() {
                String::new()
            } else {
                format!(" / {}", t.effects.join(", "))
            };
            out.push_str(&format!("    {} --> {}: {}{}\n", t.from, t.to, t.input, effects));
        }
        for s in self.states.iter().filter(|s| s.terminal) {
            out.push_str(&format!("    {} --> [*]\n", s.name));
        }
        out
    }

    /// A Graphviz digraph.
    pub fn dot(&self) -> String {
        let mut out =
            format!("digraph {} {{\n    rankdir=LR;\n    node [shape=box];\n", self.machine);
        for s in self.states.iter().filter(|s| s.terminal) {
            out.push_str(&format!("    {} [peripheries=2];\n", s.name));
        }
        out.push_str(&format!("    start [shape=point];\n    start -> {};\n", self.initial));
        for t in &self.transitions {
            let label =
                std::iter::once(t.input).chain(t.effects.iter().copied()).collect::<Vec<_>>();
            out.push_str(&format!(
                "    {} -> {} [label=\"{}\"];\n",
                t.from,
                t.to,
                label.join("\\n/ ")
            ));
        }
        out.push_str("}\n");
        out
    }

    /// A plain-text table of transitions for terminals.
    pub fn text(&self) -> String {
        let width =
            |f: fn(&TransitionRow) -> usize| self.transitions.iter().map(f).max().unwrap_or(0);
        let (wf, wi, wt) =
            (width(|t| t.from.len()), width(|t| t.input.len()), width(|t| t.to.len()));
        let mut out = format!("{} (initial: {})\n\n", self.machine, self.initial);
        out.push_str(&format!("{:<wf$}  {:<wi$}  {:<wt$}  effects\n", "from", "input", "to"));
        for t in &self.transitions {
            out.push_str(&format!(
                "{:<wf$}  {:<wi$}  {:<wt$}  {}\n",
                t.from,
                t.input,
                t.to,
                t.effects.join(", ")
            ));
        }
        out.push_str("\nstates:\n");
        for s in &self.states {
            let code = s.code.map(|c| c.to_string()).unwrap_or_default();
            let terminal = if s.terminal { " (terminal)" } else { "" };
            out.push_str(&format!("  {:>3}  {}{}: {}\n", code, s.name, terminal, s.meaning));
        }
        out
    }

    /// The generated `docs/fsm/<machine>.md`.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "# `{}` state machine\n\n<!-- Generated by `dealledger fsm docs`; do not edit. -->\n\n\
             Initial state: `{}`. Terminal states accept no input.\n\n```mermaid\n{}```\n\n\
             ## States\n\n| code | state | terminal | meaning |\n|---|---|---|---|\n",
            self.machine,
            self.initial,
            self.mermaid()
        );
        for s in &self.states {
            let code = s.code.map(|c| c.to_string()).unwrap_or_default();
            let terminal = if s.terminal { "yes" } else { "" };
            out.push_str(&format!("| {} | `{}` | {} | {} |\n", code, s.name, terminal, s.meaning));
        }
        out.push_str("\n## Transitions\n\n| from | input | to | effects |\n|---|---|---|---|\n");
        for t in &self.transitions {
            out.push_str(&format!(
                "| `{}` | `{}` | `{}` | {} |\n",
                t.from,
                t.input,
                t.to,
                t.effects.iter().map(|e| format!("`{e}`")).collect::<Vec<_>>().join(", ")
            ));
        }
        out.push_str("\n## Inputs and who sends them\n\n| input | producer |\n|---|---|\n");
        for (input, producer) in &self.producers {
            out.push_str(&format!("| `{input}` | {producer} |\n"));
        }
        out
    }
}

/// The generated doc file of each machine, relative to `dir`, with its content.
pub fn generated_docs(dir: &std::path::Path) -> Vec<(std::path::PathBuf, String)> {
    all().iter().map(|t| (dir.join(format!("{}.md", t.machine)), t.markdown())).collect()
}

/// The doc files under `dir` that are missing or differ from the declarations.
pub fn stale_docs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    generated_docs(dir)
        .into_iter()
        .filter(|(path, content)| std::fs::read_to_string(path).ok().as_deref() != Some(content))
        .map(|(path, _)| path)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_machine_docs_are_fresh() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/fsm");
        let stale = stale_docs(&dir);
        assert!(
            stale.is_empty(),
            "stale machine docs {stale:?}: run `cargo run -- fsm docs` and commit the result"
        );
    }

    #[test]
    fn the_table_lists_every_state_with_its_status_code() {
        let provider = by_name("storage_provider").expect("a declared machine");
        let active = provider.states.iter().find(|s| s.name == "Active").expect("Active");
        assert_eq!((active.code, active.terminal), (Some(7), false));
        assert!(provider.transitions.iter().any(|t| t.from == "Publishing"
            && t.input == "DealPublished"
            && t.to == "Staged"
            && t.effects == ["hand-off-to-sealing"]));
        let json = serde_json::to_value(&provider).expect("serialisable");
        assert_eq!(json["initial"], "Unknown");
        assert!(json["states"][0].get("meaning").is_none());
    }
}
