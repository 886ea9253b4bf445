//! Storage engine tests: no runtime, no sockets.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use cairn_protocol::record_batch::{BatchSplitter, RecordBatchBuilder};
use cairn_protocol::Header;
use proptest::prelude::*;

use super::*;

fn batch(first_value: u64, count: usize, value_len: usize, ts: i64) -> Bytes {
    let mut b = RecordBatchBuilder::new();
    for i in 0..count {
        let v = format!("{:0width$}", first_value + i as u64, width = value_len.max(8));
        b.push(ts + i as i64, Some(format!("k{}", (first_value + i as u64) % 7).as_bytes()), Some(v.as_bytes()), &[]);
    }
    b.build()
}

fn small_config() -> StorageConfig {
    StorageConfig {
        segment_bytes: 16 * 1024,
        index_interval_bytes: 512,
        batch_bytes_max: 8 * 1024,
        disk_free_bytes_min: 0,
        preallocate_bytes_min: 4096,
        preallocate_bytes_max: 8192,
        ..StorageConfig::default()
    }
}

struct TestClock(Arc<AtomicI64>);

impl TestClock {
    fn new(start: i64) -> (TestClock, Clock) {
        let t = Arc::new(AtomicI64::new(start));
        let c = Arc::clone(&t);
        (TestClock(t), Arc::new(move || c.load(Ordering::Relaxed)))
    }
    fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

fn open(dir: &Path, config: StorageConfig) -> (LogStore, RecoveryReport) {
    LogStore::open(dir, config, system_clock()).unwrap()
}

/// Reads every record of a partition from `from`, returning (offset, value).
fn read_all(p: &PartitionLog, from: u64) -> Vec<(u64, Bytes)> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let r = p.read(next, 4096).unwrap();
        if r.is_empty() {
            return out;
        }
        for chunk in r.chunks {
            for b in BatchSplitter::new(chunk) {
                for rec in b.unwrap().records() {
                    let rec = rec.unwrap();
                    if rec.offset as u64 >= next {
                        out.push((rec.offset as u64, rec.value.unwrap()));
                    }
                }
            }
        }
        next = out.last().map_or(next, |(o, _)| o + 1);
    }
}

#[test]
fn appends_get_dense_offsets_and_read_back_across_segment_rolls() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), small_config());
    let t = store.create_topic("t", 1, store.config().topic_defaults()).unwrap();
    let p = &t.partitions[0];
    let mut next = 0;
    for i in 0..200u64 {
        let info = p.append(&batch(next, 5, 40, 1000 + i as i64)).unwrap();
        assert_eq!(info.base_offset, next);
        next = info.next_offset;
    }
    assert_eq!(p.log_end_offset(), 1000);
    assert!(p.segment_count() >= 4, "16 KiB segments must roll: {}", p.segment_count());
    let all = read_all(p, 0);
    assert_eq!(all.len(), 1000);
    for (i, (o, v)) in all.iter().enumerate() {
        assert_eq!(*o, i as u64);
        assert_eq!(&v[..], format!("{:040}", i).as_bytes());
    }
    // An offset inside a batch returns that batch.
    let r = p.read(502, 1).unwrap();
    let b = BatchSplitter::new(r.chunks[0].clone()).next().unwrap().unwrap();
    assert_eq!(b.header().base_offset, 500);
}

#[test]
fn reading_below_log_start_or_past_the_end_returns_offset_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), small_config());
    let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
    p.append(&batch(0, 3, 10, 1)).unwrap();
    assert!(p.read(3, 100).unwrap().is_empty(), "reading at the end is empty, not an error");
    match p.read(4, 100) {
        Err(StorageError::OffsetOutOfRange { log_start: 0, log_end: 3, .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn corrupt_and_oversized_batches_are_rejected_and_nothing_is_appended() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), small_config());
    let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
    let mut bad = batch(0, 2, 10, 1).to_vec();
    let n = bad.len();
    bad[n - 1] ^= 0xff;
    assert!(matches!(p.append(&bad), Err(StorageError::InvalidBatch(_))));
    assert!(matches!(p.append(&batch(0, 100, 100, 1)), Err(StorageError::InvalidBatch(_))), "over 8 KiB");
    assert_eq!(p.log_end_offset(), 0);
    p.append(&batch(0, 2, 10, 1)).unwrap();
    assert_eq!(read_all(&p, 0).len(), 2);
}

#[test]
fn a_clean_reopen_needs_no_scan_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path(), small_config());
        let p = store.create_topic("t", 2, store.config().topic_defaults()).unwrap().partitions[1].clone();
        for i in 0..100 {
            p.append(&batch(i * 3, 3, 30, 1)).unwrap();
        }
        store.close().unwrap();
    }
    let (store, report) = open(dir.path(), small_config());
    assert!(report.clean);
    assert_eq!(report.scanned_segments, 0, "{report:?}");
    let p = store.partition("t", 1).unwrap();
    assert_eq!(p.log_end_offset(), 300);
    assert_eq!(read_all(&p, 0).len(), 300);
    let info = p.append(&batch(300, 3, 30, 1)).unwrap();
    assert_eq!(info.base_offset, 300);
    assert_eq!(read_all(&p, 0).len(), 303);
}

#[test]
fn an_unclean_reopen_scans_and_keeps_every_complete_batch() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path(), small_config());
        let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
        for i in 0..50 {
            p.append(&batch(i * 2, 2, 20, 1)).unwrap();
        }
        drop(store); // no close(): as if killed
    }
    let (store, report) = open(dir.path(), small_config());
    assert!(!report.clean);
    assert!(report.scanned_segments >= 1);
    assert_eq!(report.truncated_bytes, 0);
    let p = store.partition("t", 0).unwrap();
    assert_eq!(p.log_end_offset(), 100);
    assert_eq!(read_all(&p, 0).len(), 100);
}

/// Segments written under a larger index budget are rebuilt under a smaller one (an operator
/// lowered `index_bytes_max` or `index_interval_bytes`, then the broker was killed): the index
/// gets sparser, and no acknowledged batch is cut as if it were damaged.
#[test]
fn a_scan_under_a_smaller_index_budget_keeps_every_batch() {
    let dir = tempfile::tempdir().unwrap();
    let appended = {
        let (store, _) = open(dir.path(), small_config());
        let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
        for i in 0..300 {
            p.append(&batch(i * 2, 2, 20, 1)).unwrap();
        }
        assert!(p.segment_count() >= 3, "{} segments", p.segment_count());
        drop(store); // no close(): as if killed
        600
    };
    std::fs::remove_file(dir.path().join(super::checkpoint::CHECKPOINT_FILE)).ok();
    let smaller = StorageConfig { index_interval_bytes: 16, index_bytes_max: 128, ..small_config() };
    let (store, report) = open(dir.path(), smaller);
    assert_eq!(report.truncated_bytes, 0, "{report:?}");
    let p = store.partition("t", 0).unwrap();
    assert_eq!(p.log_end_offset(), appended);
    let records = read_all(&p, 0);
    assert_eq!(records.len(), appended as usize);
    assert_eq!(read_all(&p, 555).first().map(|r| r.0), Some(555), "a lookup past the last index entry");
    // Appends go on (into a new segment once the active one's index is full).
    p.append(&batch(600, 2, 20, 1)).unwrap();
    assert_eq!(read_all(&p, 600).len(), 2);
}

