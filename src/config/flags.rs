//! flanneld's command line and its `FLANNELD_*` environment fallbacks (compat §1), so existing
//! DaemonSet manifests and systemd units work unchanged.
//!
//! Parsing follows Go's `flag` package: `-flag` or `--flag`, `--flag=value` or `--flag value`,
//! booleans as `--flag` or `--flag=true|false` (a bare boolean never takes the next argument),
//! `--iface`/`--iface-regex` repeatable, last value wins for the others, `--` ends the flags,
//! `-h`/`--help` asks for help. Then, as coreos `flagutil.SetFlagsFromEnv` does, every flag not
//! given on the command line takes a non-empty `FLANNELD_<FLAG>` variable (upper case, `-` → `_`;
//! exactly one value for repeatable flags). `--version` is honoured before the environment.
//!
//! Stricter than upstream, each with an error naming the flag (or variable) and value:
//! positional arguments other than a leading `doctor` are rejected (Go silently stops parsing
//! there), invalid environment values are errors (upstream logs and continues), and values are
//! checked up front: IP flags must parse, ports are 0..=65535, `--iptables-resync` ≥ 1,
//! `--iface-regex` must compile, `-vmodule`/`-log_backtrace_at` must have klog's syntax.

use core::fmt;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use super::secret::Secret;
use super::subnet_env::parse_go_bool;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the daemon.
    Run(Flags),
    /// `flanneld doctor [flags]`: diagnose the node with the same configuration.
    Doctor(Flags),
    /// `-h`/`--help`: print this text (to stderr, like flannel) and exit 0.
    Help(String),
    /// `--version`: print the version (to stderr, like flannel) and exit 0.
    Version,
    /// `flanneld install-conf <src> <dest>`: upstream's `/opt/bin/install-conf` (copy the CNI
    /// config atomically), so the image's `install-cni` init container works unchanged.
    InstallConf {
        /// The file to install (the ConfigMap's `cni-conf.json`).
        src: PathBuf,
        /// Where (e.g. `/etc/cni/net.d/10-flannel.conflist`).
        dest: PathBuf,
    },
}

/// Which data plane carries VXLAN traffic (flannel-rs addition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dataplane {
    /// TUN device + UDP socket in this process.
    #[default]
    Userspace,
    /// The kernel's vxlan driver, programmed over netlink (upstream flannel's way).
    Kernel,
}

impl fmt::Display for Dataplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dataplane::Userspace => "userspace",
            Dataplane::Kernel => "kernel",
        })
    }
}

/// Every flanneld flag, typed. `Debug` masks the etcd password ([`Secret`]), so the whole
/// struct can be logged at start-up like flannel's "CLI flags config".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flags {
    /// `--etcd-endpoints`, split on `,`.
    pub etcd_endpoints: Vec<String>,
    /// `--etcd-prefix`.
    pub etcd_prefix: String,
    /// `--etcd-keyfile` (TLS only when both key and cert are set).
    pub etcd_keyfile: String,
    /// `--etcd-certfile`.
    pub etcd_certfile: String,
    /// `--etcd-cafile`.
    pub etcd_cafile: String,
    /// `--etcd-username`.
    pub etcd_username: String,
    /// `--etcd-password`.
    pub etcd_password: Secret,
    /// `--kube-subnet-mgr`: leases from the Kubernetes API instead of etcd.
    pub kube_subnet_mgr: bool,
    /// `--kube-api-url`.
    pub kube_api_url: String,
    /// `--kubeconfig-file`.
    pub kubeconfig_file: String,
    /// `--kube-annotation-prefix` (normalised by the Kubernetes store).
    pub kube_annotation_prefix: String,
    /// `--iface` (repeatable): interface names or IPs, tried in order.
    pub iface: Vec<String>,
    /// `--iface-regex` (repeatable): tried after every `--iface`.
    pub iface_regex: Vec<String>,
    /// `--iface-can-reach`: use the interface of the route to this address.
    pub iface_can_reach: Option<IpAddr>,
    /// `--public-ip`.
    pub public_ip: Option<Ipv4Addr>,
    /// `--public-ipv6`.
    pub public_ipv6: Option<Ipv6Addr>,
    /// `--subnet-file`.
    pub subnet_file: PathBuf,
    /// `--subnet-lease-renew-margin`, minutes (1..=1439).
    pub subnet_lease_renew_margin: u32,
    /// `--ip-masq`.
    pub ip_masq: bool,
    /// `--ip-masq-fully-random-disable`.
    pub ip_masq_fully_random_disable: bool,
    /// `--iptables-resync`, seconds.
    pub iptables_resync: u32,
    /// `--iptables-forward-rules`.
    pub iptables_forward_rules: bool,
    /// `--ip-blackhole-route`.
    pub ip_blackhole_route: bool,
    /// `--net-config-path` (kube mode).
    pub net_config_path: PathBuf,
    /// `--set-node-network-unavailable`.
    pub set_node_network_unavailable: bool,
    /// `--healthz-ip` (empty means all addresses).
    pub healthz_ip: IpAddr,
    /// `--healthz-port` (0 disables).
    pub healthz_port: u16,
    /// `-v`: klog verbosity.
    pub verbosity: i32,
    /// `-vmodule`: klog per-file verbosity, `pattern=N,...`.
    pub vmodule: String,
    /// `-log_backtrace_at`: klog `file:N`.
    pub log_backtrace_at: String,
    /// `--dataplane` (addition).
    pub dataplane: Dataplane,
    /// `--userspace-queues` (addition): TUN queues / sockets / packet thread pairs of the
    /// userspace data plane; 0 means one per CPU (at most 8).
    pub userspace_queues: u32,
    /// `--userspace-cpu-steering` (addition): hand each packet to the queue of the CPU it is
    /// processed on and pin each queue's threads to that CPU.
    pub userspace_cpu_steering: bool,
    /// `--lease-dir` (addition): local directory lease store instead of etcd.
    pub lease_dir: Option<PathBuf>,
    /// `--vxlan-tx-checksum-offload` (addition): keep tx checksum offload on in kernel mode.
    pub vxlan_tx_checksum_offload: bool,
    /// `--metrics-port` (addition; 0 disables).
    pub metrics_port: u16,
    /// `--metrics-ip` (addition): where `/metrics` listens; loopback unless told otherwise,
    /// because the metrics name every peer's subnet and public IP.
    pub metrics_ip: IpAddr,
    /// `--peer-probe-interval` (addition): seconds between ICMP probes of every peer's VTEP
    /// (0 disables the prober).
    pub peer_probe_interval: u32,
    /// `--host-gw-fallback` (addition): route an on-link peer whose VTEP stopped answering the
    /// probes directly via its public IP until VXLAN answers again.
    pub host_gw_fallback: bool,
    /// `--host-gw-fallback-damping` (addition): seconds a peer stays on a path after a switch.
    pub host_gw_fallback_damping: u32,
    /// `doctor --cni-bin-dir` (addition): where the kubelet finds CNI plugins.
    pub cni_bin_dir: PathBuf,
    /// `doctor --cni-conf-dir` (addition): where the kubelet reads CNI network configs.
    pub cni_conf_dir: PathBuf,
}

