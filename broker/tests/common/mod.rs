//! Starts the real `cairn-broker` binary on 127.0.0.1 with a temp data dir.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_client::{Admin, ConnectionConfig, ConsumerConfig, ProducerConfig};

/// A running broker process. Killed (SIGKILL) on drop if still running.
pub struct TestBroker {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl TestBroker {
    /// Starts a broker on `dir` with extra config lines (TOML) appended to a config file.
    pub fn start(dir: &Path, extra_toml: &str) -> TestBroker {
        Self::start_on(dir, extra_toml, "127.0.0.1:0")
    }

    /// Starts a broker listening on a given address (to restart on the same port).
    pub fn start_on(dir: &Path, extra_toml: &str, listen: &str) -> TestBroker {
        Self::start_with_data(dir, &dir.join("data"), extra_toml, listen)
    }

    /// Starts a broker whose data directory is `data` (config and log stay in `dir`).
    pub fn start_with_data(dir: &Path, data: &Path, extra_toml: &str, listen: &str) -> TestBroker {
        let data = data.to_owned();
        let config = dir.join("cairn.toml");
        std::fs::write(&config, extra_toml).unwrap();
        let log = dir.join(format!(
            "broker-{}.log",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-broker"))
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg(listen)
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start cairn-broker");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let words: Vec<&str> = line.split_whitespace().collect();
        let parsed = (words.len() >= 7).then(|| (words[3].parse::<SocketAddr>(), words[6].parse::<SocketAddr>()));
        let Some((Ok(addr), Ok(metrics))) = parsed else {
            // Never leave a broker running behind a test that failed to start it.
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "broker did not start (first line {line:?}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        TestBroker { child: Some(child), addr, metrics, dir: dir.to_owned(), log }
    }

    pub fn connection(&self) -> ConnectionConfig {
        ConnectionConfig {
            broker: self.addr.to_string(),
            request_timeout: Duration::from_secs(20),
            ..ConnectionConfig::default()
        }
    }

    pub fn producer_config(&self) -> ProducerConfig {
        ProducerConfig { connection: self.connection(), ..ProducerConfig::default() }
    }

    pub fn consumer_config(&self) -> ConsumerConfig {
        ConsumerConfig { connection: self.connection(), ..ConsumerConfig::default() }
    }

    pub async fn admin(&self) -> Admin {
        Admin::connect(self.connection()).await.unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("broker did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush or checkpoint.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Resident memory of the broker process in bytes.
    pub fn rss_bytes(&self) -> u64 {
        self.proc_status_bytes("VmRSS:")
    }

    /// The most resident memory the broker process has had, in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        self.proc_status_bytes("VmHWM:")
    }

    fn proc_status_bytes(&self, field: &str) -> u64 {
        let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// GET a path on the metrics listener; returns (status line, body).
    pub fn http_get(&self, path: &str) -> (String, String) {
        http_get(self.metrics, path)
    }

    /// The value of one series on the metrics endpoint, named exactly as exported (labels
    /// included, e.g. `cairn_requests_total{api="fetch",result="ok"}`); `None` if absent.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// A minimal HTTP/1.1 GET; returns (status line, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (head.lines().next().unwrap_or("").to_owned(), body.to_owned())
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs an async test body on a fresh runtime with an overall time limit.
pub fn run<F: std::future::Future<Output = ()>>(limit: Duration, f: F) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        tokio::time::timeout(limit, f).await.expect("test exceeded its time limit");
    });
}

/// Path of a binary of another workspace package, building it if this test run did not.
pub fn sibling_bin(package: &str, name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_cairn-broker")).with_file_name(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status =
            Command::new(cargo).args(["build", "-p", package, "--bin", name]).status().expect("run cargo build");
        assert!(status.success(), "building {name} failed");
    }
    path
}

/// Sends SIGSTOP or SIGCONT to the broker.
pub fn signal(broker: &TestBroker, sig: &str) {
    let pid = broker.child.as_ref().expect("running").id();
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap().success();
    assert!(ok, "kill -{sig} failed");
}
