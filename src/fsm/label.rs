//! Enumerable alphabets: states, inputs and outputs that can list themselves, so that tables,
//! diagrams and conformance tests can walk every (state, input) pair of a declaration.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Mutex, OnceLock};

/// A unit-variant enum that knows all its variants, their names and their doc comments.
pub trait Label: Copy + Eq + Hash + Debug + Send + Sync + 'static {
    /// Every variant, in declaration order.
    const ALL: &'static [Self];
    /// The variant's name, as written in the declaration.
    fn name(self) -> &'static str;
    /// The variant's stable numeric code, where it has one (states: the status code).
    fn code(self) -> Option<u16>;
    /// The variant's doc comment: what it means.
    fn doc(self) -> &'static str;

    /// The variant with this name.
    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == name)
    }
}

/// `DataTransferCompleted` → `data-transfer-completed`: the stored name of an event kind.
/// Names come only from declared alphabets, so the cache is bounded by their size.
pub fn kebab(name: &'static str) -> &'static str {
    static CACHE: OnceLock<Mutex<HashMap<&'static str, &'static str>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    let mut cache = cache.lock().unwrap_or_else(|poison| poison.into_inner());
    cache.entry(name).or_insert_with(|| {
        let mut out = String::with_capacity(name.len() + 4);
        for (i, c) in name.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        }
        Box::leak(out.into_boxed_str())
    })
}

/// Declares an alphabet enum and implements [`Label`] for it. With `= code` after each variant
/// the codes are explicit and stable (states); without, there are none (inputs, outputs).
#[macro_export]
macro_rules! alphabet {
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[doc = $doc:literal])* $variant:ident = $code:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[repr(u16)]
        $vis enum $name { $($(#[doc = $doc])* $variant = $code),+ }

        impl $crate::fsm::Label for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];
            fn name(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),+ }
            }
            fn code(self) -> Option<u16> {
                Some(self as u16)
            }
            fn doc(self) -> &'static str {
                match self { $($name::$variant => concat!($($doc),*).trim_ascii()),+ }
            }
        }
    };
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[doc = $doc:literal])* $variant:ident),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        $vis enum $name { $($(#[doc = $doc])* $variant),+ }

        impl $crate::fsm::Label for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];
            fn name(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),+ }
            }
            fn code(self) -> Option<u16> {
                None
            }
            fn doc(self) -> &'static str {
                match self { $($name::$variant => concat!($($doc),*).trim_ascii()),+ }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn kebab_splits_words_at_capitals() {
        assert_eq!(super::kebab("DataTransferCompleted"), "data-transfer-completed");
        assert_eq!(super::kebab("Active"), "active");
    }
}
