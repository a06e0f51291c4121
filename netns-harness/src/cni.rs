//! Pods made the way a kubelet makes them on a flannel node: by running the real CNI plugins
//! (Debian's `containernetworking-plugins`: `bridge`, `host-local`, `portmap`, `loopback`)
//! from the conflist that `deploy/kube-flannel.yml` ships (`cni-conf.json`, read from the
//! manifest at run time).
//!
//! Two roles live here:
//! * the runtime's part (libcni): read the node's config directory, run each plugin of the
//!   chain with `CNI_COMMAND`/`CNI_NETNS`/... and its config on stdin, hand each plugin the
//!   previous one's result (`prevResult`) and the port mappings (`runtimeConfig`) it asked for
//!   with `capabilities`, and DEL in reverse order;
//! * flannel's meta-plugin (flannel-io/cni-plugin, not packaged anywhere we can install):
//!   the `flannel` file in a node's CNI bin dir is a symlink to this binary, which then builds
//!   the `bridge` + `host-local` delegate from the node's subnet.env exactly as flannel's
//!   plugin does ([`flannel_delegate`]) and execs `bridge` from `CNI_PATH`.
//!
//! Per node (`<run>/n<i>/cni/`): `bin/` (symlinks to the system plugins, `flannel` to this
//! binary), `net.d/10-flannel.conflist` (the manifest's text), `flannel/` (the meta-plugin's
//! saved delegate configs, flannel's `dataDir`), `ipam/` (host-local's store), `results/`
//! (what the runtime keeps for DEL). The host's `/opt/cni`, `/etc/cni` and `/var/lib/cni` are
//! never read or written: node namespaces share the host's filesystem, so the runtime points
//! the flannel entry's `subnetFile`, `dataDir` and `ipam.dataDir` into the run directory.
//! Nothing else of the manifest's config is changed.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::cmd;
use crate::net::{Cidr, Cidr6};

/// How the harness wires pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PodSetup {
    /// The real CNI plugins, from kube-flannel.yml's conflist (the default).
    #[default]
    Cni,
    /// The harness's own `ip` commands (`cni0`, veths, routes), as before the CNI plugins.
    Hand,
}

impl fmt::Display for PodSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PodSetup::Cni => "cni",
            PodSetup::Hand => "hand",
        })
    }
}

impl FromStr for PodSetup {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<PodSetup> {
        match s {
            "cni" => Ok(PodSetup::Cni),
            "hand" => Ok(PodSetup::Hand),
            other => bail!("unknown pod set-up {other:?} (cni, hand)"),
        }
    }
}

/// One hostPort, as the CRI hands it to plugins with the `portMappings` capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// Port on the node.
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    /// Port in the pod.
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

impl PortMapping {
    /// A TCP hostPort.
    pub fn tcp(host_port: u16, container_port: u16) -> PortMapping {
        PortMapping {
            host_port,
            container_port,
            protocol: "tcp".into(),
        }
    }
}

/// The file name the manifest's install-cni init container writes.
pub const CONFLIST_NAME: &str = "10-flannel.conflist";
/// The system plugins a node's bin dir links to (the flannel entry delegates to `bridge` and
/// `host-local`; the conflist chains `portmap`; the runtime sets up `lo` with `loopback`).
pub const SYSTEM_PLUGINS: [&str; 4] = ["bridge", "host-local", "portmap", "loopback"];
/// Where Debian's containernetworking-plugins puts them.
pub const DEFAULT_PLUGIN_DIR: &str = "/usr/lib/cni";
/// The interface name inside pods.
pub const POD_IFNAME: &str = "eth0";
/// How long one plugin may run.
const PLUGIN_LIMIT: Duration = Duration::from_secs(30);

/// Where the system plugins are: `$NETNS_HARNESS_CNI_PLUGINS` or [`DEFAULT_PLUGIN_DIR`].
pub fn system_plugin_dir() -> PathBuf {
    std::env::var_os("NETNS_HARNESS_CNI_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PLUGIN_DIR))
}

/// The manifest the conflist is read from: `$NETNS_HARNESS_MANIFEST`, else the repository's
/// `deploy/kube-flannel.yml`.
pub fn manifest_path() -> PathBuf {
    std::env::var_os("NETNS_HARNESS_MANIFEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kube-flannel.yml"))
}