impl Default for Flags {
    /// flanneld's defaults (identical to parsing an empty command line without environment).
    fn default() -> Self {
        Flags {
            etcd_endpoints: vec![
                "http://127.0.0.1:4001".to_owned(),
                "http://127.0.0.1:2379".to_owned(),
            ],
            etcd_prefix: "/coreos.com/network".to_owned(),
            etcd_keyfile: String::new(),
            etcd_certfile: String::new(),
            etcd_cafile: String::new(),
            etcd_username: String::new(),
            etcd_password: Secret::default(),
            kube_subnet_mgr: false,
            kube_api_url: String::new(),
            kubeconfig_file: String::new(),
            kube_annotation_prefix: crate::lease::annotations::DEFAULT_PREFIX.to_owned(),
            iface: Vec::new(),
            iface_regex: Vec::new(),
            iface_can_reach: None,
            public_ip: None,
            public_ipv6: None,
            subnet_file: PathBuf::from("/run/flannel/subnet.env"),
            subnet_lease_renew_margin: 60,
            ip_masq: false,
            ip_masq_fully_random_disable: false,
            iptables_resync: 5,
            iptables_forward_rules: true,
            ip_blackhole_route: false,
            net_config_path: PathBuf::from("/etc/kube-flannel/net-conf.json"),
            set_node_network_unavailable: true,
            healthz_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            healthz_port: 0,
            verbosity: 0,
            vmodule: String::new(),
            log_backtrace_at: String::new(),
            dataplane: Dataplane::Userspace,
            userspace_queues: 0,
            userspace_cpu_steering: false,
            lease_dir: None,
            vxlan_tx_checksum_offload: false,
            metrics_port: 0,
            metrics_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            peer_probe_interval: 10,
            host_gw_fallback: false,
            host_gw_fallback_damping: 60,
            cni_bin_dir: PathBuf::from("/opt/cni/bin"),
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
        }
    }
}

