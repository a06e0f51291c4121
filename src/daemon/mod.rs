//! Daemon wiring: flags → config → store → backend → reconcile loop.

pub mod extif;
pub mod http;
