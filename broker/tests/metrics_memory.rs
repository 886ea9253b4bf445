//! The metrics recorder's memory stays bounded without scrapes. Its own test binary: it
//! measures the resident memory of the process.

use std::time::Duration;

/// Resident memory of this process, in bytes.
fn rss() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: i64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Two million request latencies (eight bytes each if kept) recorded while nobody scrapes: the
/// upkeep task folds them into buckets, so memory does not grow with them.
#[test]
fn request_latencies_do_not_pile_up_in_memory_between_scrapes() {
    let recorder = cairn_broker::metrics::builder().unwrap().build_recorder();
    let handle = recorder.handle();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    runtime.spawn(cairn_broker::metrics::keep_up(handle.clone(), Duration::from_millis(10), shutdown.clone()));
    let before = rss();
    metrics::with_local_recorder(&recorder, || {
        let latency = metrics::histogram!("cairn_request_duration_seconds", "api" => "Produce");
        for _ in 0..40 {
            for _ in 0..50_000 {
                latency.record(0.0004);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let grown = rss() - before;
    shutdown.cancel();
    assert!(grown < 4 << 20, "the recorder grew by {grown} bytes for 2,000,000 samples");
    let page = handle.render();
    let count: u64 = page
        .lines()
        .find_map(|l| l.strip_prefix("cairn_request_duration_seconds_count{api=\"Produce\"} "))
        .expect("the latency series")
        .parse()
        .unwrap();
    // Folding while samples are recorded may drop one now and then (the exporter's buckets are
    // lock-free); the samples are counted, not kept.
    assert!(count > 1_990_000, "{count} of 2,000,000 samples counted");
}