/// The text of the `cni-conf.json` block scalar (`cni-conf.json: |`) of the manifest's
/// ConfigMap, indentation removed, as install-cni copies it. Fails unless it is JSON.
pub fn cni_conf_from_manifest(yaml: &str) -> Result<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent_of = |l: &str| l.len() - l.trim_start().len();
    let (start, key_indent) = lines
        .iter()
        .enumerate()
        .find_map(|(i, l)| {
            let t = l.trim();
            let rest = t.strip_prefix("cni-conf.json:")?.trim();
            matches!(rest, "|" | "|-" | "|+").then(|| (i, indent_of(l)))
        })
        .ok_or_else(|| anyhow!("no `cni-conf.json: |` block in the manifest"))?;
    let mut body: Vec<&str> = Vec::new();
    for l in &lines[start + 1..] {
        if !l.trim().is_empty() && (indent_of(l) <= key_indent || l.starts_with("---")) {
            break;
        }
        body.push(l);
    }
    while body.last().is_some_and(|l| l.trim().is_empty()) {
        body.pop();
    }
    let block_indent = body
        .iter()
        .find(|l| !l.trim().is_empty())
        .map(|l| indent_of(l))
        .ok_or_else(|| anyhow!("the manifest's cni-conf.json block is empty"))?;
    let mut text = String::new();
    for l in body {
        text.push_str(l.get(block_indent..).unwrap_or("").trim_end());
        text.push('\n');
    }
    serde_json::from_str::<Value>(&text).context("the manifest's cni-conf.json is not JSON")?;
    Ok(text)
}

/// Reads [`manifest_path`] and returns its conflist text.
pub fn manifest_conflist() -> Result<String> {
    let path = manifest_path();
    let yaml =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    cni_conf_from_manifest(&yaml).with_context(|| format!("in {}", path.display()))
}

/// subnet.env as flannel's CNI plugin reads it (`flannel.go` loadFlannelSubnetEnv): lines
/// split on the first `=` (no trimming), networks as comma lists, subnets in network form; a
/// network and a subnet of at least one family are required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlannelEnv {
    /// FLANNEL_NETWORK entries.
    pub networks: Vec<Cidr>,
    /// FLANNEL_SUBNET, truncated to its network (Go's `net.ParseCIDR`).
    pub subnet: Option<Cidr>,
    /// FLANNEL_IPV6_NETWORK entries.
    pub ipv6_networks: Vec<Cidr6>,
    /// FLANNEL_IPV6_SUBNET, truncated to its network.
    pub ipv6_subnet: Option<Cidr6>,
    /// FLANNEL_MTU.
    pub mtu: u32,
    /// FLANNEL_IPMASQ == "true".
    pub ipmasq: bool,
}

impl FlannelEnv {
    /// Parses the file's text; `file` names it in the "is missing" error as flannel does.
    pub fn parse(text: &str, file: &str) -> Result<FlannelEnv> {
        let (mut networks, mut subnet, mut mtu, mut ipmasq) = (None, None, None, None);
        let (mut networks6, mut subnet6) = (None, None);
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k {
                "FLANNEL_NETWORK" => {
                    let nws = v
                        .split(',')
                        .map(|n| n.parse::<Cidr>().map(|c| c.trunc()))
                        .collect::<Result<Vec<_>>>()
                        .with_context(|| format!("{file}: FLANNEL_NETWORK={v}"))?;
                    networks = Some(nws);
                }
                "FLANNEL_SUBNET" => {
                    let c: Cidr = v
                        .parse()
                        .with_context(|| format!("{file}: FLANNEL_SUBNET={v}"))?;
                    subnet = Some(c.trunc());
                }
                "FLANNEL_IPV6_NETWORK" => {
                    let nws = v
                        .split(',')
                        .map(|n| n.parse::<Cidr6>().map(|c| c.trunc()))
                        .collect::<Result<Vec<_>>>()
                        .with_context(|| format!("{file}: FLANNEL_IPV6_NETWORK={v}"))?;
                    networks6 = Some(nws);
                }
                "FLANNEL_IPV6_SUBNET" => {
                    let c: Cidr6 = v
                        .parse()
                        .with_context(|| format!("{file}: FLANNEL_IPV6_SUBNET={v}"))?;
                    subnet6 = Some(c.trunc());
                }
                "FLANNEL_MTU" => {
                    mtu = Some(
                        v.parse::<u32>()
                            .with_context(|| format!("{file}: FLANNEL_MTU={v}"))?,
                    );
                }
                "FLANNEL_IPMASQ" => ipmasq = Some(v == "true"),
                _ => {}
            }
        }
        let mut missing = Vec::new();
        if networks.is_none() && networks6.is_none() {
            missing.push("FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK");
        }
        if subnet.is_none() && subnet6.is_none() {
            missing.push("FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET");
        }
        if mtu.is_none() {
            missing.push("FLANNEL_MTU");
        }
        if ipmasq.is_none() {
            missing.push("FLANNEL_IPMASQ");
        }
        match (mtu, ipmasq) {
            (Some(mtu), Some(ipmasq)) if missing.is_empty() => Ok(FlannelEnv {
                networks: networks.unwrap_or_default(),
                subnet,
                ipv6_networks: networks6.unwrap_or_default(),
                ipv6_subnet: subnet6,
                mtu,
                ipmasq,
            }),
            _ => bail!("{file} is missing {}", missing.join(", ")),
        }
    }
}

