//! Metrics checked by a real Prometheus: needs the `prometheus` and `promtool` binaries (Debian
//! package `prometheus`), so these tests are ignored by default; `.ci/run` installs Prometheus
//! and runs them with `cargo test -p cairn-broker --test observability -- --ignored`.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_client::{Consumer, ConsumerConfig, NewTopic, Offset, Producer, ProducerRecord};
use common::{http_get, run, TestBroker};

struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn start_prometheus(dir: &std::path::Path, target: SocketAddr) -> Prometheus {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: cairn\n    static_configs:\n      - targets: ['{target}']\n"),
    )
    .unwrap();
    let addr = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus is installed (apt-get install prometheus)");
    let p = Prometheus { child, addr };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::net::TcpStream::connect(addr).is_ok() && http_get(addr, "/-/ready").0.contains("200") {
            return p;
        }
        assert!(Instant::now() < deadline, "prometheus did not become ready");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Instant query; returns label set -> value.
fn query(p: &Prometheus, q: &str) -> BTreeMap<String, f64> {
    let (status, body) = http_get(p.addr, &format!("/api/v1/query?query={}", encode(q)));
    assert!(status.contains("200"), "{status} {body}");
    let body = body.trim();
    // Tolerate chunked encoding: the JSON object starts at the first '{'.
    let json = &body[body.find('{').unwrap()..=body.rfind('}').unwrap()];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["metric"].to_string(), r["value"][1].as_str().unwrap().parse::<f64>().unwrap()))
        .collect()
}

fn wait_for(p: &Prometheus, q: &str, ok: impl Fn(&BTreeMap<String, f64>) -> bool) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = query(p, q);
        if ok(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "{q} never satisfied the check; last {r:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
#[ignore = "needs prometheus and promtool; run by .ci/run"]
fn prometheus_scrapes_lag_and_produce_rate_and_promtool_accepts_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("obs", 2)).await.unwrap();
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        for i in 0..1000u32 {
            producer.send(ProducerRecord::new("obs", format!("{i}")).partition(i % 2)).await.unwrap();
        }
        producer.flush().await.unwrap();
        // A group consumes everything, then commits 400 of partition 0 and 100 of partition 1.
        let mut c = Consumer::connect(ConsumerConfig { group: Some("watchers".into()), ..broker.consumer_config() })
            .await
            .unwrap();
        c.assign("obs", None).await.unwrap();
        c.seek_all(Offset::Earliest);
        let mut n = 0;
        while n < 1000 {
            n += c.poll(Duration::from_secs(2)).await.unwrap().len();
        }
        let offsets = BTreeMap::from([(("obs".to_string(), 0), 400), (("obs".to_string(), 1), 100)]);
        c.commit_offsets(&offsets).await.unwrap();
        producer.close().await.unwrap();
    });
    // promtool lints the real exposition.
    let (_, metrics) = broker.http_get("/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let prom = start_prometheus(dir.path(), broker.metrics);
    let lag = wait_for(&prom, "cairn_consumer_group_lag{group=\"watchers\"}", |r| r.len() == 2);
    let mut values: Vec<f64> = lag.values().copied().collect();
    values.sort_by(f64::total_cmp);
    assert_eq!(values, vec![100.0, 400.0], "lag = end - committed: 500-400 and 500-100: {lag:?}");
    // Keep producing while Prometheus scrapes, so the rate has two samples to work with.
    run(Duration::from_secs(60), async {
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        for round in 0..8u32 {
            for i in 0..100u32 {
                producer.send(ProducerRecord::new("obs", format!("{round}-{i}"))).await.unwrap();
            }
            producer.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        producer.close().await.unwrap();
    });
    wait_for(&prom, "cairn_produce_records_total{topic=\"obs\"}", |r| r.values().any(|v| *v == 1800.0));
    let rate =
        wait_for(&prom, "rate(cairn_produce_records_total{topic=\"obs\"}[1m])", |r| r.values().any(|v| *v > 0.0));
    let rate = rate.values().next().copied().unwrap();
    assert!(rate > 0.0 && rate <= 1800.0, "rate {rate}");
    // The request histogram has the documented buckets and labels.
    let buckets = query(&prom, "cairn_request_duration_seconds_bucket{api=\"produce\",le=\"0.00005\"}");
    assert_eq!(buckets.len(), 1, "{buckets:?}");
}
