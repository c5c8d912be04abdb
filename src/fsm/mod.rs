//! The deal state machines. Each machine lives in its own module, with its
//! `rust_fsm::state_machine!` declaration on top: that table is the single source of truth for
//! which transitions exist.
