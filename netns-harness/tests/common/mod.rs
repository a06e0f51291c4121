//! The harness tests' scaffolding lives in the workspace's `test-support` crate.
#![allow(unused_imports)]

pub use test_support::cluster::{
    harness_bin, kernel_refs, leftover as leftover_namespaces, serial, sh, spec, test_prefix,
};
