//! The `cairn` command-line tool against the real broker binary.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{sibling_bin, TestBroker};

fn cairn(broker: &TestBroker, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    cairn_bytes(broker, args, stdin.map(str::as_bytes))
}

fn cairn_bytes(broker: &TestBroker, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut child = Command::new(sibling_bin("cairn-client", "cairn"))
        .args(args)
        .env("CAIRN_BROKER", broker.addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn produce_piped_into_consume_round_trips_values_keys_and_headers() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    let (code, out, err) =
        cairn(&broker, &["topic", "create", "cli", "--partitions", "2", "--retention-ms", "-1"], None);
    assert_eq!(code, 0, "{out}{err}");
    let input = "task-1:started\ntask-2:started\ntask-1:done\nno key here\n";
    let (code, _, err) = cairn(
        &broker,
        &["produce", "cli", "--key-separator", ":", "--header", "agent=a1", "--acks", "all"],
        Some(input),
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cairn(&broker, &["consume", "cli", "--count", "4", "--format", "json"], None);
    assert_eq!(code, 0, "{err}");
    let records: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 4);
    let mut got: Vec<(Option<String>, String)> = records
        .iter()
        .map(|r| (r["key"].as_str().map(str::to_owned), r["value"].as_str().unwrap().to_owned()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (None, "no key here".to_owned()),
            (Some("task-1".into()), "done".into()),
            (Some("task-1".into()), "started".into()),
            (Some("task-2".into()), "started".into()),
        ]
    );
    for r in &records {
        assert_eq!(r["headers"]["agent"], "a1");
        for k in ["topic", "partition", "offset", "timestamp"] {
            assert!(!r[k].is_null(), "json has {k}");
        }
    }
    // Per key, order is kept: task-1 started before done.
    let task1: Vec<&str> =
        records.iter().filter(|r| r["key"] == "task-1").map(|r| r["value"].as_str().unwrap()).collect();
    assert_eq!(task1, vec!["started", "done"]);
    // Without --follow, consume stops at the end of the log.
    let (code, out, _) = cairn(&broker, &["consume", "cli"], None);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 4);
    // With --group it commits what it printed: a second run prints only what is left.
    let (code, out, _) = cairn(&broker, &["consume", "cli", "--group", "g", "--count", "1", "--partition", "0"], None);
    assert_eq!((code, out.lines().count()), (0, 1));
    let (code, out, _) = cairn(&broker, &["group", "describe", "g", "--format", "json"], None);
    assert_eq!(code, 0);
    let g: serde_json::Value = serde_json::from_str(&out).unwrap();
    let committed: Vec<i64> =
        g["partitions"].as_array().unwrap().iter().filter_map(|p| p["committed"].as_i64()).collect();
    assert_eq!(committed, vec![1]);
    let (code, out, _) = cairn(&broker, &["topic", "list", "--format", "json"], None);
    assert_eq!(code, 0);
    let topics: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(topics.as_array().unwrap().len(), 1, "internal topics are hidden: {out}");
}

#[test]
fn errors_print_one_line_and_use_the_documented_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    let (code, _, err) = cairn(&broker, &["consume", "nosuch"], None);
    assert_eq!(code, 3, "unknown topic: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("unknown topic nosuch"), "{err}");
    let (code, _, err) = cairn(&broker, &["produce", "nosuch"], Some("x\n"));
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = cairn(&broker, &["--broker", "127.0.0.1:1", "topic", "list"], None);
    assert_eq!(code, 4, "unreachable: {err}");
    assert!(err.contains("cannot connect"), "{err}");
    let (code, _, _) = cairn(&broker, &["topic", "create", "bad/name"], None);
    assert_eq!(code, 1);
    let (code, _, _) = cairn(&broker, &["consume", "x", "--from", "yesterday"], None);
    assert_eq!(code, 2, "usage error");
    let (code, out, err) = cairn(&broker, &["topic", "create", "zero", "--partitions", "0"], None);
    assert_eq!(code, 2, "no topic of zero partitions: {out}{err}");
    let (code, _, _) = cairn(&broker, &["topic", "describe", "zero"], None);
    assert_eq!(code, 3, "nothing was created");
    let (code, out, _) = cairn(&broker, &["consume", "--help"], None);
    assert_eq!(code, 0);
    assert!(out.contains("--from"));
}

