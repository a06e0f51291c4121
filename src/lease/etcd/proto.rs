//! The etcd v3 API messages and gRPC clients flannel-rs uses, generated from the trimmed
//! `.proto` files in `tools/etcd-proto-gen/proto/` and committed, so building needs no
//! `protoc`. Regenerate with `scripts/gen-etcd-proto`; `tests/etcd_proto.rs` checks that the
//! committed files are what the generator writes. Do not edit `proto/*.rs` by hand.

/// etcd's `mvccpb` package: stored keys and watch events.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod mvccpb {
    include!("proto/mvccpb.rs");
}

/// etcd's `etcdserverpb` package: the KV, Watch, Lease and Auth services.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod etcdserverpb {
    include!("proto/etcdserverpb.rs");
}
