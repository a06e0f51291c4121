//! `/metrics` of a running flanneld, read by a real Prometheus text-format parser (the Python
//! `prometheus_client` package, Debian's `python3-prometheus-client`): every family's name,
//! type, help and labels. Two userspace nodes on the lease directory, one refused lease.
//! Privileged: run as root (CI=true makes it mandatory).

mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flannel_rs::dataplane::DropReason;
use netns::*;
use netns_harness::{privileged_test_guard, Cluster, NodeKind};
use serde_json::Value;

/// Port of n1's `/metrics` (on 127.0.0.1 inside n1).
const METRICS_PORT: u16 = 9104;

/// Debian's interpreter, where `python3-prometheus-client` installs (scripts/install-deps.sh);
/// a `python3` earlier in PATH may lack the package.
const PYTHON: &str = "/usr/bin/python3";

/// Run inside n1: fetches `/metrics`, parses it with `prometheus_client`'s text parser and
/// prints the families as JSON (name, type, help, samples with labels and value) with the
/// response's Content-Type.
const SCRAPE: &str = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
resp = urllib.request.urlopen(sys.argv[1], timeout=5)
text = resp.read().decode()
families = [
    {"name": f.name, "type": f.type, "help": f.documentation,
     "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
    for f in text_string_to_metric_families(text)
]
print(json.dumps({"content_type": resp.headers.get("Content-Type"), "families": families}))
"#;

/// One parsed family.
#[derive(Debug)]
struct Family {
    kind: String,
    help: String,
    /// (sample name, labels, value).
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Family {
    /// The value of the sample with exactly these labels.
    fn value(&self, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|(_, l, _)| *l == want)
            .map(|(_, _, v)| *v)
    }
}

/// n1's `/metrics` as parsed by Python: Content-Type and families by name.
fn scrape(c: &Cluster) -> (String, BTreeMap<String, Family>) {
    let url = format!("http://127.0.0.1:{METRICS_PORT}/metrics");
    let out = sh(c, "n1", &[PYTHON, "-c", SCRAPE, &url]);
    let v: Value = serde_json::from_str(out.trim()).expect("parser output is JSON");
    let mut families = BTreeMap::new();
    for f in v["families"].as_array().expect("families") {
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let samples = f["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .map(|x| {
                let labels = x["labels"]
                    .as_object()
                    .expect("labels")
                    .iter()
                    .map(|(k, v)| (k.clone(), s(v)))
                    .collect();
                (s(&x["name"]), labels, x["value"].as_f64().expect("value"))
            })
            .collect();
        let fam = Family {
            kind: s(&f["type"]),
            help: s(&f["help"]),
            samples,
        };
        assert!(
            families.insert(s(&f["name"]), fam).is_none(),
            "family twice: {f}"
        );
    }
    (s_of(&v["content_type"]), families)
}

fn s_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

