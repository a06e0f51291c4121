//! A secret flag value (the etcd password): kept as given, but `Debug` shows only whether it
//! is set, so the flags and the etcd config can derive `Debug` and be logged whole.

use std::fmt;

/// A secret string. `Debug` prints `"***"` (or `""` when empty), never the value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when no secret was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = if self.0.is_empty() { "" } else { "***" };
        fmt::Debug::fmt(shown, f)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_value() {
        assert_eq!(format!("{:?}", Secret::from("hunter2")), r#""***""#);
        assert_eq!(format!("{:?}", Secret::default()), r#""""#);
        assert_eq!(Secret::from("hunter2").expose(), "hunter2");
    }
}
