//! `test-apiserver --listen 127.0.0.1:PORT [--state FILE]`: the test API server as a process,
//! for harnesses. Prints `listening on http://ADDR` once ready; stops on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use test_apiserver::TestApiServer;

const USAGE: &str = "usage: test-apiserver --listen 127.0.0.1:PORT [--state FILE]";

fn parse_args(args: &[String]) -> Result<(SocketAddr, Option<PathBuf>), String> {
    let mut listen = None;
    let mut state = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_owned())),
            None => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag {
            "--listen" => {
                let v = value()?;
                listen = Some(
                    v.parse::<SocketAddr>()
                        .map_err(|e| format!("--listen {v:?}: {e}"))?,
                );
            }
            "--state" => state = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let listen = listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?;
    Ok((listen, state))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, state) = match parse_args(&args) {
        Ok(v) => v,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let server = match &state {
        Some(path) => TestApiServer::start_with_state_file(listen, path).await,
        None => TestApiServer::start_on(listen).await,
    };
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            eprintln!("test-apiserver: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening on {}", server.url());
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("test-apiserver: SIGTERM handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(server);
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn arguments() {
        let (l, s) = parse_args(&args(&["--listen", "127.0.0.1:8080"])).expect("ok");
        assert_eq!(l.port(), 8080);
        assert_eq!(s, None);
        let (_, s) =
            parse_args(&args(&["--listen=127.0.0.1:1", "--state", "/tmp/x.json"])).expect("ok");
        assert_eq!(s, Some(PathBuf::from("/tmp/x.json")));
        assert!(parse_args(&args(&[])).is_err());
        assert!(parse_args(&args(&["--listen", "nope"])).is_err());
        assert!(parse_args(&args(&["--bogus"])).is_err());
    }
}
