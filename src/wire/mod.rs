//! Wire formats: zero-copy views over packet bytes.
pub mod mac;
pub use mac::MacAddr;
