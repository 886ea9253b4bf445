//! In-process storage benchmarks (no network): the figures recorded in BENCHMARKS.md.
//!
//! ```text
//! cargo run --release -p cairn-broker --example storage_bench [-- DIR]
//! ```
//!
//! DIR (default: a temp dir) should be on the disk you care about. Prints a markdown table.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_broker::storage::{system_clock, LogStore, StorageConfig, StorageError};
use cairn_protocol::RecordBatchBuilder;

fn batch(records: usize, value: &[u8]) -> bytes::Bytes {
    let mut b = RecordBatchBuilder::with_capacity(records * (value.len() + 16) + 64);
    for _ in 0..records {
        b.push(1_700_000_000_000, None, Some(value), &[]);
    }
    b.build()
}

fn config() -> StorageConfig {
    StorageConfig { disk_free_bytes_min: 0, retention_ms: -1, ..StorageConfig::default() }
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q) as usize] as f64
}

fn row(name: &str, result: String) {
    println!("| {name} | {result} |");
}

fn main() -> Result<(), StorageError> {
    let tmp = tempfile::tempdir().map_err(|e| StorageError::io("tempdir", "/tmp", e))?;
    let root = std::env::args().nth(1).map(std::path::PathBuf::from).unwrap_or_else(|| tmp.path().to_owned());
    println!("| benchmark | result |\n|---|---|");

    // 1 + 2 + 3: append, sequential read, random reads on a log of 10+ segments.
    let dir = root.join("append");
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = StorageConfig { segment_bytes: 16 * 1024 * 1024, ..config() };
    let (store, _) = LogStore::open(&dir, cfg, system_clock())?;
    let t = store.create_topic("bench", 1, store.config().topic_defaults())?;
    let p = Arc::clone(&t.partitions[0]);
    let one = batch(1000, &[b'v'; 100]);
    let batches = 2000;
    let started = Instant::now();
    for _ in 0..batches {
        p.append(&one)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let records = (batches * 1000) as f64;
    row(
        "append 1,000-record batches of 100 B values, no sync",
        format!("{:.1} M records/s, {:.0} MB/s", records / secs / 1e6, (batches * one.len()) as f64 / secs / 1e6),
    );
    let started = Instant::now();
    let (mut next, mut bytes) = (0u64, 0usize);
    while next < p.log_end_offset() {
        let r = p.read(next, 1 << 20)?;
        for c in &r.chunks {
            bytes += c.len();
        }
        // Batches are whole: the last one's next offset is where to continue.
        let last = r.chunks.last().expect("data");
        let mut pos = 0;
        let mut last_next = next;
        while pos + 61 <= last.len() {
            let base = u64::from_be_bytes(last[pos..pos + 8].try_into().expect("8"));
            let len = u32::from_be_bytes(last[pos + 8..pos + 12].try_into().expect("4")) as usize + 12;
            let delta = u32::from_be_bytes(last[pos + 23..pos + 27].try_into().expect("4")) as u64;
            last_next = base + delta + 1;
            pos += len;
        }
        next = last_next;
    }
    let secs = started.elapsed().as_secs_f64();
    row(
        "sequential read of the same (1 MiB reads, zero-copy)",
        format!("{:.1} M records/s, {:.2} GB/s", records / secs / 1e6, bytes as f64 / secs / 1e9),
    );
    let segments = p.segment_count();
    let mut lat = Vec::with_capacity(100_000);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = x % p.log_end_offset();
        let t0 = Instant::now();
        let r = p.read(offset, 1)?;
        lat.push(t0.elapsed().as_nanos() as u64);
        assert!(!r.is_empty());
    }
    lat.sort_unstable();
    row(
        &format!("random reads by offset, {segments} segments (100,000 reads)"),
        format!("p50 {:.1} µs, p99 {:.1} µs", percentile(&lat, 0.5) / 1e3, percentile(&lat, 0.99) / 1e3),
    );
    store.close()?;
    drop(p);
    drop(t);
    drop(store);

    // 4: reopen after a clean shutdown with 1,000 segments.
    let dir = root.join("segments");
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = StorageConfig { segment_bytes: 16 * 1024, batch_bytes_max: 8 * 1024, ..config() };
    {
        let (store, _) = LogStore::open(&dir, cfg.clone(), system_clock())?;
        let p = Arc::clone(&store.create_topic("seg", 1, store.config().topic_defaults())?.partitions[0]);
        let small = batch(10, &[b's'; 700]);
        while p.segment_count() < 1000 {
            p.append(&small)?;
        }
        store.close()?;
    }
    let started = Instant::now();
    let (store, report) = LogStore::open(&dir, cfg.clone(), system_clock())?;
    let took = started.elapsed();
    row(
        "reopen after clean shutdown, 1,000 segments",
        format!("{:.1} ms (scanned segments: {})", took.as_secs_f64() * 1e3, report.scanned_segments),
    );
    drop(store);

    // 5: recovery after an unclean stop, by unsynced bytes.
    for mib in [16u64, 64, 256] {
        let dir = root.join(format!("crash-{mib}"));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = StorageConfig { segment_bytes: 64 * 1024 * 1024, ..config() };
        {
            let (store, _) = LogStore::open(&dir, cfg.clone(), system_clock())?;
            let mut topic = store.config().topic_defaults();
            topic.flush_interval_ms = 3_600_000;
            let p = Arc::clone(&store.create_topic("c", 1, topic)?.partitions[0]);
            // A synced prefix (1,000 segments' worth would be the same: they are not scanned).
            for _ in 0..100 {
                p.append(&one)?;
            }
            p.sync()?;
            std::thread::sleep(Duration::from_millis(5200)); // let a checkpoint record the sync
            let mut written = 0u64;
            while written < mib << 20 {
                written += p.append(&one).map(|_| one.len() as u64)?;
            }
            // Dropped without close(): as after kill -9.
        }
        let started = Instant::now();
        let (store, report) = LogStore::open(&dir, cfg, system_clock())?;
        row(
            &format!("recovery after kill -9 with {mib} MiB unsynced"),
            format!(
                "{:.0} ms ({} segments scanned, {:.0} MB/s)",
                started.elapsed().as_secs_f64() * 1e3,
                report.scanned_segments,
                (mib << 20) as f64 / started.elapsed().as_secs_f64() / 1e6
            ),
        );
        drop(store);
    }

    // 6: durable appends from 16 threads (one partition each), group-committed.
    let dir = root.join("durable");
    let _ = std::fs::remove_dir_all(&dir);
    let (store, _) = LogStore::open(&dir, config(), system_clock())?;
    let store = Arc::new(store);
    let topic = store.create_topic("d", 16, store.config().topic_defaults())?;
    let kib = batch(64, &[b'd'; 1000]);
    let done_bytes = Arc::new(AtomicI64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (store, p, kib, done_bytes) =
                (Arc::clone(&store), Arc::clone(&topic.partitions[i]), kib.clone(), Arc::clone(&done_bytes));
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                for _ in 0..200 {
                    let t0 = Instant::now();
                    let info = p.append(&kib).expect("append");
                    let (tx, rx) = std::sync::mpsc::channel();
                    store.sync_async(
                        Arc::clone(&p),
                        info.next_offset,
                        Box::new(move |r| tx.send(r.is_ok()).unwrap_or(())),
                    );
                    assert!(rx.recv().unwrap_or(false), "sync failed");
                    lat.push(t0.elapsed().as_nanos() as u64);
                    done_bytes.fetch_add(kib.len() as i64, Ordering::Relaxed);
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<u64> = threads.into_iter().flat_map(|t| t.join().expect("thread")).collect();
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    row(
        "durable appends (fdatasync before ack), 16 threads, 64 KiB batches",
        format!(
            "{:.0} MB/s, p50 {:.2} ms, p99 {:.2} ms",
            done_bytes.load(Ordering::Relaxed) as f64 / secs / 1e6,
            percentile(&lat, 0.5) / 1e6,
            percentile(&lat, 0.99) / 1e6
        ),
    );
    fio(&root);
    Ok(())
}

/// The same disk measured by fio, if installed: sequential 64 KiB writes with fdatasync each.
fn fio(root: &Path) {
    let out = std::process::Command::new("fio")
        .args(["--name=seq", "--rw=write", "--bs=64k", "--size=256m", "--fdatasync=1", "--output-format=terse"])
        .arg(format!("--directory={}", root.display()))
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            // Terse v3: field 48 is write bandwidth in KiB/s.
            let bw = text.lines().last().and_then(|l| l.split(';').nth(47)).and_then(|v| v.parse::<f64>().ok());
            match bw {
                Some(kib) => {
                    row("fio --rw=write --bs=64k --fdatasync=1 (same disk)", format!("{:.0} MB/s", kib * 1024.0 / 1e6))
                }
                None => row("fio", "could not parse fio output".into()),
            }
        }
        _ => row("fio", "not installed (apt-get install fio)".into()),
    }
}