#[test]
fn produce_sends_every_line_even_one_that_is_not_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    let (code, out, err) = cairn(&broker, &["topic", "create", "raw", "--partitions", "1"], None);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) =
        cairn_bytes(&broker, &["produce", "raw", "--key-separator", ":"], Some(b"a\n\xff\xfe:\x80\nb\r\n"));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("produced 3 record(s)"), "{err}");
    let (code, out, err) = cairn(&broker, &["consume", "raw", "--count", "3", "--format", "json"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
}

#[test]
fn produce_with_acks_none_writes_every_record_before_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    let (code, out, err) = cairn(&broker, &["topic", "create", "fast", "--partitions", "1"], None);
    assert_eq!(code, 0, "{out}{err}");
    let lines = 50_000;
    let input: String = (0..lines).map(|i| format!("{i:0>200}\n")).collect();
    let (code, _, err) = cairn(&broker, &["produce", "fast", "--acks", "none"], Some(&input));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("produced {lines} record(s)")), "{err}");
    // No acknowledgements to wait for, but the tool must not exit with records still queued.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (code, out, err) = cairn(&broker, &["topic", "describe", "fast", "--format", "json"], None);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let end = v["partitions"][0]["end_offset"].as_i64().unwrap();
        if end == lines {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{end} of {lines} records arrived");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn consume_with_a_group_exits_when_the_group_assigns_it_nothing() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    let (code, out, err) = cairn(&broker, &["topic", "create", "one", "--partitions", "1"], None);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = cairn(&broker, &["produce", "one"], Some("first\n"));
    assert_eq!(code, 0, "{err}");
    let spawn = |args: &[&str]| {
        Command::new(sibling_bin("cairn-client", "cairn"))
            .args(args)
            .env("CAIRN_BROKER", broker.addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // A follower holds the only partition (and keeps it: assignment is sticky).
    let mut holder = spawn(&["consume", "one", "--group", "g", "--follow"]);
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "first");
    // A second member gets nothing: without --follow it has nothing to read and must exit.
    let mut idle = spawn(&["consume", "one", "--group", "g"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = idle.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = idle.kill();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = holder.kill();
    let _ = holder.wait();
    let status = status.expect("a member with no partitions waited for ever");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn consume_prints_past_one_poll_and_a_reader_that_leaves_gets_only_what_it_took_committed() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    for t in ["small", "large"] {
        let (code, out, err) = cairn(&broker, &["topic", "create", t, "--partitions", "1"], None);
        assert_eq!(code, 0, "{out}{err}");
    }
    // 1,200 small records come back in one fetch, more than one poll hands out (500).
    let small: String = (0..1200).map(|i| format!("{i}\n")).collect();
    let (code, _, err) = cairn(&broker, &["produce", "small"], Some(&small));
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cairn(&broker, &["consume", "small"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1200, "every record up to the end, not only the first poll's");

    // 2 MB of records: more than a pipe holds, so writes fail once the reader has gone.
    let pad = "x".repeat(1000);
    let large: String = (0..2000).map(|i| format!("{i:04}{pad}\n")).collect();
    let (code, _, err) = cairn(&broker, &["produce", "large"], Some(&large));
    assert_eq!(code, 0, "{err}");
    let mut child = Command::new(sibling_bin("cairn-client", "cairn"))
        .args(["consume", "large", "--group", "g"])
        .env("CAIRN_BROKER", broker.addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("0000x"), "{line}");
    // The reader is gone (as `| head -n 1`): the command stops, as at --count.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "consume kept running after its reader left");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status}: {err}");
    let (code, out, _) = cairn(&broker, &["group", "describe", "g", "--format", "json"], None);
    assert_eq!(code, 0);
    let g: serde_json::Value = serde_json::from_str(&out).unwrap();
    let committed = g["partitions"][0]["committed"].as_i64().expect("a commit");
    assert!((1..200).contains(&committed), "committed {committed}: no more than reached the pipe");
}