fn active_log(dir: &Path) -> std::path::PathBuf {
    let mut logs: Vec<_> = std::fs::read_dir(dir.join("t-0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.pop().unwrap()
}

#[test]
fn cutting_the_last_batch_at_every_byte_keeps_every_earlier_batch() {
    let config = StorageConfig { segment_bytes: 1 << 20, ..small_config() };
    let template = tempfile::tempdir().unwrap();
    let (last_start, last_len) = {
        let (store, _) = open(template.path(), config.clone());
        let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
        for i in 0..4 {
            p.append(&batch(i * 2, 2, 20, 1)).unwrap();
        }
        let before = p.segments().last().unwrap().len();
        p.append(&batch(8, 3, 25, 1)).unwrap();
        let after = p.segments().last().unwrap().len();
        drop(store);
        (before, after - before)
    };
    let template_log = std::fs::read(active_log(template.path())).unwrap();
    for cut in 0..last_len {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        let mut data = template_log.clone();
        // Everything from the cut point on is lost (as zeros, like unwritten preallocated space).
        data[(last_start + cut) as usize..].fill(0);
        std::fs::write(active_log(dir.path()), &data).unwrap();
        let (store, report) = open(dir.path(), config.clone());
        let p = store.partition("t", 0).unwrap();
        // Zeroing bytes that were already zero (the batch's tail) leaves it intact.
        let lost = &template_log[(last_start + cut) as usize..(last_start + last_len) as usize];
        let want = if lost.iter().all(|b| *b == 0) { 11 } else { 8 };
        assert_eq!(p.log_end_offset(), want, "cut at byte {cut}");
        assert_eq!(read_all(&p, 0).len() as u64, want, "cut at byte {cut}");
        let torn_bytes_left = data[last_start as usize..(last_start + cut) as usize].iter().any(|b| *b != 0);
        assert_eq!(report.truncated_bytes > 0, torn_bytes_left && want == 8, "cut at byte {cut}: {report:?}");
        // The log accepts appends again at the cut.
        assert_eq!(p.append(&batch(want, 1, 10, 1)).unwrap().base_offset, want);
    }
}

#[test]
fn a_flipped_byte_in_the_tail_cuts_the_log_at_that_batch() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig { segment_bytes: 1 << 20, ..small_config() };
    let positions = {
        let (store, _) = open(dir.path(), config.clone());
        let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
        let mut positions = Vec::new();
        for i in 0..10 {
            positions.push(p.segments().last().unwrap().len());
            p.append(&batch(i * 2, 2, 20, 1)).unwrap();
        }
        positions
    };
    let log = active_log(dir.path());
    let mut data = std::fs::read(&log).unwrap();
    data[positions[6] as usize + 70] ^= 0x40;
    std::fs::write(&log, &data).unwrap();
    let (store, report) = open(dir.path(), config);
    let p = store.partition("t", 0).unwrap();
    assert_eq!(p.log_end_offset(), 12);
    assert!(report.truncated_bytes > 0);
    assert_eq!(read_all(&p, 0).len(), 12);
}

#[test]
fn bytes_after_the_last_batch_of_a_sealed_segment_do_not_cost_the_later_segments() {
    // A write that failed part-way leaves bytes past the segment's published end; a roll can
    // seal the segment before anything overwrites them, and a kill -9 before the seal's trim
    // leaves them in the file (with no time index, so recovery scans it).
    let dir = tempfile::tempdir().unwrap();
    let (first, end) = {
        let (store, _) = open(dir.path(), small_config());
        let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
        for i in 0..600 {
            p.append(&batch(i * 2, 2, 30, 1)).unwrap();
        }
        assert!(p.segments().len() >= 3, "the test needs sealed segments: {}", p.segments().len());
        let kept = (p.segments()[0].clone(), p.log_end_offset());
        store.close().unwrap();
        kept
    };
    let log = first.log_path().to_path_buf();
    let mut data = std::fs::read(&log).unwrap();
    data.truncate(first.len() as usize);
    data.extend_from_slice(&batch(9_999, 1, 30, 1)[..40]);
    std::fs::write(&log, &data).unwrap();
    std::fs::remove_file(log.with_extension("timeindex")).unwrap();
    let (store, report) = open(dir.path(), small_config());
    let p = store.partition("t", 0).unwrap();
    assert_eq!(p.log_end_offset(), end, "the later segments are kept");
    assert!(report.truncated_bytes > 0, "the leftover bytes are cut");
    let all = read_all(&p, 0);
    assert_eq!(all.len() as u64, end);
    assert!(all.iter().enumerate().all(|(i, (o, _))| *o == i as u64));
    assert_eq!(std::fs::metadata(&log).unwrap().len(), first.len(), "the cut is persisted");
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&e.path(), &target);
        } else if e.file_name() != ".lock" {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn damaged_index_files_are_rebuilt_and_reads_stay_correct() {
    for damage in ["delete", "truncate", "zero", "past_end"] {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = open(dir.path(), small_config());
            let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
            for i in 0..300 {
                p.append(&batch(i * 2, 2, 30, 1)).unwrap();
            }
            store.close().unwrap();
        }
        let index = dir.path().join("t-0").join(format!("{:020}.index", 0));
        match damage {
            "delete" => std::fs::remove_file(&index).unwrap(),
            "truncate" => {
                let l = std::fs::metadata(&index).unwrap().len();
                std::fs::OpenOptions::new().write(true).open(&index).unwrap().set_len(l - 3).unwrap();
            }
            "zero" => {
                let mut d = std::fs::read(&index).unwrap();
                d[16..].fill(0);
                std::fs::write(&index, d).unwrap();
            }
            _ => {
                let mut d = std::fs::read(&index).unwrap();
                let n = d.len();
                d[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
                std::fs::write(&index, d).unwrap();
            }
        }
        let (store, _) = open(dir.path(), small_config());
        let p = store.partition("t", 0).unwrap();
        let all = read_all(&p, 0);
        assert_eq!(all.len(), 600, "{damage}");
        assert!(all.iter().enumerate().all(|(i, (o, _))| *o == i as u64), "{damage}");
        let (o, _) = read_all(&p, 37)[0].clone();
        assert_eq!(o, 37, "{damage}");
    }
}

#[test]
fn retention_deletes_old_segments_by_time_and_size_and_moves_the_log_start() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, c) = TestClock::new(1_000_000);
    let (store, _) = LogStore::open(dir.path(), small_config(), c).unwrap();
    let mut cfg = store.config().topic_defaults();
    cfg.retention_ms = std::num::NonZeroU64::new(10_000);
    let p = store.create_topic("t", 1, cfg).unwrap().partitions[0].clone();
    for i in 0..200u64 {
        p.append(&batch(i * 5, 5, 40, 1_000_000 + i as i64 * 100)).unwrap();
        p.sync().unwrap(); // finishes seals so retention may delete them
    }
    let segments = p.segment_count();
    assert_eq!(store.apply_retention().segments, 0, "nothing is old yet");
    clock.set(1_000_000 + 100 * 100 + 10_001);
    let out = store.apply_retention();
    assert!(out.segments > 0 && out.segments < segments, "{out:?} of {segments}");
    let start = p.log_start_offset();
    assert!(start > 0);
    assert!(matches!(p.read(start - 1, 100), Err(StorageError::OffsetOutOfRange { .. })));
    assert_eq!(read_all(&p, start).len() as u64, 1000 - start);
    // Everything old: all sealed segments go, the active one is rolled for next time.
    clock.set(10_000_000);
    store.apply_retention();
    p.sync().unwrap();
    store.apply_retention();
    assert_eq!(p.log_start_offset(), p.log_end_offset());
    assert_eq!(p.size_bytes(), 0);
    let info = p.append(&batch(0, 1, 10, 10_000_000)).unwrap();
    assert_eq!(info.base_offset, 1000);

    let mut by_size = store.config().topic_defaults();
    by_size.retention_bytes = std::num::NonZeroU64::new(40 * 1024);
    let q = store.create_topic("s", 1, by_size).unwrap().partitions[0].clone();
    for i in 0..400u64 {
        q.append(&batch(i * 5, 5, 40, 1)).unwrap();
    }
    q.sync().unwrap();
    store.apply_retention();
    assert!(q.size_bytes() <= 40 * 1024 + 16 * 1024, "{}", q.size_bytes());
    assert!(q.log_start_offset() > 0);
}

