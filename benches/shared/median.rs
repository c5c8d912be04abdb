//! The median the benches report for repeated rounds, shared by the benches that include it.

/// The median of `rates` (the upper one of an even count); sorts them in place.
pub fn median(rates: &mut [f64]) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}