/// The delegate config flannel's plugin builds from its own config (`conf`: the flannel entry
/// with `name` and `cniVersion` from the list) and subnet.env (`flannel_linux.go` doCmdAdd,
/// getDelegateIPAM): the `delegate` object (no `name`/`ipam` allowed in it) plus `name`,
/// `type` (default `bridge`), `ipMasq` (default: not FLANNEL_IPMASQ, so pods are masqueraded
/// by the bridge only when flanneld does not do it), `mtu` (default FLANNEL_MTU), `isGateway`
/// (default true for bridge), `cniVersion`, the entry's `runtimeConfig`, and `ipam`: the
/// entry's own `ipam` object with `type` (default `host-local`), `ranges` =
/// `[[{"subnet": FLANNEL_SUBNET}]]` and `routes` = its own routes plus one per FLANNEL_NETWORK.
pub fn flannel_delegate(conf: &Value, env: &FlannelEnv) -> Result<Value> {
    let conf = conf
        .as_object()
        .ok_or_else(|| anyhow!("the flannel config is not a JSON object"))?;
    let mut d: Map<String, Value> = match conf.get("delegate") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => bail!("'delegate' must be a dictionary"),
    };
    if d.get("type").is_some_and(|t| !t.is_string()) {
        bail!("'delegate' dictionary, if present, must have (string) 'type' field");
    }
    if d.contains_key("name") {
        bail!("'delegate' dictionary must not have 'name' field, it'll be set by flannel");
    }
    if d.contains_key("ipam") {
        bail!("'delegate' dictionary must not have 'ipam' field, it'll be set by flannel");
    }
    if let Some(rc) = conf.get("runtimeConfig").filter(|v| !v.is_null()) {
        d.insert("runtimeConfig".into(), rc.clone());
    }
    d.insert(
        "name".into(),
        conf.get("name").cloned().unwrap_or_else(|| json!("")),
    );
    d.entry("type").or_insert_with(|| json!("bridge"));
    d.entry("ipMasq").or_insert_with(|| json!(!env.ipmasq));
    d.entry("mtu").or_insert_with(|| json!(env.mtu));
    if d.get("type").and_then(Value::as_str) == Some("bridge") {
        d.entry("isGateway").or_insert_with(|| json!(true));
    }
    if let Some(v) = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
    {
        d.insert("cniVersion".into(), json!(v));
    }
    let mut ipam: Map<String, Value> = match conf.get("ipam") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => bail!("failed to load netconf: 'ipam' is not a dictionary"),
    };
    ipam.entry("type").or_insert_with(|| json!("host-local"));
    // One range set per family, IPv4 first (flannel_linux.go getDelegateIPAM).
    let ranges: Vec<Value> = env
        .subnet
        .map(|s| s.to_string())
        .into_iter()
        .chain(env.ipv6_subnet.map(|s| s.to_string()))
        .map(|s| json!([{ "subnet": s }]))
        .collect();
    ipam.insert("ranges".into(), Value::Array(ranges));
    let mut routes: Vec<Value> = match ipam.get("routes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(r)) => r.clone(),
        Some(_) => bail!("failed to read IPAM routes: ipam.routes is not a list"),
    };
    routes.extend(env.networks.iter().map(|n| json!({ "dst": n.to_string() })));
    routes.extend(
        env.ipv6_networks
            .iter()
            .map(|n| json!({ "dst": n.to_string() })),
    );
    ipam.insert("routes".into(), Value::Array(routes));
    d.insert("ipam".into(), Value::Object(ipam));
    Ok(Value::Object(d))
}