/// A roll preallocates the new segment: free space is read again right after, so that the
/// next append anywhere is held to the floor, not only after the next periodic refresh.
#[test]
fn free_space_is_read_again_after_a_roll() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig { disk_free_bytes_min: 1 << 20, ..small_config() };
    let (store, _) = open(dir.path(), config);
    let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
    p.append(&batch(0, 2, 10, 1)).unwrap();
    // The disk fills up (the cached figure is not refreshed yet), and the partition rolls.
    store.disk().override_free.store(1000, Ordering::Relaxed);
    p.roll_now().unwrap();
    assert!(matches!(p.append(&batch(2, 2, 10, 1)), Err(StorageError::StorageFull { .. })));
}

#[test]
fn below_the_free_space_floor_appends_fail_with_storage_full_and_reads_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig { disk_free_bytes_min: 1 << 20, ..small_config() };
    let (store, _) = open(dir.path(), config);
    let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
    p.append(&batch(0, 2, 10, 1)).unwrap();
    store.disk().set_free_bytes_override(Some(1000));
    assert!(matches!(p.append(&batch(2, 2, 10, 1)), Err(StorageError::StorageFull { .. })));
    assert_eq!(read_all(&p, 0).len(), 2);
    store.disk().set_free_bytes_override(None);
    assert_eq!(p.append(&batch(2, 2, 10, 1)).unwrap().base_offset, 2);
}

#[test]
fn lookup_by_timestamp_finds_the_first_record_at_or_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), small_config());
    let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
    for i in 0..300u64 {
        // Records i*3.. get timestamps 10*(i*3+j).
        p.append(&batch(i * 3, 3, 30, 10 * (i as i64 * 3))).unwrap();
    }
    assert_eq!(p.offset_for_timestamp(0).unwrap(), Some((0, 0)));
    // Each batch's records have timestamps ts, ts+1, ts+2 (builder adds i).
    assert_eq!(p.offset_for_timestamp(301).unwrap(), Some((31, 301)));
    assert_eq!(p.offset_for_timestamp(303).unwrap(), Some((33, 330)));
    assert_eq!(p.offset_for_timestamp(5_000).unwrap(), Some((501, 5010)));
    assert_eq!(p.offset_for_timestamp(1_000_000).unwrap(), None);
}

#[test]
fn many_partitions_stay_within_the_mapped_segment_budget() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig { open_segments_max: 64, ..small_config() };
    let (store, _) = open(dir.path(), config);
    store.create_topic("t", 500, store.config().topic_defaults()).unwrap();
    let mapped = |s: &LogStore| -> usize {
        s.topics().iter().flat_map(|t| t.partitions.iter()).map(|p| p.mapped_segments().len()).sum()
    };
    assert!(mapped(&store) <= 64, "{}", mapped(&store));
    // Evicted partitions reopen lazily for appends and reads.
    for i in 0..500 {
        let p = store.partition("t", i).unwrap();
        p.append(&batch(0, 1, 10, 1)).unwrap();
    }
    store.enforce_segment_budget();
    assert!(mapped(&store) <= 64);
    for i in (0..500).step_by(50) {
        assert_eq!(read_all(&store.partition("t", i).unwrap(), 0).len(), 1);
    }
}

#[test]
fn topics_survive_a_restart_and_deletion_removes_data() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path(), small_config());
        store.create_topic("keep", 2, store.config().topic_defaults()).unwrap();
        store.create_topic("drop", 1, store.config().topic_defaults()).unwrap();
        assert!(matches!(
            store.create_topic("keep", 1, store.config().topic_defaults()),
            Err(StorageError::TopicExists(_))
        ));
        assert!(matches!(
            store.create_topic("a/b", 1, store.config().topic_defaults()),
            Err(StorageError::InvalidTopicName(_))
        ));
        store.delete_topic("drop").unwrap();
        assert!(!dir.path().join("drop-0").exists());
        store.close().unwrap();
    }
    let (store, _) = open(dir.path(), small_config());
    let names: Vec<_> = store.topics().iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, vec!["keep".to_string()]);
    assert_eq!(store.topic("keep").unwrap().partitions.len(), 2);
}

/// A produce or fetch that looked its partition up just before the topic was deleted hears that
/// the topic is gone (not a storage fault, which pages an operator), and the write cannot land
/// in a file of the deleted partition.
#[test]
fn a_partition_used_after_its_topic_was_deleted_reports_an_unknown_topic() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), small_config());
    store.create_topic("gone", 1, store.config().topic_defaults()).unwrap();
    let p = store.partition("gone", 0).unwrap();
    p.append(&batch(0, 3, 10, 1)).unwrap();
    store.delete_topic("gone").unwrap();
    assert!(matches!(p.append(&batch(3, 1, 10, 1)), Err(StorageError::UnknownTopic(_))));
    assert!(matches!(p.read(0, 1 << 20), Err(StorageError::UnknownTopic(_))));
    assert!(matches!(p.sync(), Err(StorageError::UnknownTopic(_))));
    assert!(!dir.path().join("gone-0").exists(), "nothing written back after the delete");
}

