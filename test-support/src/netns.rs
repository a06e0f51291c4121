//! A network namespace for one test: unique name (`frs-<pid>-<tag>-<n>`), loopback up,
//! deleted on drop (also on panic).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::run;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Runs `ip`/`bridge` commands in a namespace by name; cheap to clone into closures and
/// threads.
#[derive(Debug, Clone)]
pub struct Ns {
    /// The namespace's name (`ip netns`).
    pub name: String,
}

impl Ns {
    /// `ip -n <ns> <args>`; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend_from_slice(args);
        run("ip", &v)
    }

    /// `bridge -n <ns> <args>`; panics on failure.
    pub fn bridge(&self, args: &[&str]) -> String {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend_from_slice(args);
        run("bridge", &v)
    }

    /// `ip netns exec <ns> <cmd…>`; panics on failure.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut v = vec!["netns", "exec", self.name.as_str()];
        v.extend_from_slice(cmd);
        run("ip", &v)
    }

    /// [`Ns::ip`] with the arguments as one whitespace-separated line.
    pub fn ip_line(&self, line: &str) -> String {
        self.ip(&line.split_whitespace().collect::<Vec<_>>())
    }

    /// [`Ns::bridge`] with the arguments as one line.
    pub fn bridge_line(&self, line: &str) -> String {
        self.bridge(&line.split_whitespace().collect::<Vec<_>>())
    }

    /// [`Ns::exec`] with the command as one line.
    pub fn exec_line(&self, line: &str) -> String {
        self.exec(&line.split_whitespace().collect::<Vec<_>>())
    }
}

/// A network namespace deleted on drop; derefs to its [`Ns`] command helpers.
#[derive(Debug)]
pub struct Netns {
    ns: Ns,
}

impl std::ops::Deref for Netns {
    type Target = Ns;
    fn deref(&self) -> &Ns {
        &self.ns
    }
}

impl Netns {
    /// Creates the namespace; `tag` makes its name readable.
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("frs-{}-{tag}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = Netns { ns: Ns { name } };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `/var/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// A command handle to move into a closure.
    pub fn handle(&self) -> Ns {
        self.ns.clone()
    }

    /// Runs `f` on a thread that entered the namespace (child processes inherit it).
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = self.path();
        let h = std::thread::spawn(move || {
            flannel_rs::io::netns::enter(&path).expect("setns");
            f()
        });
        match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// Runs an async body on a thread that entered the namespace, with its own
    /// current-thread runtime (namespaces are per thread: never on a shared worker).
    pub fn run_async<F, Fut, R>(&self, f: F) -> R
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = R>,
        R: Send + 'static,
    {
        self.run(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f())
        })
    }

    /// [`Netns::run_async`] with the namespace's command helpers handed to the body.
    pub fn run_async_with<F, Fut, R>(&self, f: F) -> R
    where
        F: FnOnce(Ns) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = R>,
        R: Send + 'static,
    {
        let ns = self.handle();
        self.run_async(move || f(ns))
    }

    /// Underlay: veth `ul0` (peer `ul1`, both up, in this namespace) 198.18.0.1/24 and
    /// 2001:db8:18::1/64, MTU 1500, with a default route via 198.18.0.254.
    pub fn with_underlay(self) -> Self {
        self.ip_line("link add ul0 type veth peer name ul1");
        self.ip(&["link", "set", "ul1", "up"]);
        self.ip_line("addr add 198.18.0.1/24 dev ul0");
        self.ip_line("addr add 2001:db8:18::1/64 dev ul0 nodad");
        self.ip(&["link", "set", "ul0", "up"]);
        self.ip_line("route add default via 198.18.0.254");
        self
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns.name])
            .status();
    }
}
