//! Writes the Rust code for the trimmed etcd v3 API (`proto/*.proto`) into the directory given
//! as the only argument: `etcdserverpb.rs` (messages and gRPC clients) and `mvccpb.rs`.
//! Clients only, without tonic's transport helpers (flannel-rs builds its own channel).

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: etcd-proto-gen OUT_DIR");
        std::process::exit(2);
    };
    let proto = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto");
    let result = tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .out_dir(PathBuf::from(out))
        .compile_protos(&[proto.join("rpc.proto"), proto.join("kv.proto")], &[proto]);
    if let Err(e) = result {
        eprintln!("etcd-proto-gen: {e}");
        std::process::exit(1);
    }
}