/// A sync under way works on the partition's files by path after it lets appends go on, so a
/// deletion must wait for it: otherwise a topic deleted and created again under it could have its
/// new segment cut to the old one's length (durably) and stale index files written beside it.
#[test]
fn deleting_a_topic_waits_for_a_sync_under_way_on_its_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), small_config());
    store.create_topic("t", 1, store.config().topic_defaults()).unwrap();
    let p = store.partition("t", 0).unwrap();
    p.append(&batch(0, 3, 10, 1)).unwrap();
    let deleted = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let syncing = p.hold_syncs(); // a sync in the middle of its file work
        let deleter = s.spawn(|| {
            store.delete_topic("t").unwrap();
            deleted.store(true, Ordering::Release);
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        let early = deleted.load(Ordering::Acquire);
        drop(syncing);
        deleter.join().unwrap();
        assert!(!early, "the topic was deleted while a sync of it was under way");
    });
    assert!(!dir.path().join("t-0").exists());
}

/// Deleting segment files and syncing the directory can take a slow disk hundreds of
/// milliseconds; appends to the partition must not wait for it.
#[test]
fn appends_go_on_while_retention_deletes_files() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), small_config());
    let mut cfg = store.config().topic_defaults();
    cfg.retention_bytes = std::num::NonZeroU64::new(8 * 1024);
    let p = store.create_topic("t", 1, cfg).unwrap().partitions[0].clone();
    for i in 0..40u64 {
        p.append(&batch(i * 5, 5, 200, 1)).unwrap();
    }
    p.sync().unwrap();
    let writer = Arc::clone(&p);
    let (tx, rx) = std::sync::mpsc::channel();
    *store.inner.shared.while_deleting_segments.lock().unwrap() = Some(Box::new(move || {
        let appended = std::thread::spawn(move || tx.send(writer.append(&batch(200, 1, 10, 1)).is_ok()).unwrap());
        // Deleting stays "slow" until the append is through, or for 5 s at most.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !appended.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }));
    assert!(p.apply_retention(store.inner.shared.now_ms()).unwrap().segments > 0);
    assert_eq!(rx.try_recv(), Ok(true), "the append waited for the deletion");
}

/// An append that lands while a sync decides the partition is clean must leave it marked
/// dirty: otherwise the flusher, which looks only at dirty partitions, never syncs that append
/// on an idle partition, and `flush_interval_ms` no longer bounds how long it stays unsynced.
#[test]
fn an_append_racing_a_sync_that_finds_nothing_left_keeps_the_partition_due_for_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), small_config());
    store.create_topic("t", 1, store.config().topic_defaults()).unwrap();
    let p = store.partition("t", 0).unwrap();
    p.append(&batch(0, 3, 10, 1)).unwrap();
    let racer = Arc::clone(&p);
    *store.inner.shared.before_marking_clean.lock().unwrap() = Some(Box::new(move || {
        // The append runs on its own thread (it may have to wait for this sync), and gets a
        // moment to land before the sync goes on.
        let appended = std::thread::spawn(move || racer.append(&batch(3, 1, 10, 1)).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(appended);
    }));
    p.sync().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while p.log_end_offset() < 4 {
        assert!(std::time::Instant::now() < deadline, "the racing append never landed");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(p.durable_offset() < p.log_end_offset());
    let later = store.inner.shared.now_ms() + store.config().flush_interval_ms as i64 + 1;
    assert!(p.flush_due(later), "an unsynced append is not due for a flush");
}

/// Retention that reaches a partition after its topic was deleted and created again (it took
/// its list of partitions before) must not touch the new topic's files, which live at the same
/// paths.
#[test]
fn retention_of_a_deleted_partition_leaves_a_recreated_topic_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, c) = TestClock::new(1_000_000);
    let (store, _) = LogStore::open(dir.path(), small_config(), c).unwrap();
    let mut cfg = store.config().topic_defaults();
    cfg.retention_ms = std::num::NonZeroU64::new(10_000);
    let old = store.create_topic("t", 1, cfg.clone()).unwrap().partitions[0].clone();
    for i in 0..300u64 {
        old.append(&batch(i * 2, 2, 20, 1_000_000)).unwrap();
    }
    old.sync().unwrap();
    assert!(old.segment_count() >= 3);
    store.delete_topic("t").unwrap();
    let new = store.create_topic("t", 1, cfg).unwrap().partitions[0].clone();
    for i in 0..10u64 {
        new.append(&batch(i * 2, 2, 20, 2_000_000)).unwrap();
    }
    new.sync().unwrap();
    clock.set(2_000_000);
    assert!(matches!(old.apply_retention(2_000_000), Err(StorageError::UnknownTopic(_))));
    assert_eq!(read_all(&new, 0).len(), 20);
    store.close().unwrap();
    drop((store, old, new));
    let (store, _) = open(dir.path(), small_config());
    let new = store.partition("t", 0).unwrap();
    assert_eq!((new.log_start_offset(), new.log_end_offset()), (0, 20));
    assert_eq!(read_all(&new, 0).len(), 20);
}

/// Recovery trusts a sealed segment's file length once its index files exist, so they may be
/// written only after the seal has trimmed the preallocated tail: a read that rebuilds the
/// index of a segment whose seal is still pending keeps it in memory only.
#[test]
fn a_read_between_roll_and_seal_writes_no_index_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig { flush_interval_ms: 3_600_000, ..small_config() };
    let (store, _) = open(dir.path(), config.clone());
    let mut cfg = store.config().topic_defaults();
    cfg.flush_interval_ms = 3_600_000;
    let p = store.create_topic("t", 1, cfg).unwrap().partitions[0].clone();
    let mut i = 0;
    while p.segment_count() < 2 {
        p.append(&batch(i * 2, 2, 20, 1)).unwrap();
        i += 1;
    }
    let first = Arc::clone(&p.segments()[0]);
    assert!(first.is_sealed() && !first.is_seal_finished(), "the seal waits for the next sync");
    first.evict();
    assert_eq!(read_all(&p, 0).len() as u64, p.log_end_offset(), "reads rebuild the index");
    let index_files = ["00000000000000000000.index", "00000000000000000000.timeindex"];
    for f in index_files {
        assert!(!dir.path().join("t-0").join(f).exists(), "{f} written before the seal finished");
    }
    p.sync().unwrap();
    for f in index_files {
        assert!(dir.path().join("t-0").join(f).exists(), "{f} written by the seal");
    }
}

