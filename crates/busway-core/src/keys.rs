//! Case-insensitive matching of JSON field names for the hand-written deserializers of the
//! envelope and the host (MassTransit writes camelCase, older writers PascalCase).

use std::fmt;

use serde::Deserializer;
use serde::de::Visitor;

/// Matches a map key against a fixed list of names without regard to ASCII case, without
/// copying the key; yields the matching entry's value, or `None` for an unknown key.
///
/// Writers put the fields in one order, so the name after the last match is tried first
/// (`next`, shared by the keys of one map): a whole envelope then costs one comparison per
/// key instead of a scan of the list.
pub(crate) struct KeyIn<'c, T: Copy + 'static> {
    names: &'static [(&'static str, T)],
    next: &'c std::cell::Cell<usize>,
}

impl<'c, T: Copy + 'static> KeyIn<'c, T> {
    pub(crate) fn new(
        names: &'static [(&'static str, T)],
        next: &'c std::cell::Cell<usize>,
    ) -> Self {
        Self { names, next }
    }
}

impl<'de, T: Copy + 'static> serde::de::DeserializeSeed<'de> for KeyIn<'_, T> {
    type Value = Option<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, T: Copy + 'static> Visitor<'de> for KeyIn<'_, T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<T>, E> {
        let expected = self.next.get();
        let index = match self.names.get(expected) {
            Some((name, _)) if *name == v || name.eq_ignore_ascii_case(v) => Some(expected),
            _ => self
                .names
                .iter()
                .position(|(name, _)| name.eq_ignore_ascii_case(v)),
        };
        Ok(index.map(|i| {
            self.next.set(i + 1);
            self.names[i].1
        }))
    }
}
