//! Daemon wiring.