/// Batches without timestamps (-1, Kafka's NO_TIMESTAMP) are not "older than retention_ms":
/// their segment's age counts instead, so they are not deleted at the next retention run.
#[test]
fn records_without_timestamps_are_kept_for_retention_ms() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, c) = TestClock::new(1_700_000_000_000);
    let (store, _) = LogStore::open(dir.path(), small_config(), c).unwrap();
    let mut cfg = store.config().topic_defaults();
    cfg.retention_ms = std::num::NonZeroU64::new(7 * 24 * 3_600_000);
    let p = store.create_topic("t", 1, cfg).unwrap().partitions[0].clone();
    let mut b = RecordBatchBuilder::new();
    for i in 0..5 {
        b.push(-1, None, Some(format!("v{i}").as_bytes()), &[]);
    }
    p.append(&b.build()).unwrap();
    for _ in 0..2 {
        clock.set(1_700_000_060_000);
        store.apply_retention();
        p.sync().unwrap();
    }
    assert_eq!(p.log_start_offset(), 0, "deleted within a minute of being written");
    // Once the segment is older than retention_ms, the records go.
    clock.set(1_700_000_000_000 + 8 * 24 * 3_600_000);
    for _ in 0..2 {
        store.apply_retention();
        p.sync().unwrap();
    }
    assert_eq!(p.log_start_offset(), 5);
}

/// A batch whose timestamps are all `i64::MIN` (any value a producer may send) leaves its
/// segment with no largest timestamp, as an empty one has. Retention took such a segment for
/// one not to expire, and stopped there: no later segment was ever deleted by time.
#[test]
fn records_timestamped_i64_min_do_not_stop_time_retention() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, c) = TestClock::new(1_700_000_000_000);
    let (store, _) = LogStore::open(dir.path(), small_config(), c).unwrap();
    let mut cfg = store.config().topic_defaults();
    cfg.retention_ms = std::num::NonZeroU64::new(3_600_000);
    let p = store.create_topic("t", 1, cfg).unwrap().partitions[0].clone();
    let mut b = RecordBatchBuilder::new();
    b.push(i64::MIN, None, Some(b"v"), &[]);
    p.append(&b.build()).unwrap();
    p.roll_now().unwrap();
    p.append(&batch(0, 3, 8, 1_700_000_000_000)).unwrap();
    p.roll_now().unwrap();
    p.sync().unwrap();
    clock.set(1_700_000_000_000 + 2 * 3_600_000);
    for _ in 0..2 {
        store.apply_retention();
        p.sync().unwrap();
    }
    assert_eq!(p.log_start_offset(), 4, "both sealed segments are older than the retention");
}

/// A partition kept at about 20 KiB by size retention, with a thread that appends to it,
/// syncing and applying retention every eight batches, until the returned flag is set.
type UnderRetention = (LogStore, Arc<PartitionLog>, Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>);

fn append_under_retention(dir: &Path) -> UnderRetention {
    let (store, _) = open(dir, small_config());
    let mut cfg = store.config().topic_defaults();
    cfg.retention_bytes = std::num::NonZeroU64::new(20 * 1024);
    let partition = store.create_topic("t", 1, cfg).unwrap().partitions[0].clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (p, flag) = (Arc::clone(&partition), Arc::clone(&stop));
    let writer = std::thread::spawn(move || {
        let mut i = 0u64;
        while !flag.load(Ordering::Relaxed) {
            p.append(&batch(i * 4, 4, 40, 1)).unwrap();
            i += 1;
            if i % 8 == 0 {
                p.sync().unwrap();
                p.apply_retention(0).unwrap();
            }
        }
    });
    (store, partition, stop, writer)
}

/// A read at the log start while retention deletes that segment gets either the batch asked for
/// or OFFSET_OUT_OF_RANGE (so the consumer applies its auto_offset_reset), never later batches
/// handed out as if they were the ones asked for.
#[test]
fn a_read_racing_retention_never_skips_ahead_silently() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, p, stop, writer) = append_under_retention(dir.path());
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
    let mut checked = 0u64;
    while std::time::Instant::now() < deadline {
        let offset = p.log_start_offset();
        match p.read(offset, 1 << 20) {
            Ok(r) => {
                if let Some(first) = r.chunks.first() {
                    let b = BatchSplitter::new(first.clone()).next().unwrap().unwrap();
                    let (base, last) = (b.header().base_offset as u64, b.header().last_offset() as u64);
                    assert!(base <= offset && offset <= last, "asked for {offset}, got batch {base}..={last}");
                    checked += 1;
                }
            }
            Err(StorageError::OffsetOutOfRange { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(checked > 0);
}

/// The same for a lookup by timestamp (ListOffsets): a segment deleted under it is passed over,
/// not reported as a storage error.
#[test]
fn a_timestamp_lookup_racing_retention_finds_the_oldest_record_left() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, p, stop, writer) = append_under_retention(dir.path());
    while p.log_end_offset() == 0 {
        std::thread::yield_now();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
    while std::time::Instant::now() < deadline {
        let found = p.offset_for_timestamp(0);
        assert!(matches!(found, Ok(Some(_))), "{found:?}");
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
}

/// Segments recovery scanned come back with their index in memory but no mapping; the
/// open-segments budget must count (and evict) those indexes too, or a full scan keeps every
/// segment's index in memory for good.
#[test]
fn indexes_rebuilt_by_recovery_count_against_open_segments_max() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig { open_segments_max: 16, ..small_config() };
    {
        let (store, _) = open(dir.path(), config.clone());
        let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
        let mut i = 0;
        while p.segment_count() < 40 {
            p.append(&batch(i * 4, 4, 40, 1)).unwrap();
            i += 1;
        }
        drop(store); // no close(): as if killed
    }
    std::fs::remove_file(dir.path().join(super::checkpoint::CHECKPOINT_FILE)).ok();
    let (store, report) = open(dir.path(), config);
    assert!(report.scanned_segments >= 40, "{report:?}");
    store.enforce_segment_budget();
    let p = store.partition("t", 0).unwrap();
    let holding = p.segments().iter().filter(|s| s.is_mapped() || s.has_index()).count();
    assert!(holding <= 16, "{holding} segments hold a mapping or an index");
    assert_eq!(read_all(&p, 0).len() as u64, p.log_end_offset(), "evicted indexes load again");
}

/// A `topics.json` edited by hand to a `segment_bytes` smaller than the active segment already
/// is: the broker starts and serves the data (it used to panic mapping the segment).
#[test]
fn an_active_segment_longer_than_a_hand_edited_segment_bytes_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let written = {
        let (store, _) = open(dir.path(), small_config());
        let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
        let mut i = 0;
        while p.segments().last().unwrap().len() < 12 * 1024 {
            p.append(&batch(i * 4, 4, 40, 1)).unwrap();
            i += 1;
        }
        assert_eq!(p.segment_count(), 1);
        store.close().unwrap();
        i * 4
    };
    let path = dir.path().join("topics.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replace("\"segment_bytes\": 16384", "\"segment_bytes\": 8192");
    assert_ne!(edited, text, "{text}");
    std::fs::write(&path, edited).unwrap();
    let (store, _) = open(dir.path(), small_config());
    let p = store.partition("t", 0).unwrap();
    assert_eq!(read_all(&p, 0).len() as u64, written);
    p.append(&batch(written, 4, 40, 1)).unwrap();
    assert_eq!(read_all(&p, 0).len() as u64, written + 4);
}

#[test]
fn a_second_store_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, _) = open(dir.path(), small_config());
    assert!(LogStore::open(dir.path(), small_config(), system_clock()).is_err());
}