/// Why the command line (or environment) is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    /// A flag flanneld does not define (Go: "flag provided but not defined").
    #[error("flag provided but not defined: -{0} (see --help)")]
    Unknown(String),
    /// A value flag at the end of the command line.
    #[error("flag needs an argument: -{0}")]
    MissingValue(String),
    /// Something starting with dashes that is not a flag (`---x`, `-=x`).
    #[error("bad flag syntax: {0}")]
    BadSyntax(String),
    /// A positional argument (only a leading `doctor` is accepted).
    #[error(
        "unexpected argument {0:?}: flanneld takes only flags (and an optional leading `doctor`)"
    )]
    UnexpectedArgument(String),
    /// `install-conf` without exactly a source and a destination.
    #[error("usage: flanneld install-conf <src> <dest>")]
    InstallConfUsage,
    /// A flag only `flanneld doctor` uses, given to the daemon.
    #[error("--{0} is a flag of `flanneld doctor` only; the daemon does not use it: remove it")]
    DoctorOnly(String),
    /// A value that does not parse or is out of range.
    #[error("invalid value {value:?} for {origin}: {reason}")]
    InvalidValue {
        /// `flag --name` or `FLANNELD_NAME (flag --name)`.
        origin: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--subnet-lease-renew-margin` outside 1..=1439 (flannel's message first).
    #[error("Invalid subnet-lease-renew-margin option, out of acceptable range: {value} from {origin} (must be 1..1439 minutes)")]
    RenewMarginOutOfRange {
        /// Where the value came from.
        origin: String,
        /// The value as given.
        value: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Str,
    Int,
    Multi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Flannel,
    Addition,
}

#[derive(Debug)]
struct Spec {
    name: &'static str,
    kind: Kind,
    /// Type word in the help text (Go: `string`, `int`, `value`; empty for booleans).
    type_name: &'static str,
    /// Default shown in the help text; empty for Go's zero value.
    default: &'static str,
    usage: &'static str,
    section: Section,
}

const fn spec(name: &'static str, kind: Kind, default: &'static str, usage: &'static str) -> Spec {
    let type_name = match kind {
        Kind::Bool => "",
        Kind::Str => "string",
        Kind::Int => "int",
        Kind::Multi => "value",
    };
    Spec {
        name,
        kind,
        type_name,
        default,
        usage,
        section: Section::Flannel,
    }
}

const fn addition(spec: Spec) -> Spec {
    Spec {
        section: Section::Addition,
        ..spec
    }
}

const fn klog(name: &'static str, kind: Kind, usage: &'static str) -> Spec {
    Spec {
        name,
        kind,
        type_name: "value",
        default: "",
        usage,
        section: Section::Flannel,
    }
}

const SPECS: &[Spec] = &[
    spec("etcd-endpoints", Kind::Str, "http://127.0.0.1:4001,http://127.0.0.1:2379", "a comma-delimited list of etcd endpoints"),
    spec("etcd-prefix", Kind::Str, "/coreos.com/network", "etcd prefix"),
    spec("etcd-keyfile", Kind::Str, "", "SSL key file used to secure etcd communication"),
    spec("etcd-certfile", Kind::Str, "", "SSL certification file used to secure etcd communication"),
    spec("etcd-cafile", Kind::Str, "", "SSL Certificate Authority file used to secure etcd communication"),
    spec("etcd-username", Kind::Str, "", "username for BasicAuth to etcd"),
    spec("etcd-password", Kind::Str, "", "password for BasicAuth to etcd"),
    spec("iface", Kind::Multi, "", "interface to use (IP or name) for inter-host communication. Can be specified multiple times to check each option in order. Returns the first match found."),
    spec("iface-regex", Kind::Multi, "", "regex expression to match the first interface to use (IP or name) for inter-host communication. Can be specified multiple times to check each regex in order. Returns the first match found. Regexes are checked after specific interfaces specified by the iface option have already been checked."),
    spec("iface-can-reach", Kind::Str, "", "detect interface to use (IP or name) for inter-host communication based on which will be used for provided IP. This is exactly the interface to use of command 'ip route get <ip-address>'"),
    spec("subnet-file", Kind::Str, "/run/flannel/subnet.env", "filename where env variables (subnet, MTU, ... ) will be written to"),
    spec("public-ip", Kind::Str, "", "IP accessible by other nodes for inter-host communication"),
    spec("public-ipv6", Kind::Str, "", "IPv6 accessible by other nodes for inter-host communication"),
    spec("subnet-lease-renew-margin", Kind::Int, "60", "subnet lease renewal margin, in minutes, ranging from 1 to 1439"),
    spec("ip-masq", Kind::Bool, "", "setup IP masquerade rule for traffic destined outside of overlay network"),
    spec("ip-masq-fully-random-disable", Kind::Bool, "", "disable fully-random mode for MASQUERADE"),
    spec("kube-subnet-mgr", Kind::Bool, "", "contact the Kubernetes API for subnet assignment instead of etcd."),
    spec("kube-api-url", Kind::Str, "", "Kubernetes API server URL. Does not need to be specified if flannel is running in a pod."),
    spec("kube-annotation-prefix", Kind::Str, "flannel.alpha.coreos.com", "Kubernetes annotation prefix. Can contain single slash \"/\", otherwise it will be appended at the end."),
    spec("kubeconfig-file", Kind::Str, "", "kubeconfig file location. Does not need to be specified if flannel is running in a pod."),
    spec("version", Kind::Bool, "", "print version and exit"),
    spec("healthz-ip", Kind::Str, "0.0.0.0", "the IP address for healthz server to listen"),
    spec("healthz-port", Kind::Int, "", "the port for healthz server to listen(0 to disable)"),
    spec("iptables-resync", Kind::Int, "5", "resync period for iptables rules, in seconds"),
    spec("iptables-forward-rules", Kind::Bool, "true", "add default accept rules to FORWARD chain in iptables"),
    spec("ip-blackhole-route", Kind::Bool, "", "add blackroute route ont the node for the local podCIDR"),
    spec("net-config-path", Kind::Str, "/etc/kube-flannel/net-conf.json", "path to the network configuration file"),
    spec("set-node-network-unavailable", Kind::Bool, "true", "set NodeNetworkUnavailable after ready"),
    klog("v", Kind::Int, "number for the log level verbosity"),
    klog("vmodule", Kind::Str, "comma-separated list of pattern=N settings for file-filtered logging"),
    klog("log_backtrace_at", Kind::Str, "when logging hits line file:N, emit a stack trace"),
    addition(spec("dataplane", Kind::Str, "userspace", "VXLAN data plane: \"userspace\" (TUN device + UDP socket in flanneld) or \"kernel\" (the kernel vxlan driver, like upstream flannel)")),
    addition(spec("lease-dir", Kind::Str, "", "use a local directory as the lease store instead of etcd: DIR/config holds the network config JSON, DIR/subnets/<key> one lease each (shareable by several daemons)")),
    addition(spec("vxlan-tx-checksum-offload", Kind::Bool, "", "kernel data plane: keep tx checksum offload on the vxlan device (it is turned off by default)")),
    addition(spec("userspace-queues", Kind::Int, "0", "userspace data plane: TUN queues (a multi-queue device when above 1), SO_REUSEPORT sockets and TX+RX thread pairs; 0 = one per CPU, at most 8")),
    addition(spec("userspace-cpu-steering", Kind::Bool, "", "userspace data plane with several queues: hand each packet to the queue of the CPU it is processed on (TUN steering eBPF, SO_REUSEPORT CPU program) and pin each queue's threads to that CPU, so packet threads are woken where the packet already is (lower latency)")),
    addition(spec("metrics-port", Kind::Int, "", "the port for the Prometheus /metrics server to listen (0 to disable); /metrics is served only there")),
    addition(spec("metrics-ip", Kind::Str, "127.0.0.1", "the IP address for the metrics server to listen (the metrics name every peer's subnet and public IP: keep it off pod-reachable addresses)")),
    addition(spec("cni-bin-dir", Kind::Str, "/opt/cni/bin", "doctor only: the directory the kubelet finds CNI plugins in (checked by cni-plugin)")),
    addition(spec("cni-conf-dir", Kind::Str, "/etc/cni/net.d", "doctor only: the directory the kubelet reads CNI network configs from (checked by cni-config)")),
    addition(spec("peer-probe-interval", Kind::Int, "10", "seconds between ICMP echo probes of every peer's VTEP address (host-gw: public IP); a peer silent 3 times in a row is logged and exported as flannel_peer_reachable 0 (0 to disable)")),
    addition(spec("host-gw-fallback", Kind::Bool, "", "vxlan: route a peer whose VTEP misses 3 probes in a row directly via its public IP (host-gw style) when that IP is on-link, and back over VXLAN once it answers again (needs --peer-probe-interval > 0)")),
    addition(spec("host-gw-fallback-damping", Kind::Int, "60", "seconds a peer stays on a path after --host-gw-fallback switched it (damps flapping)")),
];

/// Flags only `flanneld doctor` reads: refused by the daemon rather than ignored.
const DOCTOR_ONLY: &[&str] = &["cni-bin-dir", "cni-conf-dir"];

fn lookup(name: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.name == name)
}

/// The environment variable for a flag: `FLANNELD_` + upper case, `-` → `_`.
pub fn env_name(flag: &str) -> String {
    format!("FLANNELD_{}", flag.to_ascii_uppercase().replace('-', "_"))
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
enum Origin {
    Default,
    Cli,
    Env(String),
}

/// Parses flanneld's arguments (everything after the program name). `env` looks up an
/// environment variable (pass `|k| std::env::var(k).ok()` in the daemon).
pub fn parse(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Command, FlagError> {
    if let Some((first, rest)) = args.split_first() {
        if first == "install-conf" {
            return match rest {
                [src, dest] => Ok(Command::InstallConf {
                    src: src.into(),
                    dest: dest.into(),
                }),
                _ => Err(FlagError::InstallConfUsage),
            };
        }
    }
    let (doctor, rest) = match args.split_first() {
        Some((first, rest)) if first == "doctor" => (true, rest),
        _ => (false, args),
    };
    let mut given: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            if let Some(extra) = it.next() {
                return Err(FlagError::UnexpectedArgument(extra.clone()));
            }
            break;
        }
        let Some(body) = arg.strip_prefix('-').filter(|b| !b.is_empty()) else {
            return Err(FlagError::UnexpectedArgument(arg.clone()));
        };
        let body = body.strip_prefix('-').unwrap_or(body);
        if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
            return Err(FlagError::BadSyntax(arg.clone()));
        }
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let Some(spec) = lookup(name) else {
            if name == "help" || name == "h" {
                return Ok(Command::Help(help_text()));
            }
            return Err(FlagError::Unknown(name.to_owned()));
        };
        let value = match (spec.kind, inline) {
            (Kind::Bool, None) => "true".to_owned(),
            (Kind::Bool, Some(v)) => match parse_go_bool(v) {
                Some(b) => b.to_string(),
                None => {
                    return Err(invalid(
                        spec,
                        &Origin::Cli,
                        v,
                        "not a boolean (use true or false)",
                    ))
                }
            },
            (_, Some(v)) => v.to_owned(),
            (_, None) => match it.next() {
                Some(v) => v.clone(),
                None => return Err(FlagError::MissingValue(name.to_owned())),
            },
        };
        // Go's flag package rejects malformed integers while parsing.
        if spec.kind == Kind::Int {
            int_of(spec, &Origin::Cli, &value)?;
        }
        let slot = given.entry(spec.name).or_default();
        if spec.kind != Kind::Multi {
            slot.clear();
        }
        slot.push(value);
    }
    if given
        .get("version")
        .and_then(|v| v.last())
        .map(String::as_str)
        == Some("true")
    {
        return Ok(Command::Version);
    }
    let mut values: BTreeMap<&'static str, (Origin, Vec<String>)> = BTreeMap::new();
    for spec in SPECS {
        if let Some(v) = given.remove(spec.name) {
            values.insert(spec.name, (Origin::Cli, v));
        } else if spec.name != "version" {
            let var = env_name(spec.name);
            if let Some(v) = env(&var).filter(|v| !v.is_empty()) {
                values.insert(spec.name, (Origin::Env(var), vec![v]));
            }
        }
    }
    if !doctor {
        for name in DOCTOR_ONLY {
            if values.contains_key(name) {
                return Err(FlagError::DoctorOnly((*name).to_owned()));
            }
        }
    }
    let flags = build(&values)?;
    Ok(if doctor {
        Command::Doctor(flags)
    } else {
        Command::Run(flags)
    })
}

fn origin_text(spec: &Spec, origin: &Origin) -> String {
    match origin {
        Origin::Default => format!("the default of flag --{}", spec.name),
        Origin::Cli => format!("flag --{}", spec.name),
        Origin::Env(var) => format!("{var} (flag --{})", spec.name),
    }
}

fn invalid(spec: &Spec, origin: &Origin, value: &str, reason: impl Into<String>) -> FlagError {
    FlagError::InvalidValue {
        origin: origin_text(spec, origin),
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Go's `strconv.ParseInt(s, 0, 64)`: optional sign, `0x`/`0o`/`0b`/leading-`0` prefixes,
/// underscores between digits only after a prefix.
fn parse_go_int(s: &str) -> Option<i64> {
    let (neg, unsigned) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = unsigned.to_ascii_lowercase();
    let (radix, digits, prefixed) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d, true)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d, true)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d, true)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..], true)
    } else {
        (10, lower.as_str(), false)
    };
    if digits.contains('_') {
        let ok = prefixed && !digits.ends_with('_') && !digits.contains("__");
        let ok = ok && (digits.starts_with('_') || radix != 8 || !lower.starts_with("0o"));
        if !ok {
            return None;
        }
    }
    let clean: String = digits.chars().filter(|&c| c != '_').collect();
    if clean.is_empty() || clean.starts_with(['+', '-']) {
        return None;
    }
    let magnitude = u64::from_str_radix(&clean, radix).ok()?;
    if neg {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
}

fn int_of(spec: &Spec, origin: &Origin, value: &str) -> Result<i64, FlagError> {
    if spec.name == "v" {
        // klog's Level: decimal, 32-bit.
        return value
            .parse::<i32>()
            .map(i64::from)
            .map_err(|_| invalid(spec, origin, value, "not a 32-bit decimal integer"));
    }
    parse_go_int(value).ok_or_else(|| invalid(spec, origin, value, "not an integer"))
}

/// Typed values from the collected raw ones (defaults for the rest).
fn build(values: &BTreeMap<&'static str, (Origin, Vec<String>)>) -> Result<Flags, FlagError> {
    let default = (Origin::Default, Vec::new());
    let get = |name: &'static str| -> (&'static Spec, &Origin, Vec<String>) {
        // Names here are literals of this function; the flag tests parse every default, so a
        // name missing from SPECS fails them at once instead of reading another flag.
        let spec = lookup(name).unwrap_or_else(|| unreachable!("flag {name} is not in SPECS"));
        let (origin, vals) = values.get(name).unwrap_or(&default);
        let vals = if values.contains_key(name) {
            vals.clone()
        } else if spec.default.is_empty() {
            Vec::new()
        } else {
            vec![spec.default.to_owned()]
        };
        (spec, origin, vals)
    };
    let string = |name| get(name).2.pop().unwrap_or_default();
    // The error for `name`'s (last) value, saying why.
    let refuse = |name, reason: &str| {
        let (spec, origin, mut v) = get(name);
        invalid(spec, origin, &v.pop().unwrap_or_default(), reason)
    };
    // `name`'s value if `ok` accepts it, else the error with `reason`.
    let checked = |name, ok: fn(&str) -> bool, reason: &str| {
        let value = string(name);
        if ok(&value) {
            Ok(value)
        } else {
            Err(refuse(name, reason))
        }
    };
    let boolean = |name| -> Result<bool, FlagError> {
        let (spec, origin, mut v) = get(name);
        match v.pop() {
            None => Ok(false),
            Some(s) => parse_go_bool(&s)
                .ok_or_else(|| invalid(spec, origin, &s, "not a boolean (use true or false)")),
        }
    };
    let int = |name, lo: i64, hi: i64| -> Result<i64, FlagError> {
        let (spec, origin, mut v) = get(name);
        let Some(s) = v.pop() else { return Ok(0) };
        let n = int_of(spec, origin, &s)?;
        if name == "subnet-lease-renew-margin" && !(lo..=hi).contains(&n) {
            return Err(FlagError::RenewMarginOutOfRange {
                origin: origin_text(spec, origin),
                value: s,
            });
        }
        if !(lo..=hi).contains(&n) {
            return Err(invalid(
                spec,
                origin,
                &s,
                format!("out of range {lo}..={hi}"),
            ));
        }
        Ok(n)
    };
    let port = |name| int(name, 0, 65535).map(|n| u16::try_from(n).unwrap_or_default());
    let parsed = |name, what: &str| -> Result<Option<IpAddr>, FlagError> {
        let (spec, origin, mut v) = get(name);
        match v.pop().filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(s) => s
                .parse::<IpAddr>()
                .map(Some)
                .map_err(|_| invalid(spec, origin, &s, format!("not {what}"))),
        }
    };

    let public_ip = match parsed("public-ip", "an IPv4 address")? {
        None => None,
        Some(IpAddr::V4(a)) => Some(a),
        Some(IpAddr::V6(_)) => {
            return Err(refuse(
                "public-ip",
                "not an IPv4 address (use --public-ipv6)",
            ))
        }
    };
    let public_ipv6 = match parsed("public-ipv6", "an IPv6 address")? {
        None => None,
        Some(IpAddr::V6(a)) => Some(a),
        Some(IpAddr::V4(_)) => {
            return Err(refuse(
                "public-ipv6",
                "not an IPv6 address (use --public-ip)",
            ))
        }
    };

    let (regex_spec, regex_origin, iface_regex) = get("iface-regex");
    for r in &iface_regex {
        if let Err(e) = regex::Regex::new(r) {
            return Err(invalid(
                regex_spec,
                regex_origin,
                r,
                format!("not a valid regex: {e}"),
            ));
        }
    }

    let dataplane = match get("dataplane").2.pop().as_deref() {
        None | Some("userspace") => Dataplane::Userspace,
        Some("kernel") => Dataplane::Kernel,
        Some(_) => return Err(refuse("dataplane", "must be \"userspace\" or \"kernel\"")),
    };

    let vmodule = checked(
        "vmodule",
        vmodule_ok,
        "expected a comma-separated list of pattern=N",
    )?;
    let log_backtrace_at = checked("log_backtrace_at", backtrace_at_ok, "expected file.go:N")?;

    let lease_dir = Some(string("lease-dir"))
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);

    Ok(Flags {
        etcd_endpoints: string("etcd-endpoints")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        etcd_prefix: string("etcd-prefix"),
        etcd_keyfile: string("etcd-keyfile"),
        etcd_certfile: string("etcd-certfile"),
        etcd_cafile: string("etcd-cafile"),
        etcd_username: string("etcd-username"),
        etcd_password: string("etcd-password").into(),
        kube_subnet_mgr: boolean("kube-subnet-mgr")?,
        kube_api_url: string("kube-api-url"),
        kubeconfig_file: string("kubeconfig-file"),
        kube_annotation_prefix: string("kube-annotation-prefix"),
        iface: get("iface").2,
        iface_regex,
        iface_can_reach: parsed("iface-can-reach", "an IP address")?,
        public_ip,
        public_ipv6,
        subnet_file: PathBuf::from(string("subnet-file")),
        subnet_lease_renew_margin: u32::try_from(int("subnet-lease-renew-margin", 1, 1439)?)
            .unwrap_or(60),
        ip_masq: boolean("ip-masq")?,
        ip_masq_fully_random_disable: boolean("ip-masq-fully-random-disable")?,
        iptables_resync: u32::try_from(int("iptables-resync", 1, i64::from(u32::MAX))?)
            .unwrap_or(5),
        iptables_forward_rules: boolean("iptables-forward-rules")?,
        ip_blackhole_route: boolean("ip-blackhole-route")?,
        net_config_path: PathBuf::from(string("net-config-path")),
        set_node_network_unavailable: boolean("set-node-network-unavailable")?,
        healthz_ip: parsed("healthz-ip", "an IP address")?
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        healthz_port: port("healthz-port")?,
        verbosity: i32::try_from(int("v", i64::from(i32::MIN), i64::from(i32::MAX))?)
            .unwrap_or_default(),
        vmodule,
        log_backtrace_at,
        dataplane,
        userspace_queues: u32::try_from(int("userspace-queues", 0, 8)?).unwrap_or(0),
        userspace_cpu_steering: boolean("userspace-cpu-steering")?,
        lease_dir,
        vxlan_tx_checksum_offload: boolean("vxlan-tx-checksum-offload")?,
        metrics_port: port("metrics-port")?,
        metrics_ip: parsed("metrics-ip", "an IP address")?
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        peer_probe_interval: u32::try_from(int("peer-probe-interval", 0, 86_400)?).unwrap_or(10),
        host_gw_fallback: boolean("host-gw-fallback")?,
        host_gw_fallback_damping: u32::try_from(int("host-gw-fallback-damping", 0, 86_400)?)
            .unwrap_or(60),
        cni_bin_dir: PathBuf::from(string("cni-bin-dir")),
        cni_conf_dir: PathBuf::from(string("cni-conf-dir")),
    })
}

/// klog's `-vmodule` syntax: empty, or `pattern=N[,pattern=N...]`.
fn vmodule_ok(s: &str) -> bool {
    s.is_empty()
        || s.split(',').all(|pair| match pair.split_once('=') {
            Some((pattern, level)) => !pattern.is_empty() && level.parse::<i32>().is_ok(),
            None => false,
        })
}

/// klog's `-log_backtrace_at` syntax: empty, or `file:N`.
fn backtrace_at_ok(s: &str) -> bool {
    s.is_empty()
        || s.rsplit_once(':')
            .is_some_and(|(file, line)| !file.is_empty() && line.parse::<u32>().is_ok())
}

/// The `--help` text: flanneld's flags in Go's `PrintDefaults` layout, then our additions,
/// the `doctor` subcommand and the environment rule.
pub fn help_text() -> String {
    let mut out = String::from(
        "Usage: flanneld [OPTION]...\n       flanneld doctor [OPTION]...\n       flanneld install-conf <src> <dest>\n",
    );
    let section = |out: &mut String, which: Section| {
        let mut specs: Vec<&Spec> = SPECS.iter().filter(|s| s.section == which).collect();
        specs.sort_by_key(|s| s.name);
        for s in specs {
            let mut head = format!("  -{}", s.name);
            if !s.type_name.is_empty() {
                head.push(' ');
                head.push_str(s.type_name);
            }
            out.push_str(&head);
            out.push_str("\n    \t");
            out.push_str(s.usage);
            if !s.default.is_empty() {
                if s.kind == Kind::Str {
                    out.push_str(&format!(" (default {:?})", s.default));
                } else {
                    out.push_str(&format!(" (default {})", s.default));
                }
            }
            out.push('\n');
        }
    };
    section(&mut out, Section::Flannel);
    out.push_str("\nflannel-rs additions:\n");
    section(&mut out, Section::Addition);
    out.push_str(
        "\nSubcommands:\n  doctor\n    \tcheck this node's configuration, devices, leases and peers, then exit\n\
         \x20 install-conf <src> <dest>\n    \tcopy a CNI config into place atomically (the image's /opt/bin/install-conf)\n\
         \nEvery flag may be written -flag or --flag, with =value or as the next argument (booleans\n\
         only with =). A flag not given on the command line is taken from the environment variable\n\
         FLANNELD_<FLAG> (upper case, '-' replaced by '_', e.g. FLANNELD_IFACE=eth0) when it is\n\
         set and not empty.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn run(a: &[&str]) -> Flags {
        match parse(&args(a), &no_env) {
            Ok(Command::Run(f)) => f,
            other => panic!("{a:?}: {other:?}"),
        }
    }

    fn err(a: &[&str]) -> FlagError {
        parse(&args(a), &no_env).expect_err("should fail")
    }

    #[test]
    fn defaults_match_table() {
        assert_eq!(run(&[]), Flags::default());
        let d = Flags::default();
        assert_eq!(
            d.etcd_endpoints,
            ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(d.subnet_lease_renew_margin, 60);
        assert!(d.iptables_forward_rules && d.set_node_network_unavailable);
        assert_eq!(d.healthz_ip.to_string(), "0.0.0.0");
    }

    #[test]
    fn go_flag_syntax() {
        let f = run(&[
            "-iface",
            "eth0",
            "--iface=10.0.0.1",
            "--ip-masq",
            "-kube-subnet-mgr=true",
            "--iptables-forward-rules=false",
            "--healthz-port",
            "8080",
            "-v=2",
            "--public-ip=198.51.100.7",
            "--subnet-lease-renew-margin=0x10",
        ]);
        assert_eq!(f.iface, ["eth0", "10.0.0.1"]);
        assert!(f.ip_masq && f.kube_subnet_mgr && !f.iptables_forward_rules);
        assert_eq!((f.healthz_port, f.verbosity), (8080, 2));
        assert_eq!(f.public_ip, Some(Ipv4Addr::new(198, 51, 100, 7)));
        assert_eq!(f.subnet_lease_renew_margin, 16);
        // A bare boolean never consumes the next argument.
        assert_eq!(
            err(&["--ip-masq", "false"]),
            FlagError::UnexpectedArgument("false".into())
        );
        // Last value wins for plain flags.
        assert_eq!(
            run(&["--etcd-prefix=/a", "--etcd-prefix", "/b"]).etcd_prefix,
            "/b"
        );
        // A value flag takes the next argument even if it looks like a flag.
        assert_eq!(run(&["--kube-api-url", "-x"]).kube_api_url, "-x");
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(err(&["--bogus"]), FlagError::Unknown("bogus".into()));
        assert_eq!(err(&["--iface"]), FlagError::MissingValue("iface".into()));
        assert_eq!(
            err(&["---iface=x"]),
            FlagError::BadSyntax("---iface=x".into())
        );
        assert_eq!(err(&["-=x"]), FlagError::BadSyntax("-=x".into()));
        assert_eq!(
            err(&["stray"]),
            FlagError::UnexpectedArgument("stray".into())
        );
        assert_eq!(err(&["--", "x"]), FlagError::UnexpectedArgument("x".into()));
        assert!(matches!(
            parse(&args(&["--"]), &no_env),
            Ok(Command::Run(_))
        ));
        let e = err(&["--ip-masq=yes"]);
        assert_eq!(
            e.to_string(),
            "invalid value \"yes\" for flag --ip-masq: not a boolean (use true or false)"
        );
        let e = err(&["--healthz-port=abc"]);
        assert_eq!(
            e.to_string(),
            "invalid value \"abc\" for flag --healthz-port: not an integer"
        );
        let e = err(&["--healthz-port=70000"]);
        assert_eq!(
            e.to_string(),
            "invalid value \"70000\" for flag --healthz-port: out of range 0..=65535"
        );
    }

    #[test]
    fn renew_margin_range() {
        for bad in ["0", "1440", "-5"] {
            let e = err(&["--subnet-lease-renew-margin", bad]);
            assert!(
                e.to_string().starts_with(
                    "Invalid subnet-lease-renew-margin option, out of acceptable range"
                ),
                "{e}"
            );
        }
        assert_eq!(
            run(&["--subnet-lease-renew-margin=1439"]).subnet_lease_renew_margin,
            1439
        );
    }

    #[test]
    fn cni_dirs_are_doctor_flags_only() {
        match parse(&args(&["doctor", "--cni-bin-dir=/tmp/b"]), &no_env) {
            Ok(Command::Doctor(f)) => {
                assert_eq!(f.cni_bin_dir, PathBuf::from("/tmp/b"));
                assert_eq!(f.cni_conf_dir, PathBuf::from("/etc/cni/net.d"));
            }
            other => panic!("{other:?}"),
        }
        let e = err(&["--cni-conf-dir=/tmp/c"]);
        assert_eq!(e, FlagError::DoctorOnly("cni-conf-dir".into()));
        assert!(e.to_string().contains("remove it"), "{e}");
        let env = |k: &str| (k == "FLANNELD_CNI_BIN_DIR").then(|| "/x".to_owned());
        assert!(matches!(
            parse(&args(&[]), &env),
            Err(FlagError::DoctorOnly(_))
        ));
    }

    #[test]
    fn help_version_doctor() {
        for h in ["-h", "--help", "-help=false"] {
            match parse(&args(&[h]), &no_env) {
                Ok(Command::Help(text)) => {
                    assert!(text.contains("  -etcd-endpoints string\n    \ta comma-delimited list of etcd endpoints (default \"http://127.0.0.1:4001,http://127.0.0.1:2379\")\n"));
                    assert!(text.contains("  -ip-masq\n    \tsetup IP masquerade"));
                    assert!(text.contains("(default 60)"));
                    let additions = text.find("flannel-rs additions:").expect("section");
                    assert!(text.find("  -dataplane string").expect("listed") > additions);
                    assert!(text.find("  -version\n").expect("listed") < additions);
                }
                other => panic!("{other:?}"),
            }
        }
        // --version wins over the environment (even a broken one).
        let env = |k: &str| (k == "FLANNELD_HEALTHZ_PORT").then(|| "bad".to_owned());
        assert_eq!(parse(&args(&["--version"]), &env), Ok(Command::Version));
        assert!(matches!(
            parse(&args(&["--version=false"]), &no_env),
            Ok(Command::Run(_))
        ));
        match parse(&args(&["doctor", "--iface", "eth1"]), &no_env) {
            Ok(Command::Doctor(f)) => assert_eq!(f.iface, ["eth1"]),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err(&["--iface=x", "doctor"]),
            FlagError::UnexpectedArgument("doctor".into())
        );
        assert_eq!(
            parse(
                &args(&["install-conf", "/a/cni-conf.json", "/b/10-flannel.conflist"]),
                &env
            ),
            Ok(Command::InstallConf {
                src: "/a/cni-conf.json".into(),
                dest: "/b/10-flannel.conflist".into()
            })
        );
        assert_eq!(err(&["install-conf", "/a"]), FlagError::InstallConfUsage);
        assert_eq!(
            err(&["install-conf", "/a", "/b", "/c"]),
            FlagError::InstallConfUsage
        );
    }

    #[test]
    fn environment_fallback() {
        let env = |k: &str| -> Option<String> {
            match k {
                "FLANNELD_IFACE" => Some("eth0,eth1".into()),
                "FLANNELD_IP_MASQ" => Some("true".into()),
                "FLANNELD_ETCD_PREFIX" => Some("/env".into()),
                "FLANNELD_PUBLIC_IP" => Some(String::new()),
                "FLANNELD_V" => Some("3".into()),
                "FLANNELD_DATAPLANE" => Some("kernel".into()),
                "FLANNELD_LEASE_DIR" => Some("/var/lib/flannel".into()),
                "FLANNELD_ETCD_PASSWORD" => Some("hunter2".into()),
                _ => None,
            }
        };
        let f = match parse(&args(&["--etcd-prefix=/cli"]), &env) {
            Ok(Command::Run(f)) => f,
            other => panic!("{other:?}"),
        };
        assert_eq!(f.iface, ["eth0,eth1"], "one value, no splitting");
        assert!(f.ip_masq);
        assert_eq!(f.etcd_prefix, "/cli", "command line wins");
        assert_eq!(f.public_ip, None, "empty values ignored");
        assert_eq!(f.verbosity, 3);
        assert_eq!(f.dataplane, Dataplane::Kernel);
        assert_eq!(f.lease_dir, Some(PathBuf::from("/var/lib/flannel")));
        let dbg = format!("{f:?}");
        assert!(
            dbg.contains("etcd_password: \"***\"") && !dbg.contains("hunter2"),
            "{dbg}"
        );

        let env = |k: &str| (k == "FLANNELD_HEALTHZ_PORT").then(|| "x1".to_owned());
        let e = parse(&[], &env).expect_err("bad env");
        assert_eq!(
            e.to_string(),
            "invalid value \"x1\" for FLANNELD_HEALTHZ_PORT (flag --healthz-port): not an integer"
        );
        assert_eq!(env_name("log_backtrace_at"), "FLANNELD_LOG_BACKTRACE_AT");
        assert_eq!(env_name("iface-can-reach"), "FLANNELD_IFACE_CAN_REACH");
    }

    #[test]
    fn value_validation() {
        assert!(err(&["--public-ip=fd00::1"])
            .to_string()
            .contains("use --public-ipv6"));
        assert!(err(&["--public-ipv6=10.0.0.1"])
            .to_string()
            .contains("use --public-ip"));
        assert!(err(&["--iface-regex=("])
            .to_string()
            .contains("not a valid regex"));
        assert!(err(&["--dataplane=dpdk"])
            .to_string()
            .contains("\"userspace\" or \"kernel\""));
        assert!(err(&["--iptables-resync=0"])
            .to_string()
            .contains("out of range"));
        assert!(err(&["-vmodule=foo"]).to_string().contains("pattern=N"));
        assert!(err(&["-log_backtrace_at=foo"])
            .to_string()
            .contains("file.go:N"));
        assert!(err(&["-v=0x1"]).to_string().contains("32-bit decimal"));
        let f = run(&[
            "-vmodule=foo=2,bar*=1",
            "-log_backtrace_at=main.go:12",
            "--iface-can-reach=203.0.113.1",
        ]);
        assert_eq!(f.vmodule, "foo=2,bar*=1");
        assert_eq!(f.iface_can_reach, Some("203.0.113.1".parse().expect("ip")));
        assert_eq!(
            run(&["--healthz-ip="]).healthz_ip,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        );
        assert_eq!(run(&["--metrics-port=9100"]).metrics_port, 9100);
        assert!(run(&["--vxlan-tx-checksum-offload"]).vxlan_tx_checksum_offload);
        assert_eq!(Flags::default().peer_probe_interval, 10);
        assert_eq!(run(&["--peer-probe-interval=0"]).peer_probe_interval, 0);
        assert_eq!(run(&["--peer-probe-interval", "2"]).peer_probe_interval, 2);
        assert!(err(&["--peer-probe-interval=-1"])
            .to_string()
            .contains("out of range"));
        let env = |k: &str| (k == "FLANNELD_PEER_PROBE_INTERVAL").then(|| "3".to_owned());
        match parse(&args(&["doctor"]), &env) {
            Ok(Command::Doctor(f)) => assert_eq!(f.peer_probe_interval, 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn host_gw_fallback_flag_and_env() {
        let d = Flags::default();
        assert!(!d.host_gw_fallback);
        assert_eq!(d.host_gw_fallback_damping, 60);
        let f = run(&["--host-gw-fallback", "--host-gw-fallback-damping=5"]);
        assert!(f.host_gw_fallback);
        assert_eq!(f.host_gw_fallback_damping, 5);
        let env = |k: &str| (k == "FLANNELD_HOST_GW_FALLBACK").then(|| "true".to_owned());
        match parse(&args(&[]), &env) {
            Ok(Command::Run(f)) => assert!(f.host_gw_fallback),
            other => panic!("{other:?}"),
        }
        assert!(err(&["--host-gw-fallback-damping=-1"])
            .to_string()
            .contains("out of range"));
    }

    #[test]
    fn go_integers() {
        assert_eq!(parse_go_int("42"), Some(42));
        assert_eq!(parse_go_int("-42"), Some(-42));
        assert_eq!(parse_go_int("+7"), Some(7));
        assert_eq!(parse_go_int("0x1F"), Some(31));
        assert_eq!(parse_go_int("010"), Some(8));
        assert_eq!(parse_go_int("0o17"), Some(15));
        assert_eq!(parse_go_int("0b101"), Some(5));
        assert_eq!(parse_go_int("0x_ff"), Some(255));
        assert_eq!(parse_go_int("1_000"), None);
        assert_eq!(parse_go_int("0"), Some(0));
        assert_eq!(parse_go_int("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_go_int("9223372036854775808"), None);
        for bad in ["", "-", "0x", "1.5", "ten", "--1", "0x-1", "08"] {
            assert_eq!(parse_go_int(bad), None, "{bad}");
        }
    }
}
