//! Projections: SQL status tables folded from the journal. Nothing else writes them.