#[test]
fn metrics_parse_with_the_prometheus_client_parser() {
    if !privileged_test_guard("metrics_parse_with_the_prometheus_client_parser") {
        return;
    }
    let ok = std::process::Command::new(PYTHON)
        .args(["-c", "import prometheus_client.parser"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{PYTHON} lacks prometheus_client: apt-get install python3-prometheus-client (scripts/install-deps.sh)"
    );
    let _g = serial();
    let mut s = spec(&[NodeKind::Userspace, NodeKind::Userspace], 1);
    s.nodes[0].extra_args = vec![
        format!("--metrics-port={METRICS_PORT}"),
        "--peer-probe-interval=1".into(),
    ];
    let c = Cluster::up(&s).expect("cluster up");
    // Traffic both ways, so the packet counters move.
    let m = c.check_until_pass(Duration::from_secs(10));
    assert!(m.all_pass(), "{m}");
    // A lease equal to Network: refused as outside_network.
    std::fs::write(
        c.lease_dir().subnets_dir().join("10.244.0.0-16"),
        r#"{"PublicIP":"198.18.0.77","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:07:07"}}"#,
    )
    .expect("write lease");

    let peer = [
        ("subnet", c.node_subnet("n2").expect("subnet").to_string()),
        ("public_ip", c.node_ip("n2").expect("ip").to_string()),
    ];
    let peer: Vec<(&str, &str)> = peer.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut last = (String::new(), BTreeMap::new());
    let settled = wait_for(Duration::from_secs(15), || {
        last = scrape(&c);
        let f = &last.1;
        f.get("flannel_peer_reachable")
            .and_then(|g| g.value(&peer))
            .is_some_and(|v| v == 1.0)
            && f.get("flannel_refused_leases").is_some()
    });
    let (content_type, families) = last;
    assert!(settled.is_some(), "{families:#?}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");

    // Every family, its type, and the label names of its samples. The parser names counters
    // without `_total` and their samples with it.
    let no_labels: &[&str] = &[];
    let expected: &[(&str, &str, &[&str])] = &[
        ("flannel_peers", "gauge", no_labels),
        ("flannel_skipped_leases", "gauge", no_labels),
        ("flannel_refused_leases", "counter", &["reason"]),
        ("flannel_userspace_peer_table_entries", "gauge", no_labels),
        ("flannel_peer_reachable", "gauge", &["public_ip", "subnet"]),
        (
            "flannel_peer_probe_failures",
            "counter",
            &["public_ip", "subnet"],
        ),
        ("flannel_vxlan_rx_packets", "counter", no_labels),
        ("flannel_vxlan_rx_bytes", "counter", no_labels),
        ("flannel_vxlan_tx_packets", "counter", no_labels),
        ("flannel_vxlan_tx_bytes", "counter", no_labels),
        ("flannel_vxlan_rx_checksums_completed", "counter", no_labels),
        ("flannel_vxlan_rx_bad_checksums", "counter", no_labels),
        ("flannel_vxlan_send_failures", "counter", no_labels),
        ("flannel_vxlan_tun_write_failures", "counter", no_labels),
        ("flannel_vxlan_packet_loop_panics", "counter", no_labels),
        ("flannel_vxlan_drops", "counter", &["reason"]),
        (
            "flannel_vxlan_queue_reads",
            "counter",
            &["direction", "queue"],
        ),
    ];
    let names: BTreeSet<&str> = families.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = expected.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(names, want, "{families:#?}");
    for (name, kind, labels) in expected {
        let f = &families[*name];
        assert_eq!(f.kind, *kind, "{name}");
        assert!(
            f.help.len() > 10 && f.help.ends_with('.') && !f.help.ends_with(".."),
            "{name}: help {:?}",
            f.help
        );
        assert!(!f.samples.is_empty(), "{name}");
        let sample_name = if *kind == "counter" {
            format!("{name}_total")
        } else {
            name.to_string()
        };
        for (sname, l, _) in &f.samples {
            assert_eq!(*sname, sample_name, "{name}");
            let keys: Vec<&str> = l.keys().map(String::as_str).collect();
            assert_eq!(keys, *labels, "{name}");
        }
    }

    // Values that follow from the set-up.
    let value = |name: &str, labels: &[(&str, &str)]| {
        families[name]
            .value(labels)
            .unwrap_or_else(|| panic!("{name}{labels:?}: {:#?}", families[name]))
    };
    assert_eq!(value("flannel_peers", &[]), 1.0);
    assert_eq!(value("flannel_userspace_peer_table_entries", &[]), 1.0);
    assert_eq!(value("flannel_skipped_leases", &[]), 1.0);
    assert_eq!(
        value("flannel_refused_leases", &[("reason", "outside_network")]),
        1.0
    );
    assert_eq!(value("flannel_peer_reachable", &peer), 1.0);
    // Early probes may have gone unanswered while n2 came up: present, not necessarily 0.
    assert!(value("flannel_peer_probe_failures", &peer) >= 0.0);
    for counter in [
        "flannel_vxlan_rx_packets",
        "flannel_vxlan_rx_bytes",
        "flannel_vxlan_tx_packets",
        "flannel_vxlan_tx_bytes",
    ] {
        assert!(value(counter, &[]) > 0.0, "{counter}");
    }
    assert_eq!(value("flannel_vxlan_packet_loop_panics", &[]), 0.0);
    // One sample per drop reason, each named as the code names it.
    let reasons: BTreeSet<String> = families["flannel_vxlan_drops"]
        .samples
        .iter()
        .map(|(_, l, _)| l["reason"].clone())
        .collect();
    let all: BTreeSet<String> = DropReason::ALL
        .iter()
        .map(|r| r.as_str().to_string())
        .collect();
    assert_eq!(reasons, all);
    teardown(c);
}