#[test]
fn acks_all_waiters_are_answered_after_a_group_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), small_config());
    let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..20 {
        let info = p.append(&batch(i, 1, 10, 1)).unwrap();
        let tx = tx.clone();
        store.sync_async(Arc::clone(&p), info.next_offset, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    }
    for _ in 0..20 {
        assert!(rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap());
    }
    assert_eq!(p.durable_offset(), 20);
}

#[test]
fn headers_and_null_values_survive_storage_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), small_config());
    let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
    let mut b = RecordBatchBuilder::new();
    b.push(5, None, None, &[Header { key: "h".into(), value: Some(Bytes::from_static(b"v")) }]);
    let original = b.build();
    p.append(&original).unwrap();
    let r = p.read(0, 1 << 20).unwrap();
    assert_eq!(&r.chunks[0][8..], &original[8..], "stored bytes are the produced bytes, base offset aside");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_appends_and_reads_return_exactly_what_was_appended(
        batches in proptest::collection::vec((1usize..6, 0usize..600, 0i64..100_000), 1..60),
        reads in proptest::collection::vec(0u64..400, 1..20),
        reopen_clean in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig { segment_bytes: 8192, ..small_config() };
        let mut expected: Vec<(i64, Vec<u8>)> = Vec::new();
        {
            let (store, _) = open(dir.path(), config.clone());
            let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
            for (count, size, ts) in &batches {
                let mut b = RecordBatchBuilder::new();
                for j in 0..*count {
                    let v = vec![(expected.len() % 251) as u8; *size];
                    b.push(ts + j as i64, None, Some(&v), &[]);
                    expected.push((ts + j as i64, v));
                }
                p.append(&b.build()).unwrap();
            }
            if reopen_clean { store.close().unwrap(); }
        }
        let (store, _) = open(dir.path(), config);
        let p = store.partition("t", 0).unwrap();
        prop_assert_eq!(p.log_end_offset(), expected.len() as u64);
        for r in reads {
            let from = r % (expected.len() as u64 + 1);
            let got = read_all(&p, from);
            prop_assert_eq!(got.len() as u64, expected.len() as u64 - from);
            for (o, v) in got {
                prop_assert_eq!(&v[..], &expected[o as usize].1[..]);
            }
        }
        // Timestamp lookups agree with a linear search.
        for (ts, _) in expected.iter().step_by(7) {
            let want = expected.iter().position(|(t, _)| t >= ts).map(|o| o as u64);
            let got = p.offset_for_timestamp(*ts).unwrap().map(|(o, _)| o);
            prop_assert_eq!(got, want);
        }
    }
}

/// How a simulated power loss treats bytes written after the last successful sync.
#[derive(Debug, Clone, Copy)]
enum PowerLoss {
    /// Every unsynced byte is lost (reads back as zeros); files created since are gone.
    LoseUnsynced,
    /// As above, but the first unsynced page is torn: half of it made it to disk.
    TornFinalPage,
}

/// What a power loss would leave of `p`'s segments: for each log file, the length it had at its
/// last successful sync (the disk model records real syncs, not what the engine believes).
fn simulate_power_loss(p: &PartitionLog, _mode: PowerLoss) -> Vec<(std::path::PathBuf, u64)> {
    let mut plan = Vec::new();
    for seg in p.segments().iter() {
        plan.push((seg.log_path().to_owned(), segment::disk_model::durable_len(seg.log_path())));
    }
    plan
}

fn apply_power_loss(plan: &[(std::path::PathBuf, u64)], mode: PowerLoss) {
    for (path, synced) in plan {
        if *synced <= segment::LOG_HEADER_LEN && !matches!(mode, PowerLoss::TornFinalPage) {
            // Never synced: the file itself may not have reached the disk.
            let _ = std::fs::remove_file(path);
            continue;
        }
        let mut data = std::fs::read(path).unwrap();
        let keep = match mode {
            PowerLoss::LoseUnsynced => *synced as usize,
            PowerLoss::TornFinalPage => {
                let page_end = (*synced as usize / 4096 + 1) * 4096;
                (*synced as usize + (page_end - *synced as usize) / 2).min(data.len())
            }
        };
        if keep < data.len() {
            data[keep..].fill(0);
        }
        std::fs::write(path, &data).unwrap();
    }
}

#[test]
fn power_loss_keeps_every_synced_record() {
    for mode in [PowerLoss::LoseUnsynced, PowerLoss::TornFinalPage] {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig { segment_bytes: 16 * 1024, ..small_config() };
        let (durable, plan) = {
            let (store, _) = open(dir.path(), config.clone());
            let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
            let mut next = 0;
            let mut durable = 0;
            for i in 0..120u64 {
                next = p.append(&batch(next, 3, 50, i as i64)).unwrap().next_offset;
                if i % 10 == 9 && i < 100 {
                    durable = p.sync().unwrap(); // an acks=all acknowledgement point
                }
            }
            assert!(next > durable, "unsynced data exists to be lost");
            let plan = simulate_power_loss(&p, mode);
            drop(p);
            drop(store); // no close(): the power went out
            (durable, plan)
        };
        apply_power_loss(&plan, mode);
        let (store, report) = open(dir.path(), config);
        let p = store.partition("t", 0).unwrap();
        assert!(p.log_end_offset() >= durable, "{mode:?}: synced records lost: end {} < {durable}", p.log_end_offset());
        let all = read_all(&p, 0);
        assert_eq!(all.len() as u64, p.log_end_offset(), "{mode:?}: log is consistent and fully readable");
        for (i, (o, v)) in all.iter().enumerate() {
            assert_eq!(*o, i as u64);
            assert_eq!(&v[..], format!("{:050}", i).as_bytes(), "{mode:?}: offset {i} holds what was appended");
        }
        // The log takes appends again where it ends.
        let end = p.log_end_offset();
        assert_eq!(p.append(&batch(end, 1, 10, 1)).unwrap().base_offset, end);
        eprintln!("{mode:?}: durable {durable}, recovered end {end}, cut {} bytes", report.truncated_bytes);
    }
}