/// The plugin list of a config file's text: a `.conflist`, or a single-plugin `.conf` as a
/// list of one (libcni's ConfListFromConf).
pub fn parse_conflist(text: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(text).context("CNI config is not JSON")?;
    if v.get("plugins").is_some() {
        if !v["plugins"].is_array() {
            bail!("CNI config: \"plugins\" is not a list");
        }
        return Ok(v);
    }
    if v.get("type").and_then(Value::as_str).is_none() {
        bail!("CNI config has neither \"plugins\" nor \"type\"");
    }
    Ok(json!({
        "name": v.get("name").cloned().unwrap_or(Value::Null),
        "cniVersion": v.get("cniVersion").cloned().unwrap_or(Value::Null),
        "plugins": [v],
    }))
}

/// The config one plugin of a list gets (libcni buildOneConfig): its entry plus the list's
/// `name` and `cniVersion`, `prevResult` when there is one, and `runtimeConfig` with the
/// runtime's values for the capabilities the entry declares (here: `portMappings`).
pub fn plugin_config(
    list: &Value,
    entry: &Value,
    prev: Option<&Value>,
    ports: &[PortMapping],
) -> Result<Value> {
    let mut c = entry
        .as_object()
        .cloned()
        .ok_or_else(|| anyhow!("a plugin entry is not an object"))?;
    c.insert(
        "name".into(),
        list.get("name").cloned().unwrap_or(Value::Null),
    );
    c.insert(
        "cniVersion".into(),
        list.get("cniVersion").cloned().unwrap_or(Value::Null),
    );
    if let Some(p) = prev {
        c.insert("prevResult".into(), p.clone());
    }
    let wants_ports = entry
        .get("capabilities")
        .and_then(|c| c.get("portMappings"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if wants_ports && !ports.is_empty() {
        c.insert(
            "runtimeConfig".into(),
            json!({ "portMappings": serde_json::to_value(ports)? }),
        );
    }
    Ok(Value::Object(c))
}

/// A CNI error result's message (`{"code":..,"msg":..,"details":..}` on stdout), else the
/// output as text.
fn plugin_error(stdout: &[u8], stderr: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(stdout) {
        if let Some(msg) = v.get("msg").and_then(Value::as_str) {
            let details = v.get("details").and_then(Value::as_str).unwrap_or("");
            let code = v.get("code").map(Value::to_string).unwrap_or_default();
            return format!("{msg} {details} (code {code})").trim().to_string();
        }
    }
    let mut s = String::from_utf8_lossy(stdout).trim().to_string();
    let e = String::from_utf8_lossy(stderr);
    if !e.trim().is_empty() {
        s.push_str(" / ");
        s.push_str(e.trim());
    }
    s
}

/// Finds `name` in the `CNI_PATH`-style list `dirs` (first match, like libcni's FindInPath).
pub fn find_plugin(name: &str, dirs: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains('/') {
        bail!("invalid plugin name {name:?}");
    }
    dirs.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("failed to find plugin {name:?} in path [{dirs}]"))
}

/// The per-run values of one plugin invocation (the `CNI_*` environment).
#[derive(Debug, Clone)]
pub struct Invocation {
    /// ADD, DEL, CHECK.
    pub command: &'static str,
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS.
    pub netns: PathBuf,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_ARGS.
    pub args: String,
    /// CNI_PATH.
    pub path: String,
}

/// Runs one plugin inside the node namespace `node_ns` (where a kubelet runs it: the node's
/// network namespace) with `config` on stdin. Returns its result (Null when it printed
/// nothing, as DEL may).
pub fn exec_plugin(node_ns: &str, inv: &Invocation, config: &Value) -> Result<Value> {
    let ty = config
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("plugin config without \"type\""))?;
    let bin = find_plugin(ty, &inv.path)?;
    let bin_s = bin.to_string_lossy().into_owned();
    let mut c = cmd::ns_command(node_ns, &[&bin_s]);
    c.env("CNI_COMMAND", inv.command)
        .env("CNI_CONTAINERID", &inv.container_id)
        .env("CNI_NETNS", &inv.netns)
        .env("CNI_IFNAME", &inv.ifname)
        .env("CNI_ARGS", &inv.args)
        .env("CNI_PATH", &inv.path);
    let out = cmd::run_input(&mut c, serde_json::to_vec(config)?, PLUGIN_LIMIT)?;
    if !out.status.success() {
        bail!(
            "CNI {} of plugin {ty} for {}: {}",
            inv.command,
            inv.container_id,
            plugin_error(&out.stdout, &out.stderr)
        );
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "plugin {ty} printed a result that is not JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The first IPv4 address of a CNI result (`ips[].address`, CIDR form).
pub fn result_ipv4(result: &Value) -> Option<(Ipv4Addr, u8)> {
    result.get("ips")?.as_array()?.iter().find_map(|ip| {
        let c: Cidr = ip.get("address")?.as_str()?.parse().ok()?;
        Some((c.addr, c.len))
    })
}

/// The first IPv6 address of a CNI result (`ips[].address`, CIDR form).
pub fn result_ipv6(result: &Value) -> Option<(std::net::Ipv6Addr, u8)> {
    result.get("ips")?.as_array()?.iter().find_map(|ip| {
        let c: Cidr6 = ip.get("address")?.as_str()?.parse().ok()?;
        Some((c.addr, c.len))
    })
}

/// A node's CNI directories (see the module docs).
#[derive(Debug, Clone)]
pub struct CniLayout {
    /// `CNI_PATH` / doctor's `--cni-bin-dir`.
    pub bin_dir: PathBuf,
    /// doctor's `--cni-conf-dir`.
    pub conf_dir: PathBuf,
    /// The flannel meta-plugin's `dataDir`.
    pub flannel_dir: PathBuf,
    /// host-local's `dataDir`.
    pub ipam_dir: PathBuf,
    /// The runtime's saved ADD results and configs, for DEL.
    pub results_dir: PathBuf,
    /// The node's subnet.env (flannel's `subnetFile`).
    pub subnet_file: PathBuf,
}

/// What the runtime keeps of one ADD (libcni caches this in /var/lib/cni/results).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Cached {
    pub(crate) conflist: Value,
    pub(crate) ports: Vec<PortMapping>,
    pub(crate) result: Value,
    pub(crate) netns: PathBuf,
    pub(crate) args: String,
}

// ---------------------------------------------------------------------------------------
// The flannel meta-plugin (this binary, invoked as `flannel` from a node's CNI bin dir).

/// True when this process was started as the `flannel` CNI plugin (the file name of `argv[0]`).
pub fn invoked_as_flannel_plugin() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| Path::new(&a).file_name().map(|f| f == "flannel"))
        .unwrap_or(false)
}

