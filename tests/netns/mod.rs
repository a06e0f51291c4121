//! The cluster tests' scaffolding lives in the workspace's `test-support` crate.
#![allow(unused_imports)]

pub use test_support::cluster::*;