#[test]
fn what_recovery_reports_as_durable_after_a_kill_survives_a_later_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig { segment_bytes: 16 * 1024, ..small_config() };
    let mut first = RecordBatchBuilder::new().producer(5, 0, 0);
    first.push(1, None, Some(b"acked after the restart"), &[]);
    let first = first.build();
    let written = {
        let (store, _) = open(dir.path(), config.clone());
        let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
        let mut next = 0;
        for i in 0..60u64 {
            next = p.append(&batch(next, 3, 50, i as i64)).unwrap().next_offset;
            if i == 19 {
                p.sync().unwrap();
            }
        }
        let tail = p.append(&first).unwrap();
        assert!(!tail.duplicate);
        assert!(p.durable_offset() < tail.next_offset, "the tail is not synced before the kill");
        drop(store); // kill -9: the page cache keeps every byte, nothing more was synced
        tail.next_offset
    };
    let (plan, durable) = {
        let (store, report) = open(dir.path(), config.clone());
        let p = store.partition("t", 0).unwrap();
        assert!(report.scanned_segments > 0);
        assert_eq!(p.log_end_offset(), written);
        // The producer retries its unacknowledged batch: it is acknowledged as a duplicate,
        // which for acks=all is a promise that it is durable.
        let again = p.append(&first).unwrap();
        assert!(again.duplicate);
        let durable = p.durable_offset();
        assert!(durable >= again.next_offset, "durable {durable} does not cover the retried batch");
        let plan = simulate_power_loss(&p, PowerLoss::LoseUnsynced);
        drop(store);
        (plan, durable)
    };
    apply_power_loss(&plan, PowerLoss::LoseUnsynced);
    let (store, _) = open(dir.path(), config);
    let p = store.partition("t", 0).unwrap();
    assert!(
        p.log_end_offset() >= durable,
        "records reported durable were lost: end {} < {durable}",
        p.log_end_offset()
    );
    assert_eq!(read_all(&p, 0).len() as u64, p.log_end_offset());
}

#[test]
fn bytes_after_a_lost_page_in_the_active_segment_do_not_come_back_after_the_next_crash() {
    let dir = tempfile::tempdir().unwrap();
    let batches: Vec<Bytes> = (0..20u64).map(|i| batch(i * 3, 3, 50, i as i64)).collect();
    let lost = 10;
    {
        let (store, _) = open(dir.path(), small_config());
        let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
        for b in &batches {
            p.append(b).unwrap();
        }
        drop(store);
    }
    // A power loss lost the page where batch 10 begins (here: exactly that batch's bytes), while
    // later pages of the file reached the disk. Its zeros look like the preallocated tail.
    let log = active_log(dir.path());
    let mut data = std::fs::read(&log).unwrap();
    let at = segment::LOG_HEADER_LEN as usize + batches[..lost].iter().map(Bytes::len).sum::<usize>();
    data[at..at + batches[lost].len()].fill(0);
    std::fs::write(&log, &data).unwrap();
    {
        let (store, _) = open(dir.path(), small_config());
        let p = store.partition("t", 0).unwrap();
        assert_eq!(p.log_end_offset(), 3 * lost as u64, "the log ends at the hole");
        // The producer resends the lost batch: same size, same place in the file.
        assert_eq!(p.append(&batches[lost]).unwrap().next_offset, 3 * lost as u64 + 3);
        drop(store); // kill -9
    }
    let (store, _) = open(dir.path(), small_config());
    let p = store.partition("t", 0).unwrap();
    assert_eq!(p.log_end_offset(), 3 * lost as u64 + 3, "batches after the hole came back from the dead");
    assert_eq!(read_all(&p, 0).len(), 3 * lost + 3);
}

#[test]
fn partitions_open_in_parallel_keep_their_order_and_the_first_error_wins() {
    let items: Vec<u32> = (0..500).collect();
    let out = parallel_map(&items, 7, |i| Ok(i * 2)).unwrap();
    assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
    let err =
        parallel_map(
            &items,
            7,
            |i| {
                if *i == 123 {
                    Err(StorageError::InvalidConfig(format!("bad {i}")))
                } else {
                    Ok(*i)
                }
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("bad 123"), "{err}");
    assert!(parallel_map(&[] as &[u32], 8, |i| Ok(*i)).unwrap().is_empty());
}

fn proc_counts(data_dir: &Path) -> (usize, usize) {
    let needle = data_dir.to_string_lossy().into_owned();
    let fds = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().contains(&needle))
        .count();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.contains(&needle)).count();
    (fds, maps)
}

#[test]
fn ten_thousand_partitions_stay_under_the_open_file_and_mapping_budget() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 512;
    let config = StorageConfig { open_segments_max: budget, preallocate_bytes_min: 4096, ..small_config() };
    let (store, _) = open(dir.path(), config);
    for t in 0..10 {
        store.create_topic(&format!("t{t}"), 1000, store.config().topic_defaults()).unwrap();
    }
    let (fds, maps) = proc_counts(dir.path());
    assert!(maps <= budget, "{maps} mappings for 10,000 partitions, budget {budget}");
    assert!(fds <= 2, "{fds} files held open (only the directory lock) before any append");
    // Every partition still takes appends and serves reads, reopening lazily.
    for t in 0..10 {
        for p in (0..1000).step_by(7) {
            let log = store.partition(&format!("t{t}"), p).unwrap();
            log.append(&batch(0, 1, 10, 1)).unwrap();
            assert_eq!(read_all(&log, 0).len(), 1);
        }
        store.enforce_segment_budget();
    }
    let (fds, maps) = proc_counts(dir.path());
    assert!(maps <= budget, "{maps} mappings after appends, budget {budget}");
    assert!(fds <= budget + 2, "{fds} files held open, budget {budget}");
}

#[test]
fn a_retried_idempotent_batch_is_not_stored_twice_even_across_an_unclean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = RecordBatchBuilder::new().producer(77, 0, 0);
    b.push(1, None, Some(b"first"), &[]);
    b.push(2, None, Some(b"second"), &[]);
    let first = b.build();
    let mut b = RecordBatchBuilder::new().producer(77, 0, 2);
    b.push(3, None, Some(b"third"), &[]);
    let next = b.build();
    {
        let (store, _) = open(dir.path(), small_config());
        let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
        p.append(&batch(0, 3, 10, 1)).unwrap(); // a non-idempotent batch first: offsets 0..3
        let a = p.append(&first).unwrap();
        assert_eq!((a.base_offset, a.duplicate), (3, false));
        let again = p.append(&first).unwrap();
        assert_eq!(
            (again.base_offset, again.next_offset, again.duplicate),
            (3, 5, true),
            "a retry gets the original offsets"
        );
        assert_eq!(p.log_end_offset(), 5, "nothing appended for the retry");
        drop(store); // kill -9: the producer state must come back from the log
    }
    let (store, _) = open(dir.path(), small_config());
    let p = store.partition("t", 0).unwrap();
    let again = p.append(&first).unwrap();
    assert!(again.duplicate && again.base_offset == 3, "{again:?}");
    let n = p.append(&next).unwrap();
    assert_eq!((n.base_offset, n.duplicate), (5, false));
    assert_eq!(read_all(&p, 0).len(), 6);
    // A different producer with the same sequence numbers is not a duplicate.
    let mut b = RecordBatchBuilder::new().producer(78, 0, 0);
    b.push(1, None, Some(b"other"), &[]);
    assert!(!p.append(&b.build()).unwrap().duplicate);
}