/// flannel's defaults when its config names no paths.
const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";

/// The CNI plugin protocol of flannel's meta-plugin: `CNI_COMMAND` from the environment, its
/// config on stdin, a result or an error object on stdout.
pub fn flannel_plugin_main() -> ExitCode {
    let mut input = Vec::new();
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    if command != "VERSION" {
        use std::io::Read;
        if let Err(e) = std::io::stdin().take(1 << 20).read_to_end(&mut input) {
            return plugin_fail("0.3.1", 999, &format!("reading stdin: {e}"));
        }
    }
    let version = serde_json::from_slice::<Value>(&input)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| "0.3.1".into());
    let res = match command.as_str() {
        "VERSION" => {
            println!(
                r#"{{"cniVersion":"0.4.0","supportedVersions":["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0"]}}"#
            );
            return ExitCode::SUCCESS;
        }
        "ADD" => flannel_add(&input),
        "DEL" => flannel_del(&input),
        // flannel's cmdCheck is a no-op.
        "CHECK" => Ok(String::new()),
        other => Err(anyhow!("unknown CNI_COMMAND {other:?}")),
    };
    match res {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => plugin_fail(&version, 999, &format!("{e:#}")),
    }
}

fn plugin_fail(version: &str, code: u32, msg: &str) -> ExitCode {
    println!(
        "{}",
        json!({"cniVersion": version, "code": code, "msg": msg})
    );
    ExitCode::FAILURE
}

