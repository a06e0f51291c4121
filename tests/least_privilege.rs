//! Both data planes under upstream's securityContext: `privileged: false` with a container's
//! default capabilities plus NET_ADMIN and NET_RAW (kube-flannel.yml), applied with `setpriv`
//! inside each node's namespace, started the way a systemd `Type=notify` unit starts it
//! (`NOTIFY_SOCKET`); and the one-line error when `/dev/net/tun` is not there.
//! Privileged: run as root (CI=true makes them mandatory).

mod netns;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use netns::*;
use netns_harness::{privileged_test_guard, NodeKind};

use NodeKind::{Kernel, KernelRef, Userspace};

/// Docker's default capability set plus NET_ADMIN (NET_RAW is already in it), as `setpriv`
/// capability names.
const CONTAINER_CAPS: &[&str] = &[
    "chown",
    "dac_override",
    "fsetid",
    "fowner",
    "mknod",
    "net_raw",
    "setgid",
    "setuid",
    "setfcap",
    "setpcap",
    "net_bind_service",
    "sys_chroot",
    "kill",
    "audit_write",
    "net_admin",
];

/// The same set as a capability mask (numbers from linux/capability.h).
const CONTAINER_CAP_MASK: u64 = (1 << 0) // chown
    | (1 << 1) // dac_override
    | (1 << 3) // fowner
    | (1 << 4) // fsetid
    | (1 << 5) // kill
    | (1 << 6) // setgid
    | (1 << 7) // setuid
    | (1 << 8) // setpcap
    | (1 << 10) // net_bind_service
    | (1 << 12) // net_admin
    | (1 << 13) // net_raw
    | (1 << 18) // sys_chroot
    | (1 << 27) // mknod
    | (1 << 29) // audit_write
    | (1 << 31); // setfcap

/// `setpriv` dropping everything outside [`CONTAINER_CAPS`] from the bounding and
/// inheritable sets, so root keeps exactly those (what a container runtime does).
fn setpriv_prefix() -> Vec<String> {
    let bounding: Vec<String> = CONTAINER_CAPS.iter().map(|c| format!("+{c}")).collect();
    vec![
        "setpriv".into(),
        format!("--bounding-set=-all,{}", bounding.join(",")),
        "--inh-caps=-all".into(),
    ]
}

/// A `/proc/<pid>/status` capability field.
fn cap_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:\t")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(line.trim(), 16).expect("hex mask")
}

#[test]
fn both_planes_pass_the_matrix_with_container_capabilities() {
    if !privileged_test_guard("both_planes_pass_the_matrix_with_container_capabilities") {
        return;
    }
    let _g = serial();
    let dir = std::env::temp_dir().join(format!("flannel-rs-lp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");

    let mut s = spec(&[Userspace, Kernel, KernelRef], 1);
    s.flanneld_prefix = vec![
        "env".into(),
        format!("NOTIFY_SOCKET={}", notify_path.display()),
    ];
    s.flanneld_prefix.extend(setpriv_prefix());
    s.ip_masq = true;
    let c = netns_harness::Cluster::up(&s).expect("cluster up under setpriv");

    // Each daemon told "systemd" it is ready (after writing subnet.env, which up() waited
    // for), exactly once.
    let mut buf = [0u8; 64];
    for _ in 0..2 {
        let n = notify.recv(&mut buf).expect("READY=1 from each flanneld");
        assert_eq!(&buf[..n], b"READY=1");
    }
    notify.set_nonblocking(true).expect("nonblocking");
    assert!(
        notify.recv(&mut buf).is_err(),
        "more than one READY=1 per daemon"
    );

    // The daemons really run with only the container's capabilities (no CAP_SYS_ADMIN).
    for node in ["n1", "n2"] {
        let pid = c
            .node(node)
            .and_then(|n| n.flanneld.as_ref())
            .expect("flanneld running")
            .pid;
        assert_eq!(cap_field(pid, "CapBnd"), CONTAINER_CAP_MASK, "{node}");
        assert_eq!(cap_field(pid, "CapEff"), CONTAINER_CAP_MASK, "{node}");
        assert_eq!(
            cap_field(pid, "CapEff") & (1 << 21),
            0,
            "{node}: CAP_SYS_ADMIN"
        );
    }

    // --ip-masq worked without CAP_SYS_ADMIN: the rules are where the node's iptables sees them.
    for node in ["n1", "n2"] {
        let ns = c.node(node).expect("node").ns.clone();
        let nat = sh(&c, &ns, &["iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG"]);
        assert!(nat.contains("-j MASQUERADE"), "{node}: {nat}");
    }

    // Userspace <-> kernel <-> upstream-programmed kernel-ref, every direction.
    let m = c.check_until_pass(Duration::from_secs(10));
    println!("{m}");
    assert!(m.all_pass(), "{m}");
    for (a, b) in [("n1p1", "n2p1"), ("n1p1", "n3p1"), ("n2p1", "n3p1")] {
        assert_eq!(m.cell(a, b).expect("cell").letters(), "ITUD", "{a}->{b}");
        assert_eq!(m.cell(b, a).expect("cell").letters(), "ITUD", "{b}->{a}");
    }
    teardown(c);
    std::fs::remove_dir_all(&dir).expect("remove temp dir");
}

#[test]
fn missing_dev_net_tun_is_one_line_naming_path_and_fix() {
    if !privileged_test_guard("missing_dev_net_tun_is_one_line_naming_path_and_fix") {
        return;
    }
    let _g = serial();
    let mut s = spec(&[Userspace], 1);
    // A container without the device: an empty /dev/net in a private mount namespace of
    // this flanneld only (the host's /dev is untouched).
    s.flanneld_prefix = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs none /dev/net && exec \"$@\"",
        "sh",
    ]
    .map(String::from)
    .to_vec();
    s.ready_timeout = Duration::from_secs(10);
    let err =
        netns_harness::Cluster::up(&s).expect_err("flanneld must not start without /dev/net/tun");
    let text = format!("{err:#}");
    let line = text
        .lines()
        .find(|l| l.contains("/dev/net/tun"))
        .unwrap_or_else(|| panic!("no line names /dev/net/tun:\n{text}"));
    println!("{line}");
    assert!(line.contains("cannot open /dev/net/tun"), "{line}");
    assert!(line.contains("No such file or directory"), "{line}");
    assert!(
        line.contains("hostPath /dev/net/tun, type: CharDevice"),
        "{line}"
    );
    assert!(line.contains("--dataplane=kernel"), "{line}");
    assert!(
        line.starts_with("flanneld: Error registering network: ") || line.contains("ERROR"),
        "{line}"
    );
}