/// An idempotent producer's last batch may lie any number of segments back (other producers
/// kept appending while its acknowledgement was delayed); a restart must still recognise its
/// retry. Producer states were rebuilt from the last two segments only.
#[test]
fn a_producer_whose_last_batch_is_segments_back_is_still_deduplicated_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = RecordBatchBuilder::new().producer(77, 0, 0);
    b.push(1, None, Some(b"first"), &[]);
    let first = b.build();
    for clean in [false, true] {
        let topic = if clean { "clean" } else { "crash" };
        let (store, _) = open(dir.path(), small_config());
        let p = store.create_topic(topic, 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
        let a = p.append(&first).unwrap();
        let segments = p.segment_count();
        let mut n = 0;
        while p.segment_count() < segments + 4 {
            p.append(&batch(n, 10, 100, 1)).unwrap(); // other, non-idempotent producers
            n += 10;
        }
        p.sync().unwrap(); // the flusher finishes the seals
        let end = p.log_end_offset();
        if clean {
            store.close().unwrap();
        }
        drop((store, p));
        let (store, _) = open(dir.path(), small_config());
        let p = store.partition(topic, 0).unwrap();
        let again = p.append(&first).unwrap();
        assert!(again.duplicate && again.base_offset == a.base_offset, "{topic}: {again:?}");
        assert_eq!(p.log_end_offset(), end, "{topic}: the retry was stored again");
    }
}

#[test]
fn a_failed_sync_fails_every_waiting_append_and_leaves_the_partition_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), small_config());
    let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
    p.append(&batch(0, 2, 10, 1)).unwrap();
    p.sync().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    store.inner.shared.fail_next_sync.store(true, Ordering::Release);
    // Append everything before the first waiter reaches the flusher: once its sync fails, the
    // partition refuses appends, so interleaving them would race the flusher thread.
    let ends: Vec<u64> = (0..5).map(|i| p.append(&batch(2 + i * 2, 2, 10, 1)).unwrap().next_offset).collect();
    for end in ends {
        let tx = tx.clone();
        store.sync_async(Arc::clone(&p), end, Box::new(move |r| tx.send(r.is_err()).unwrap()));
    }
    for _ in 0..5 {
        assert!(rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(), "every waiter learns of the failure");
    }
    assert_eq!(p.durable_offset(), 2, "the durable offset did not move past the failed sync");
    assert!(matches!(p.append(&batch(12, 1, 10, 1)), Err(StorageError::Poisoned(_))), "later appends are refused");
    assert!(matches!(p.sync(), Err(StorageError::Poisoned(_))), "later syncs report it too");
    assert_eq!(read_all(&p, 0).len(), 12, "reads keep working");
    // Said once: the periodic flush does not try (and log the failure) again on every pass.
    assert!(!p.flush_due(i64::MAX), "a read-only partition is never due for a periodic flush");
}

#[test]
fn a_busy_partition_starts_its_next_segment_with_the_preallocation_it_had_reached() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig { preallocate_bytes_min: 4096, preallocate_bytes_max: 16 * 1024, ..small_config() };
    let config = StorageConfig { segment_bytes: 64 * 1024, ..config };
    let (store, _) = open(dir.path(), config);
    let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
    // Fill the first segment: the preallocation step grows 4 -> 8 -> 16 KiB on the way.
    let mut next = 0;
    while p.segment_count() < 2 {
        p.append(&batch(next, 10, 100, 1)).unwrap();
        next += 10;
    }
    let newest = std::fs::read_dir(dir.path().join("t-0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max()
        .unwrap();
    let len = std::fs::metadata(&newest).unwrap().len();
    assert!(len >= 16 * 1024, "the new segment starts at the reached step, not at 4 KiB: {len}");
    assert_eq!(read_all(&p, 0).len() as u64, next, "and reads are unaffected");
}

#[test]
fn a_segment_reopened_as_active_then_rolled_is_not_trusted_on_its_old_index_after_a_crash() {
    // A clean close writes the active segment's index files and trims it. Reopened, it is
    // active again and grows (with preallocated zeros past its data); if it is rolled and the
    // broker dies before the seal finishes, its old time index must not vouch for its length.
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path(), small_config());
        let p = store.create_topic("t", 1, store.config().topic_defaults()).unwrap().partitions[0].clone();
        for i in 0..5 {
            p.append(&batch(i * 2, 2, 20, 1_000)).unwrap();
        }
        store.close().unwrap();
    }
    {
        let (store, _) = open(dir.path(), small_config());
        let p = store.partition("t", 0).unwrap();
        p.append(&batch(10, 2, 20, 5_000)).unwrap();
        p.sync().unwrap();
        store.inner.write_checkpoint(false).unwrap();
        p.roll_now().unwrap();
        drop(store); // killed before the rolled segment's seal finished
    }
    let (store, _) = open(dir.path(), small_config());
    let p = store.partition("t", 0).unwrap();
    assert_eq!(p.log_end_offset(), 12);
    let all = read_all(&p, 0);
    assert_eq!(all.iter().map(|(o, _)| *o).collect::<Vec<_>>(), (0..12).collect::<Vec<_>>());
    assert_eq!(
        p.offset_for_timestamp(5_000).unwrap().map(|(o, _)| o),
        Some(10),
        "the newest records are found by time"
    );
}

#[test]
fn retention_finishes_on_an_idle_partition_without_new_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, c) = TestClock::new(1_000_000);
    let config = StorageConfig { flush_interval_ms: 10, ..small_config() };
    let (store, _) = LogStore::open(dir.path(), config, c).unwrap();
    let mut cfg = store.config().topic_defaults();
    cfg.retention_ms = std::num::NonZeroU64::new(10_000);
    cfg.flush_interval_ms = 10;
    let p = store.create_topic("t", 1, cfg).unwrap().partitions[0].clone();
    for i in 0..20u64 {
        p.append(&batch(i * 5, 5, 40, 1_000_000)).unwrap();
    }
    p.sync().unwrap();
    clock.set(2_000_000);
    store.apply_retention(); // rolls the expired active segment
                             // Nothing else is written or synced by hand: the flusher alone must finish the seal.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut now = 2_000_000;
    while p.log_start_offset() < p.log_end_offset() && std::time::Instant::now() < deadline {
        now += 20;
        clock.set(now);
        std::thread::sleep(std::time::Duration::from_millis(20));
        store.apply_retention();
    }
    assert_eq!(p.log_start_offset(), p.log_end_offset(), "expired data is gone");
}