fn conf_path(conf: &Value, key: &str, default: &str) -> PathBuf {
    PathBuf::from(
        conf.get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(default),
    )
}

fn cni_env(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| anyhow!("required env variable {name} missing"))
}

/// Runs a delegate plugin from `CNI_PATH` with the environment this process got.
fn delegate(config: &Value) -> Result<Vec<u8>> {
    let ty = config.get("type").and_then(Value::as_str).unwrap_or("");
    let bin = find_plugin(ty, &cni_env("CNI_PATH")?)?;
    let out = cmd::run_input(
        &mut Command::new(&bin),
        serde_json::to_vec(config)?,
        PLUGIN_LIMIT,
    )?;
    if !out.status.success() {
        bail!("{}", plugin_error(&out.stdout, &out.stderr));
    }
    Ok(out.stdout)
}

fn flannel_add(input: &[u8]) -> Result<String> {
    let conf: Value =
        serde_json::from_slice(input).map_err(|e| anyhow!("failed to load netconf: {e}"))?;
    let subnet_file = conf_path(&conf, "subnetFile", DEFAULT_SUBNET_FILE);
    let data_dir = conf_path(&conf, "dataDir", DEFAULT_DATA_DIR);
    let text = std::fs::read_to_string(&subnet_file)
        .with_context(|| format!("open {}", subnet_file.display()))?;
    let env = FlannelEnv::parse(&text, &subnet_file.to_string_lossy())?;
    let d = flannel_delegate(&conf, &env)?;
    let cid = cni_env("CNI_CONTAINERID")?;
    if cid.is_empty() || cid.contains('/') {
        bail!("invalid CNI_CONTAINERID {cid:?}");
    }
    // Saved for DEL (flannel's saveScratchNetConf): the exact delegate config.
    std::fs::create_dir_all(&data_dir)?;
    let bytes = serde_json::to_vec(&d)?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(data_dir.join(&cid))?;
        f.write_all(&bytes)?;
    }
    let out = delegate(&d).map_err(|e| anyhow!("failed to delegate add: {e:#}"))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn flannel_del(input: &[u8]) -> Result<String> {
    let conf: Value =
        serde_json::from_slice(input).map_err(|e| anyhow!("failed to load netconf: {e}"))?;
    let data_dir = conf_path(&conf, "dataDir", DEFAULT_DATA_DIR);
    let cid = cni_env("CNI_CONTAINERID")?;
    if cid.is_empty() || cid.contains('/') {
        bail!("invalid CNI_CONTAINERID {cid:?}");
    }
    let path = data_dir.join(&cid);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        // Already deleted: DEL must succeed (the spec, and flannel).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let Ok(d) = serde_json::from_slice::<Value>(&bytes) else {
        // flannel: the interface stays until reboot; not an error.
        eprintln!("failed to parse netconf {}", path.display());
        return Ok(String::new());
    };
    delegate(&d)?;
    let _ = std::fs::remove_file(&path);
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> FlannelEnv {
        FlannelEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
            "/run/flannel/subnet.env",
        )
        .unwrap()
    }

    #[test]
    fn manifest_block_is_extracted_and_is_the_shipped_conflist() {
        let text = manifest_conflist().unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["name"], "cbr0");
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["plugins"][0]["type"], "flannel");
        assert_eq!(v["plugins"][0]["delegate"]["hairpinMode"], true);
        assert_eq!(v["plugins"][0]["delegate"]["isDefaultGateway"], true);
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
        assert!(text.starts_with("{\n"), "{text}");
    }

    #[test]
    fn manifest_block_stops_at_the_next_key() {
        let yaml = "data:\n  cni-conf.json: |\n    {\n      \"a\": 1\n\n    }\n  net-conf.json: |\n    {}\n";
        assert_eq!(
            cni_conf_from_manifest(yaml).unwrap(),
            "{\n  \"a\": 1\n\n}\n"
        );
        assert!(cni_conf_from_manifest("data:\n  x: |\n    {}\n").is_err());
        assert!(cni_conf_from_manifest("data:\n  cni-conf.json: |\n    {nope\n").is_err());
    }

    #[test]
    fn subnet_env_as_flannel_reads_it() {
        let e = env();
        assert_eq!(e.subnet.unwrap().to_string(), "10.244.3.0/24");
        assert_eq!(e.networks.len(), 1);
        assert_eq!(e.mtu, 1450);
        assert!(e.ipmasq);
        let e = FlannelEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16,10.245.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n",
            "f",
        )
        .unwrap();
        assert_eq!(e.networks.len(), 2);
        assert!(!e.ipmasq);
        let err = FlannelEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\n", "/x/subnet.env")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/x/subnet.env is missing FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ"
        );
        // No trimming: " FLANNEL_MTU" is not the key.
        assert!(FlannelEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n FLANNEL_MTU=1\nFLANNEL_IPMASQ=true\n",
            "f"
        )
        .is_err());
    }

    #[test]
    fn delegate_is_flannels() {
        let list: Value = serde_json::from_str(&manifest_conflist().unwrap()).unwrap();
        let mut entry = plugin_config(&list, &list["plugins"][0], None, &[]).unwrap();
        entry["ipam"] = json!({"dataDir": "/tmp/x"});
        let d = flannel_delegate(&entry, &env()).unwrap();
        assert_eq!(
            d,
            json!({
                "name": "cbr0",
                "cniVersion": "0.3.1",
                "type": "bridge",
                "hairpinMode": true,
                "isDefaultGateway": true,
                "isGateway": true,
                "ipMasq": false,
                "mtu": 1450,
                "ipam": {
                    "type": "host-local",
                    "dataDir": "/tmp/x",
                    "ranges": [[{"subnet": "10.244.3.0/24"}]],
                    "routes": [{"dst": "10.244.0.0/16"}],
                },
            })
        );
        // Without --ip-masq the bridge masquerades; explicit delegate keys win.
        let mut e = env();
        e.ipmasq = false;
        let d = flannel_delegate(
            &json!({"name": "n", "delegate": {"mtu": 1300, "isGateway": false},
                    "ipam": {"routes": [{"dst": "10.96.0.0/12"}]}}),
            &e,
        )
        .unwrap();
        assert_eq!(d["ipMasq"], true);
        assert_eq!(d["mtu"], 1300);
        assert_eq!(d["isGateway"], false);
        assert!(d.get("cniVersion").is_none());
        assert_eq!(
            d["ipam"]["routes"],
            json!([{"dst": "10.96.0.0/12"}, {"dst": "10.244.0.0/16"}])
        );
        for bad in [
            json!({"delegate": {"name": "x"}}),
            json!({"delegate": {"ipam": {}}}),
            json!({"delegate": {"type": 1}}),
        ] {
            assert!(flannel_delegate(&bad, &env()).is_err(), "{bad}");
        }
    }

    #[test]
    fn chain_configs_carry_prev_result_and_port_mappings() {
        let list: Value = serde_json::from_str(&manifest_conflist().unwrap()).unwrap();
        let prev =
            json!({"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.244.3.2/24"}]});
        let ports = [PortMapping::tcp(8080, 7002)];
        let c = plugin_config(&list, &list["plugins"][1], Some(&prev), &ports).unwrap();
        assert_eq!(c["type"], "portmap");
        assert_eq!(c["name"], "cbr0");
        assert_eq!(c["prevResult"], prev);
        assert_eq!(
            c["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 7002, "protocol": "tcp"}]})
        );
        // The flannel entry declares no capability: no runtimeConfig.
        let c = plugin_config(&list, &list["plugins"][0], None, &ports).unwrap();
        assert!(c.get("runtimeConfig").is_none());
        assert_eq!(result_ipv4(&prev), Some((Ipv4Addr::new(10, 244, 3, 2), 24)));
    }

    #[test]
    fn single_plugin_conf_becomes_a_list() {
        let l = parse_conflist(r#"{"cniVersion":"0.3.1","name":"x","type":"bridge"}"#).unwrap();
        assert_eq!(l["plugins"][0]["type"], "bridge");
        assert!(parse_conflist(r#"{"name":"x"}"#).is_err());
        assert!(find_plugin("../bridge", "/usr/lib/cni").is_err());
    }
}
