//! Upstream settings flannel-rs does not implement: refused at start-up with what to do, or
//! (for settings that cannot change anything in this binary) accepted with one warning saying
//! why. Nothing upstream accepts is silently ignored (issue #11). Pure: flags, network config
//! and an environment lookup in, a decision out.

use crate::config::flags::{Dataplane, Flags};
use crate::config::netconf::{BackendConfig, NetConfig};

/// What start-up must do about the settings it was given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// Settings that cannot run: each message says what to change. Non-empty: exit 1.
    pub refused: Vec<String>,
    /// Settings accepted without effect, with why (logged once as warnings).
    pub ignored: Vec<String>,
}

/// Decides about every upstream setting flannel-rs does not implement.
pub fn check(flags: &Flags, net: &NetConfig, env: &dyn Fn(&str) -> Option<String>) -> Decision {
    let mut d = Decision::default();
    if let Ok(BackendConfig::Vxlan(vx)) = net.backend() {
        if vx.gbp && flags.dataplane == Dataplane::Userspace {
            d.refused.push(
                "Backend.GBP (VXLAN Group Based Policy) is not implemented by the userspace data plane: \
                 run --dataplane=kernel (the kernel vxlan device sets GBP), or set \"GBP\": false"
                    .into(),
            );
        }
    }
    if let (Some(v6), false) = (flags.public_ipv6, net.enable_ipv6) {
        d.ignored.push(format!(
            "--public-ipv6={v6}: no effect; EnableIPv6 is false in the network config, so no IPv6 \
             address is published"
        ));
    }
    if !flags.vmodule.is_empty() {
        d.ignored.push(format!(
            "-vmodule={}: ignored; it selects klog verbosity per Go source file, which this Rust binary does not have: \
             use -v, or RUST_LOG=flannel_rs::<module>=debug for per-module levels",
            flags.vmodule
        ));
    }
    if !flags.log_backtrace_at.is_empty() {
        d.ignored.push(format!(
            "-log_backtrace_at={}: ignored; it names a Go source line to print a stack trace at, which this Rust binary does not have: \
             set RUST_BACKTRACE=1 for backtraces of errors",
            flags.log_backtrace_at
        ));
    }
    if let Some(raw) = env("EVENT_QUEUE_DEPTH").filter(|v| !v.is_empty()) {
        match raw.trim().parse::<i64>() {
            // flannel's own message for a value that is not an integer.
            Err(_) => d.refused.push(format!(
                "env EVENT_QUEUE_DEPTH={raw} format error: set it to an integer (default 5000) or unset it"
            )),
            Ok(_) if flags.kube_subnet_mgr => d.ignored.push(format!(
                "EVENT_QUEUE_DEPTH={raw}: no effect; flannel-rs does not queue node events one by one \
                 (each watch update replaces the whole peer set), so there is no queue to size"
            )),
            Ok(_) => d.ignored.push(format!(
                "EVENT_QUEUE_DEPTH={raw}: no effect; it sizes the Kubernetes node-event queue and this flanneld does not use --kube-subnet-mgr"
            )),
        }
    }
    if env("CONT_WHEN_CACHE_NOT_READY").as_deref() == Some("true") {
        d.ignored.push(
            "CONT_WHEN_CACHE_NOT_READY=true: already how flannel-rs behaves; it never waits for a node cache to sync \
             at start-up (peers are programmed after the first successful list, retried until it succeeds)"
                .into(),
        );
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(json: &str) -> NetConfig {
        NetConfig::parse(json).expect("net-conf")
    }

    fn vxlan() -> NetConfig {
        net(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_and_the_default_manifest_pass_silently() {
        let d = check(&Flags::default(), &vxlan(), &no_env);
        assert_eq!(d, Decision::default());
        // upstream's kube-flannel.yml sets CONT_WHEN_CACHE_NOT_READY=false: nothing to say.
        let env = |k: &str| (k == "CONT_WHEN_CACHE_NOT_READY").then(|| "false".to_owned());
        assert_eq!(
            check(&Flags::default(), &vxlan(), &env),
            Decision::default()
        );
    }

    #[test]
    fn nftables_mode_is_accepted() {
        let n =
            net(r#"{"Network":"10.244.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#);
        assert_eq!(check(&Flags::default(), &n, &no_env), Decision::default());
    }

    #[test]
    fn gbp_is_refused_in_userspace_mode_only() {
        let n = net(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","GBP":true}}"#);
        let d = check(&Flags::default(), &n, &no_env);
        assert_eq!(d.refused.len(), 1, "{d:?}");
        assert!(d.refused[0].contains("--dataplane=kernel"));
        let kernel = Flags {
            dataplane: Dataplane::Kernel,
            ..Flags::default()
        };
        assert!(check(&kernel, &n, &no_env).refused.is_empty());
    }

    #[test]
    fn public_ipv6_without_ipv6_is_ignored_with_a_warning() {
        let f = Flags {
            public_ipv6: Some("2001:db8::1".parse().expect("v6")),
            ..Flags::default()
        };
        let d = check(&f, &vxlan(), &no_env);
        assert!(d.refused.is_empty(), "{d:?}");
        assert_eq!(d.ignored.len(), 1);
        assert!(d.ignored[0].contains("EnableIPv6 is false"));
    }

    #[test]
    fn ipv6_vxlan_runs_on_either_data_plane() {
        let dual = net(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:42::/56","Backend":{"Type":"vxlan"}}"#,
        );
        let f = Flags {
            dataplane: Dataplane::Userspace,
            public_ipv6: Some("2001:db8::1".parse().expect("v6")),
            ..Flags::default()
        };
        assert_eq!(check(&f, &dual, &no_env), Decision::default());
        let kernel = Flags {
            dataplane: Dataplane::Kernel,
            ..f
        };
        assert_eq!(check(&kernel, &dual, &no_env), Decision::default());
    }

    #[test]
    fn klog_flags_are_accepted_with_one_warning_each() {
        let f = Flags {
            vmodule: "foo=2".into(),
            log_backtrace_at: "main.go:12".into(),
            ..Flags::default()
        };
        let d = check(&f, &vxlan(), &no_env);
        assert!(d.refused.is_empty());
        assert_eq!(d.ignored.len(), 2);
        assert!(d.ignored[0].starts_with("-vmodule=foo=2: ignored"));
        assert!(d.ignored[1].starts_with("-log_backtrace_at=main.go:12: ignored"));
    }

    #[test]
    fn event_queue_depth_is_validated_like_flannel_then_warned() {
        let f = Flags {
            kube_subnet_mgr: true,
            ..Flags::default()
        };
        let bad = |k: &str| (k == "EVENT_QUEUE_DEPTH").then(|| "lots".to_owned());
        let d = check(&f, &vxlan(), &bad);
        assert_eq!(
            d.refused,
            ["env EVENT_QUEUE_DEPTH=lots format error: set it to an integer (default 5000) or unset it"]
        );
        let good = |k: &str| (k == "EVENT_QUEUE_DEPTH").then(|| "5000".to_owned());
        let d = check(&f, &vxlan(), &good);
        assert!(d.refused.is_empty());
        assert_eq!(d.ignored.len(), 1);
        assert!(d.ignored[0].contains("no effect"));
    }

    #[test]
    fn cont_when_cache_not_ready_true_is_named() {
        let env = |k: &str| (k == "CONT_WHEN_CACHE_NOT_READY").then(|| "true".to_owned());
        let d = check(&Flags::default(), &vxlan(), &env);
        assert!(d.refused.is_empty());
        assert_eq!(d.ignored.len(), 1);
        assert!(d.ignored[0].contains("already how flannel-rs behaves"));
    }
}
