//! `netns-harness`: build, check, benchmark, capture and tear down network-namespace clusters
//! of flanneld (and kernel-ref) nodes.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use netns_harness::cluster::{list_runs, only_run, teardown_by_prefix};
use netns_harness::{
    capture, proto, scale, scenario, CaptureOpts, Cluster, ClusterSpec, NodeKind, NodeSpec,
    StoreKind, DEFAULT_BASE_DIR,
};

#[derive(Parser, Debug)]
#[command(
    name = "netns-harness",
    version,
    about = "Network-namespace clusters for flannel-rs: up, check, bench, capture, down"
)]
struct Cli {
    /// Directory holding run directories.
    #[arg(long, global = true, default_value = DEFAULT_BASE_DIR)]
    base_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct BuildArgs {
    /// Number of nodes (default: number of --kinds, else 2).
    #[arg(long)]
    nodes: Option<usize>,
    /// Pods per node.
    #[arg(long, default_value_t = 2)]
    pods: usize,
    /// Node kinds, comma separated: userspace, kernel, kernel-ref (one kind = all nodes).
    #[arg(long)]
    kinds: Option<String>,
    /// flanneld binary (default: `flanneld` next to this executable).
    #[arg(long)]
    flanneld: Option<PathBuf>,
    /// Extra argument for every flanneld (repeatable), e.g. --flanneld-arg=-v --flanneld-arg=2.
    #[arg(long = "flanneld-arg", allow_hyphen_values = true)]
    flanneld_args: Vec<String>,
    /// net-conf JSON (default {"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}).
    #[arg(long)]
    net_conf: Option<String>,
    /// Run flanneld with --ip-masq (kernel-ref nodes install flannel's masquerade rules).
    #[arg(long)]
    ip_masq: bool,
    /// Underlay veth offloads: on (kind-like: tx checksum offload and GSO left on, so
    /// checksums cross unfinished) or off (real-wire: finished checksums, MTU-sized frames;
    /// what `capture verify` needs to check every frame).
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    link_offloads: bool,
    /// Lease store: dir (lease directory), etcd (etcd in the control-plane namespace) or kube
    /// (test API server in the control-plane namespace, flanneld --kube-subnet-mgr).
    #[arg(long, default_value = "dir")]
    store: String,
    /// Two-site NAT topology: one site (1 or 2) per node, comma separated, e.g. 1,1,2.
    #[arg(long)]
    sites: Option<String>,
    /// etcd binary (default /usr/bin/etcd).
    #[arg(long)]
    etcd: Option<PathBuf>,
    /// test-apiserver binary (default: next to this executable).
    #[arg(long)]
    apiserver: Option<PathBuf>,
    /// How pods are made: cni (the real CNI plugins from kube-flannel.yml's conflist) or
    /// hand (the harness's own ip commands).
    #[arg(long, default_value = "cni")]
    pod_setup: String,
    /// Overlay address families: v4, v6 (IPv6 only) or dual (nodes get 2001:db8:18::<i>/64 on
    /// eth0, net-conf IPv6Network fd42:244::/56 unless --net-conf says otherwise).
    #[arg(long, default_value = "v4")]
    ip_family: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build a cluster and leave it running; prints the run id and state file.
    Up(BuildArgs),
    /// Connectivity matrix of a running cluster; exit status 1 if any probe fails.
    Check {
        /// Run prefix (default: the only run; with several, name one).
        #[arg(long)]
        run: Option<String>,
        /// Retry for up to this many seconds until everything passes.
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// Stop every process of a run and delete its namespaces and directory. Idempotent.
    Down {
        /// Run prefix (default: the only run; with several, name one).
        #[arg(long)]
        run: Option<String>,
        /// Tear down every run whose owning process (a test, a demo) died without cleaning up.
        #[arg(long, conflicts_with = "run")]
        stale: bool,
    },
    /// Underlay, kernel vxlan (kernel-ref) and userspace side by side on a running cluster
    /// with two userspace and two kernel-ref nodes: TCP x1/x4, 64-byte UDP packets/s, ping
    /// RTT mean/p99, CPU per GB, on the GSO and the MTU wire, min/median/max over rounds.
    /// Prints the table and writes bench.json and bench.svg.
    Bench {
        /// Run prefix (default: the only run; with several, name one).
        #[arg(long)]
        run: Option<String>,
        /// iperf3 duration per measurement.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
        /// Rounds (each measures everything once).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Pings per RTT measurement, 1 ms apart.
        #[arg(long, default_value_t = 1000)]
        pings: u32,
        /// Only the GSO wire (veth default offloads), skip the MTU wire.
        #[arg(long)]
        gso_only: bool,
        /// Directory for bench.json and bench.svg (default: the run directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Measure nothing: print the table of this bench.json and redraw its chart (as
        /// bench.svg in --out, default: the JSON's directory).
        #[arg(long, value_name = "BENCH_JSON")]
        replot: Option<PathBuf>,
    },
    /// up (2 userspace + 2 kernel-ref nodes) → check → bench → down, cleaning up on any exit.
    Demo {
        #[command(flatten)]
        build: BuildArgs,
        /// iperf3 duration per path.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Seconds the check may retry while daemons converge.
        #[arg(long, default_value_t = 15)]
        wait: u64,
    },
    /// Field-problem scenarios (P2, P3): build a cluster, break it like the field report,
    /// check the matrix and `flanneld doctor`, fix it, check again, tear down. Names:
    /// p2-cluster-ip, p3-ip-forward, p3-forward-reject, p3-security-software, p3-vxlan-port,
    /// p3 (the five P3 causes on one cluster), all; `list` describes them. Exit status 1 if an
    /// assertion failed.
    Scenario {
        /// Scenario names (several share one cluster when they can).
        #[arg(required = true)]
        names: Vec<String>,
        /// Lease store: dir, etcd or kube.
        #[arg(long, default_value = "dir")]
        store: String,
        /// flanneld binary (default: `flanneld` next to this executable).
        #[arg(long)]
        flanneld: Option<PathBuf>,
        /// Extra argument for every flanneld (repeatable).
        #[arg(long = "flanneld-arg", allow_hyphen_values = true)]
        flanneld_args: Vec<String>,
        /// Seconds a fixed cluster may take to pass the matrix again.
        #[arg(long, default_value_t = 15)]
        wait: u64,
        /// Treat unverified assertions (flanneld without doctor) as failures.
        #[arg(long)]
        strict: bool,
        /// Underlay veth offloads, as for `up` (p2-cluster-ip and p3-vxlan-port, and a
        /// cluster they share, always run with off: they verify every checksum on the wire).
        #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
        link_offloads: bool,
        /// etcd binary (etcd store).
        #[arg(long)]
        etcd: Option<PathBuf>,
        /// test-apiserver binary (kube store).
        #[arg(long)]
        apiserver: Option<PathBuf>,
        /// Address families of the cluster, as for `up` (dual: every scenario breaks and
        /// judges both families; p2-cluster-ip adds IPv6 ClusterIPs and checks flannel-v6.1,
        /// node-setup expects doctor's mtu and mtu-v6, the fallbacks route both directly).
        #[arg(long, default_value = "v4")]
        ip_family: String,
    },
    /// Packet capture on the underlay bridge, verified with tshark.
    Capture {
        #[command(subcommand)]
        action: CaptureCmd,
    },
    /// Show runs, or one run's nodes, pods and processes.
    Status {
        /// Run prefix (default: list all runs).
        #[arg(long)]
        run: Option<String>,
    },
    /// Run a command inside one of the run's namespaces (`n1`, `n1p2`, `ul` or a full name).
    Exec {
        /// Run prefix (default: the only run; with several, name one).
        #[arg(long)]
        run: Option<String>,
        /// Namespace.
        ns: String,
        /// Command and arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Add a node to a running cluster.
    AddNode {
        /// Run prefix (default: the only run; with several, name one).
        #[arg(long)]
        run: Option<String>,
        /// Site (two-site runs; default 1).
        #[arg(long)]
        site: Option<u8>,
        /// userspace, kernel or kernel-ref.
        kind: String,
    },
    /// Stop (outage) or start the run's etcd / API server, by PID, same port and data.
    Store {
        /// Run prefix (default: the only run; with several, name one).
        #[arg(long)]
        run: Option<String>,
        /// stop, start or status.
        action: StoreAction,
    },
    /// Run kubectl against the run's API server (kube runs), inside the control-plane
    /// namespace: `netns-harness kubectl -- get nodes -o wide`.
    Kubectl {
        /// Run prefix (default: the only run; with several, name one).
        #[arg(long)]
        run: Option<String>,
        /// kubectl's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set or remove an annotation on a node's Node object (kube runs) with `kubectl
    /// annotate`: KEY=VALUE sets, KEY- removes.
    Annotate {
        /// Run prefix (default: the only run; with several, name one).
        #[arg(long)]
        run: Option<String>,
        /// Node name (`n2`).
        node: String,
        /// KEY=VALUE or KEY-.
        annotation: String,
    },
    /// Restart a node's flanneld (or republish a kernel-ref node's lease, as a restarted
    /// flannel would).
    Restart {
        /// Run prefix (default: the only run; with several, name one).
        #[arg(long)]
        run: Option<String>,
        /// Node name (`n2`).
        node: String,
    },
    /// Remove a node (flanneld, lease, namespaces) from a running cluster.
    RemoveNode {
        /// Run prefix (default: the only run; with several, name one).
        #[arg(long)]
        run: Option<String>,
        /// Node name (`n3`).
        node: String,
    },
    /// Control-plane scale with real daemons: `peers` (one flanneld, thousands of Nodes in the
    /// API server, then churn) or `cluster` (many nodes of mixed kinds, sampled matrix).
    Scale {
        #[command(subcommand)]
        what: ScaleCmd,
        /// Also write the reports as JSON to this file.
        #[arg(long, global = true)]
        json: Option<PathBuf>,
    },
    /// Responders for one pod (started by the harness inside pod namespaces).
    #[command(hide = true)]
    Serve {
        #[arg(long, default_value_t = proto::TCP_PORT)]
        tcp_port: u16,
        #[arg(long, default_value_t = proto::UDP_PORT)]
        udp_port: u16,
        #[arg(long, default_value_t = proto::DNS_PORT)]
        dns_port: u16,
        /// Exit after this many seconds regardless.
        #[arg(long, default_value_t = 6 * 3600)]
        lifetime_secs: u64,
        /// Listen on IPv6 too (dual-stack sockets on [::]).
        #[arg(long)]
        ipv6: bool,
    },
    /// One probe (run by `check` inside a namespace).
    #[command(hide = true)]
    Probe {
        kind: ProbeArg,
        addr: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// TCP only: pad the request to this many bytes (at most 4096).
        #[arg(long, default_value_t = 0)]
        bytes: usize,
    },
    /// Prints the source address a responder's whoami port (7002) saw this connection from.
    #[command(hide = true)]
    Whoami {
        addr: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

#[derive(Subcommand, Debug)]
enum ScaleCmd {
    /// One flanneld per data plane against the test API server holding `--peers` Nodes with
    /// flannel leases: time to program every peer, CPU, RSS; then `--churn-percent` of the
    /// Nodes deleted / added alternately every `--churn-every` seconds for `--churn-for`.
    Peers {
        /// Other Nodes in the API server.
        #[arg(long, default_value_t = 5000)]
        peers: usize,
        /// Data planes to measure, comma separated (userspace, kernel).
        #[arg(long, default_value = "userspace,kernel")]
        dataplanes: String,
        /// Share of the Nodes changed per churn step (percent).
        #[arg(long, default_value_t = 1.0)]
        churn_percent: f64,
        /// Seconds between churn steps.
        #[arg(long, default_value_t = 10)]
        churn_every: u64,
        /// Seconds of churn (0: none).
        #[arg(long, default_value_t = 60)]
        churn_for: u64,
        /// Seconds a daemon may take to program every peer.
        #[arg(long, default_value_t = 300)]
        converge_limit: u64,
        /// flanneld binary (default: `flanneld` next to this executable).
        #[arg(long)]
        flanneld: Option<PathBuf>,
        /// test-apiserver binary (default: next to this executable).
        #[arg(long)]
        apiserver: Option<PathBuf>,
    },
    /// `up` with `--nodes` nodes (kinds cycled), then a sampled matrix until it passes: time
    /// to converge and RSS per daemon.
    Cluster {
        /// Number of nodes.
        #[arg(long, default_value_t = 30)]
        nodes: usize,
        /// Node kinds, cycled over the nodes.
        #[arg(long, default_value = "userspace,kernel,kernel-ref")]
        kinds: String,
        /// Lease store: dir, etcd or kube.
        #[arg(long, default_value = "dir")]
        store: String,
        /// Seconds the sampled matrix may take to pass after `up`.
        #[arg(long, default_value_t = 120)]
        converge_limit: u64,
        /// flanneld binary (default: `flanneld` next to this executable).
        #[arg(long)]
        flanneld: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum CaptureCmd {
    /// Start tcpdump in the underlay namespace.
    Start {
        #[arg(long)]
        run: Option<String>,
        /// Interface in the underlay namespace.
        #[arg(long, default_value = "br0")]
        iface: String,
        /// Stop after this many packets.
        #[arg(long, default_value_t = 100_000)]
        packets: u64,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 300)]
        seconds: u32,
        /// pcap filter expression.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Stop the newest running capture and print its file.
    Stop {
        #[arg(long)]
        run: Option<String>,
    },
    /// Verify checksums in a capture with tshark; exit status 1 on any bad checksum.
    Verify {
        #[arg(long)]
        run: Option<String>,
        /// pcap file (default: the newest capture of the run).
        #[arg(long)]
        pcap: Option<PathBuf>,
        /// VXLAN UDP port (default: the run's net-conf port, else 8472).
        #[arg(long)]
        port: Option<u16>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum StoreAction {
    Stop,
    Start,
    Status,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ProbeArg {
    Tcp,
    Udp,
    Dns,
}

/// `on`/`off` (also `true`/`false`) as a bool.
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

fn spec_from(b: &BuildArgs, default_kinds: &str) -> Result<ClusterSpec> {
    let kinds = NodeKind::parse_list(b.kinds.as_deref().unwrap_or(default_kinds))?;
    let n = b.nodes.unwrap_or(if b.kinds.is_some() {
        kinds.len()
    } else {
        default_kinds.split(',').count()
    });
    let kinds: Vec<NodeKind> = match kinds.len() {
        0 => bail!("--kinds is empty"),
        1 => vec![kinds[0]; n],
        l if l == n => kinds,
        l => bail!("--kinds lists {l} kinds but --nodes is {n}"),
    };
    let mut spec = ClusterSpec::new(&kinds, b.pods);
    spec.nodes = kinds.into_iter().map(NodeSpec::from).collect();
    spec.flanneld = b.flanneld.clone();
    spec.flanneld_args = b.flanneld_args.clone();
    spec.net_conf = b.net_conf.clone();
    spec.ip_family = b.ip_family.parse()?;
    spec.ip_masq = b.ip_masq;
    spec.underlay_tx_offload = b.link_offloads;
    spec.store = b.store.parse::<StoreKind>()?;
    spec.etcd_bin = b.etcd.clone();
    spec.apiserver_bin = b.apiserver.clone();
    spec.pod_setup = b.pod_setup.parse()?;
    if let Some(sites) = &b.sites {
        spec.sites = sites
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse::<u8>()
                    .map_err(|_| anyhow!("--sites: {s:?} is not a site number (1 or 2)"))
            })
            .collect::<Result<_>>()?;
    }
    Ok(spec)
}

fn with_base(mut spec: ClusterSpec, base: &Path) -> ClusterSpec {
    spec.base_dir = base.to_path_buf();
    spec
}

fn newest_pcap(cluster: &Cluster) -> Option<PathBuf> {
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(cluster.run_dir())
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pcap"))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    files.sort();
    files.pop().map(|f| f.1)
}

fn status(cli: &Cli, run: Option<&str>) -> Result<ExitCode> {
    let Some(run) = run else {
        let runs = list_runs(&cli.base_dir);
        if runs.is_empty() {
            println!("no runs in {}", cli.base_dir.display());
        }
        for (prefix, _) in runs {
            match Cluster::load(&cli.base_dir, Some(&prefix)) {
                Ok(c) => println!(
                    "{prefix}  nodes {}  pods {}  owner {}",
                    c.nodes().len(),
                    c.pods().len(),
                    c.state()
                        .owner
                        .as_ref()
                        .map(|o| format!(
                            "pid {} ({})",
                            o.pid,
                            if o.alive() { "alive" } else { "dead" }
                        ))
                        .unwrap_or_else(|| "detached".into())
                ),
                Err(e) => println!("{prefix}  unreadable state: {e:#}"),
            }
        }
        return Ok(ExitCode::SUCCESS);
    };
    let c = Cluster::load(&cli.base_dir, Some(run))?;
    println!("run {}  dir {}", c.prefix(), c.run_dir().display());
    println!("store {}", store_line(&c));
    for n in c.nodes() {
        println!(
            "  {} {:<10} ns {} eth0 {}{} subnet {} mtu {} flanneld {}",
            n.name,
            n.kind.as_str(),
            n.ns,
            n.underlay_ip,
            match (n.site, n.public_ip) {
                (Some(s), Some(p)) => format!(" (site {s}, public {p})"),
                _ => String::new(),
            },
            n.subnet
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into()),
            n.mtu,
            n.flanneld
                .as_ref()
                .map(|r| format!(
                    "pid {} ({})",
                    r.pid,
                    if r.alive() { "alive" } else { "dead" }
                ))
                .unwrap_or_else(|| "-".into())
        );
        for p in &n.pods {
            println!("     {} {} ns {}", p.name, p.ip, p.ns);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn store_line(c: &Cluster) -> String {
    match c.control_plane() {
        None => format!("{} at {}", c.store_kind(), c.lease_dir().root().display()),
        Some(cp) => {
            let pid = |r: &Option<netns_harness::cmd::ProcRecord>| {
                r.as_ref()
                    .map(|r| {
                        format!(
                            "pid {} ({})",
                            r.pid,
                            if r.alive() { "alive" } else { "dead" }
                        )
                    })
                    .unwrap_or_else(|| "stopped".into())
            };
            format!(
                "{} at {} in {}: server {}, maintenance {}",
                cp.kind,
                cp.url(),
                cp.ns,
                pid(&cp.server),
                pid(&cp.maintenance)
            )
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.cmd {
        Cmd::Up(b) => {
            let spec = with_base(spec_from(b, "userspace,userspace")?, &cli.base_dir);
            let mut c = Cluster::up(&spec)?;
            c.detach()?;
            println!("run {}", c.prefix());
            println!("state {}", c.state_path().display());
            println!("store {}", store_line(&c));
            for n in c.nodes() {
                println!(
                    "  {} {} {} {}",
                    n.name,
                    n.kind,
                    n.underlay_ip,
                    n.subnet.map(|s| s.to_string()).unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Scale { what, json } => scale_cmd(&cli.base_dir, what, json.as_deref()),
        Cmd::Check { run, wait } => {
            let c = Cluster::load(&cli.base_dir, run.as_deref())?;
            let m = c.check_until_pass(Duration::from_secs(*wait));
            print!("{m}");
            Ok(if m.all_pass() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Down { run, stale } => {
            if *stale {
                for (prefix, _) in list_runs(&cli.base_dir) {
                    let owner_dead = Cluster::load(&cli.base_dir, Some(&prefix))
                        .map(|c| c.state().owner.as_ref().is_some_and(|o| !o.alive()))
                        .unwrap_or(true);
                    if owner_dead {
                        println!("tearing down stale run {prefix}");
                        teardown_run(&cli.base_dir, &prefix)?;
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let prefix = match run {
                Some(p) => p.clone(),
                None => match only_run(&cli.base_dir)? {
                    Some(r) => r,
                    None => {
                        println!("no runs in {}: nothing to do", cli.base_dir.display());
                        return Ok(ExitCode::SUCCESS);
                    }
                },
            };
            teardown_run(&cli.base_dir, &prefix)?;
            println!("run {prefix} removed");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            run,
            seconds,
            rounds,
            pings,
            gso_only,
            out,
            replot,
        } => {
            use netns_harness::suite::{write_chart, SuiteOptions, SuiteReport, Wire};
            if let Some(json) = replot {
                let text = std::fs::read_to_string(json)
                    .with_context(|| format!("reading {}", json.display()))?;
                let r = SuiteReport::from_json(&text)?;
                print!("{r}");
                let dir = match out {
                    Some(d) => d.clone(),
                    None => json.parent().map(Path::to_path_buf).unwrap_or_default(),
                };
                let svg = dir.join("bench.svg");
                write_chart(&r, &svg)?;
                println!("wrote {}", svg.display());
                return Ok(ExitCode::SUCCESS);
            }
            netns_harness::install_signal_handler()?;
            let mut c = Cluster::load(&cli.base_dir, run.as_deref())?;
            let options = SuiteOptions {
                rounds: (*rounds).clamp(1, 20),
                seconds: (*seconds).clamp(1, 60),
                pings: (*pings).clamp(10, 10_000),
                wires: if *gso_only {
                    vec![Wire::Gso]
                } else {
                    vec![Wire::Gso, Wire::Mtu]
                },
            };
            let r = c.bench_suite(options)?;
            print!("{r}");
            let dir = out.clone().unwrap_or_else(|| c.run_dir().to_path_buf());
            std::fs::create_dir_all(&dir)?;
            let json = dir.join("bench.json");
            std::fs::write(&json, serde_json::to_string_pretty(&r.to_json())?)?;
            let svg = dir.join("bench.svg");
            write_chart(&r, &svg)?;
            println!("wrote {} and {}", json.display(), svg.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo {
            build,
            seconds,
            wait,
        } => demo(&cli, build, *seconds, *wait),
        Cmd::Capture { action } => capture_cmd(&cli, action),
        Cmd::Scenario {
            names,
            store,
            flanneld,
            flanneld_args,
            wait,
            strict,
            link_offloads,
            etcd,
            apiserver,
            ip_family,
        } => {
            if names.iter().any(|n| n == "list") {
                for s in scenario::Scenario::ALL {
                    println!("{:<22} {}", s.name(), s.about());
                }
                println!("{:<22} the five P3 causes on one cluster", "p3");
                println!("{:<22} every scenario", "all");
                return Ok(ExitCode::SUCCESS);
            }
            netns_harness::install_signal_handler()?;
            let list = scenario::parse_names(names)?;
            let opts = scenario::ScenarioOpts {
                flanneld: flanneld.clone(),
                harness_bin: None,
                flanneld_args: flanneld_args.clone(),
                base_dir: cli.base_dir.clone(),
                store: store.parse::<StoreKind>()?,
                etcd_bin: etcd.clone(),
                apiserver_bin: apiserver.clone(),
                converge: Duration::from_secs(*wait),
                link_offloads: *link_offloads,
                ip_family: ip_family.parse()?,
            };
            let reports = scenario::run_many(&list, &opts, |r| {
                print!("{r}");
                let _ = std::io::stdout().flush();
            })?;
            println!("summary:");
            let mut ok = true;
            for r in &reports {
                let pass = r.passed() && (!*strict || r.unverified().is_empty());
                ok &= pass;
                println!(
                    "  {:<22} {}  ({} failed, {} unverified)",
                    r.scenario.name(),
                    if pass { "PASS" } else { "FAIL" },
                    r.failures().len(),
                    r.unverified().len()
                );
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Status { run } => status(&cli, run.as_deref()),
        Cmd::Exec { run, ns, command } => {
            let c = Cluster::load(&cli.base_dir, run.as_deref())?;
            let args: Vec<&str> = command.iter().map(String::as_str).collect();
            let out = c.exec_timeout(ns, &args, Duration::from_secs(600))?;
            std::io::stdout().write_all(&out.stdout)?;
            std::io::stderr().write_all(&out.stderr)?;
            Ok(ExitCode::from(
                out.status
                    .code()
                    .and_then(|c| u8::try_from(c).ok())
                    .unwrap_or(1),
            ))
        }
        Cmd::AddNode { run, site, kind } => {
            let mut c = Cluster::load(&cli.base_dir, run.as_deref())?;
            let name = c.add_node_at(&NodeSpec::from(kind.parse::<NodeKind>()?), *site)?;
            println!("added {name}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Store { run, action } => {
            let mut c = Cluster::load(&cli.base_dir, run.as_deref())?;
            match action {
                StoreAction::Stop => c.stop_store()?,
                StoreAction::Start => c.start_store()?,
                StoreAction::Status => {}
            }
            println!("store {}", store_line(&c));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Annotate {
            run,
            node,
            annotation,
        } => {
            let c = Cluster::load(&cli.base_dir, run.as_deref())?;
            match annotation.split_once('=') {
                Some((k, v)) => c.kube_annotate(node, k, Some(v))?,
                None => match annotation.strip_suffix('-') {
                    Some(k) => c.kube_annotate(node, k, None)?,
                    None => bail!("annotation must be KEY=VALUE or KEY-"),
                },
            }
            println!("node/{node} annotated");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kubectl { run, args } => {
            let c = Cluster::load(&cli.base_dir, run.as_deref())?;
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            print!("{}", c.kubectl(&argv)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restart { run, node } => {
            let mut c = Cluster::load(&cli.base_dir, run.as_deref())?;
            c.restart_node(node)?;
            println!("{node} restarted");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::RemoveNode { run, node } => {
            let mut c = Cluster::load(&cli.base_dir, run.as_deref())?;
            c.remove_node(node)?;
            println!("removed {node}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve {
            tcp_port,
            udp_port,
            dns_port,
            lifetime_secs,
            ipv6,
        } => {
            proto::serve(&proto::ServeOpts {
                tcp_port: *tcp_port,
                udp_port: *udp_port,
                dns_port: *dns_port,
                whoami_port: proto::WHOAMI_PORT,
                lifetime: Duration::from_secs(*lifetime_secs),
                ipv6: *ipv6,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Probe {
            kind,
            addr,
            timeout_ms,
            bytes,
        } => {
            let t = Duration::from_millis((*timeout_ms).min(2000));
            let rtt = match kind {
                ProbeArg::Tcp => proto::probe_tcp_sized(*addr, t, *bytes),
                ProbeArg::Udp => proto::probe_udp(*addr, t),
                ProbeArg::Dns => proto::probe_dns(*addr, t),
            }?;
            println!("ok {:.3} ms", rtt.as_secs_f64() * 1e3);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Whoami { addr, timeout_ms } => {
            let t = Duration::from_millis((*timeout_ms).min(5000));
            println!("{}", proto::probe_whoami(*addr, t)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn scale_cmd(base: &Path, what: &ScaleCmd, json: Option<&Path>) -> Result<ExitCode> {
    let reports: Vec<serde_json::Value> = match what {
        ScaleCmd::Peers {
            peers,
            dataplanes,
            churn_percent,
            churn_every,
            churn_for,
            converge_limit,
            flanneld,
            apiserver,
        } => {
            let mut out = Vec::new();
            for kind in NodeKind::parse_list(dataplanes)? {
                let r = scale::peer_scale(&scale::PeerScaleOpts {
                    kind,
                    peers: *peers,
                    churn_percent: *churn_percent,
                    churn_every: Duration::from_secs(*churn_every),
                    churn_for: Duration::from_secs(*churn_for),
                    converge_limit: Duration::from_secs(*converge_limit),
                    flanneld: flanneld.clone(),
                    apiserver: apiserver.clone(),
                    base_dir: base.to_path_buf(),
                })?;
                print!("{r}");
                out.push(serde_json::to_value(&r)?);
            }
            out
        }
        ScaleCmd::Cluster {
            nodes,
            kinds,
            store,
            converge_limit,
            flanneld,
        } => {
            let r = scale::cluster_scale(&scale::ClusterScaleOpts {
                kinds: NodeKind::parse_list(kinds)?,
                nodes: *nodes,
                store: store.parse()?,
                converge_limit: Duration::from_secs(*converge_limit),
                flanneld: flanneld.clone(),
                base_dir: base.to_path_buf(),
            })?;
            print!("{r}");
            vec![serde_json::to_value(&r)?]
        }
    };
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&reports)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn teardown_run(base: &Path, prefix: &str) -> Result<()> {
    match Cluster::load(base, Some(prefix)) {
        Ok(mut c) => c.teardown(),
        // No readable state: still remove namespaces and the directory by prefix.
        Err(_) => teardown_by_prefix(base, prefix),
    }
}

fn demo(cli: &Cli, build: &BuildArgs, seconds: u32, wait: u64) -> Result<ExitCode> {
    netns_harness::install_signal_handler()?;
    let spec = with_base(
        spec_from(build, "userspace,userspace,kernel-ref,kernel-ref")?,
        &cli.base_dir,
    );
    // The cluster's drop guard tears down on error, panic and (through the interrupt flag
    // every wait polls) SIGINT/SIGTERM.
    let mut c = Cluster::up(&spec)?;
    println!("run {} ({})", c.prefix(), c.run_dir().display());
    let m = c.check_until_pass(Duration::from_secs(wait));
    print!("{m}");
    netns_harness::sys::check_interrupted()?;
    let r = c.bench(seconds)?;
    print!("{r}");
    c.teardown()?;
    Ok(if m.all_pass() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn capture_cmd(cli: &Cli, action: &CaptureCmd) -> Result<ExitCode> {
    match action {
        CaptureCmd::Start {
            run,
            iface,
            packets,
            seconds,
            filter,
        } => {
            let mut c = Cluster::load(&cli.base_dir, run.as_deref())?;
            let cap = c.start_capture(&CaptureOpts {
                iface: iface.clone(),
                max_packets: *packets,
                max_seconds: *seconds,
                filter: filter.clone(),
            })?;
            println!("capture {} -> {}", cap.name, cap.pcap.display());
            Ok(ExitCode::SUCCESS)
        }
        CaptureCmd::Stop { run } => {
            let mut c = Cluster::load(&cli.base_dir, run.as_deref())?;
            let cap = c
                .captures()
                .pop()
                .ok_or_else(|| anyhow!("no running capture in run {}", c.prefix()))?;
            let path = c.stop_capture(&cap.name)?;
            println!("{}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        CaptureCmd::Verify { run, pcap, port } => {
            let (path, port) = match (pcap, Cluster::load(&cli.base_dir, run.as_deref())) {
                (Some(p), c) => (
                    p.clone(),
                    port.or_else(|| {
                        c.ok()
                            .and_then(|c| c.net_conf().ok())
                            .map(|n| n.effective_port())
                    })
                    .unwrap_or(8472),
                ),
                (None, Ok(c)) => (
                    newest_pcap(&c).context("no capture file in the run directory")?,
                    port.unwrap_or(c.net_conf()?.effective_port()),
                ),
                (None, Err(e)) => return Err(e),
            };
            let r = capture::verify_pcap(&path, port)?;
            println!("{}", path.display());
            println!("{r}");
            Ok(if r.all_checksums_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn main() -> ExitCode {
    // In a node's CNI bin dir, `flannel` is a symlink to this binary: flannel's meta-plugin.
    if netns_harness::cni::invoked_as_flannel_plugin() {
        return netns_harness::cni::flannel_plugin_main();
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("netns-harness: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
