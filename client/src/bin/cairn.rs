//! `cairn`: the Cairn command-line tool.
//!
//! Exit codes: 0 success, 1 other failure, 2 usage error, 3 unknown topic or group,
//! 4 broker unreachable.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use cairn_client::{
    Acks, Admin, ConnectionConfig, Consumer, ConsumerConfig, ConsumerRecord, Error, ErrorCode, Header, NewTopic,
    Offset, Producer, ProducerConfig, ProducerRecord,
};

/// Command-line client for Cairn: topics, produce, consume, groups.
#[derive(Debug, Parser)]
#[command(name = "cairn", version, about, propagate_version = true)]
struct Cli {
    /// Broker address.
    #[arg(long, global = true, env = "CAIRN_BROKER", default_value = "127.0.0.1:7070")]
    broker: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Produce records read from stdin, one per line.
    Produce(ProduceArgs),
    /// Print records, one per line.
    Consume(ConsumeArgs),
    /// List and describe consumer groups.
    #[command(subcommand)]
    Group(GroupCommand),
}

#[derive(Debug, Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name: 1-249 characters from [A-Za-z0-9._-].
        name: String,
        /// Number of partitions (at least 1).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        partitions: u32,
        /// Delete data older than this (-1 keeps forever).
        #[arg(long, allow_hyphen_values = true)]
        retention_ms: Option<i64>,
        /// Delete old data beyond this many bytes per partition (-1 is unlimited).
        #[arg(long, allow_hyphen_values = true)]
        retention_bytes: Option<i64>,
        /// Segment size in bytes.
        #[arg(long)]
        segment_bytes: Option<u64>,
        /// Longest time acknowledged data may stay unsynced.
        #[arg(long)]
        flush_interval_ms: Option<u64>,
        /// Cleanup policy.
        #[arg(long, value_enum)]
        cleanup: Option<Cleanup>,
    },
    /// List topics.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Describe a topic: partitions, offsets, configuration.
    Describe {
        /// Topic name.
        name: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Delete a topic and its data.
    Delete {
        /// Topic name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// List consumer groups.
    List,
    /// Describe a group: members and, per partition, committed offset, end offset and lag.
    Describe {
        /// Group id.
        group: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Cleanup {
    Delete,
    Compact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AcksArg {
    None,
    Leader,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ValueFormat {
    Value,
    Json,
}

#[derive(Debug, Args)]
struct ProduceArgs {
    /// Topic.
    topic: String,
    /// Send every record to this partition (default: by key, or sticky round-robin).
    #[arg(long)]
    partition: Option<u32>,
    /// Split each line at the first SEP into key and value (lines without SEP have no key).
    #[arg(long, value_name = "SEP")]
    key_separator: Option<String>,
    /// Durability required before a record counts as sent.
    #[arg(long, value_enum, default_value_t = AcksArg::Leader)]
    acks: AcksArg,
    /// Header added to every record (repeatable).
    #[arg(long = "header", value_name = "K=V")]
    headers: Vec<String>,
}

#[derive(Debug, Args)]
struct ConsumeArgs {
    /// Topic.
    topic: String,
    /// Read only this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Where to start: beginning, end, an offset, or @UNIX_MS (first record at or after).
    #[arg(long, default_value = "beginning", value_name = "beginning|end|OFFSET|@UNIX_MS")]
    from: String,
    /// Consume as a member of this group (its committed offsets win over --from) and commit
    /// what was printed before exiting.
    #[arg(long)]
    group: Option<String>,
    /// Stop after this many records.
    #[arg(long)]
    count: Option<u64>,
    /// Keep waiting for new records instead of stopping at the end of the log.
    #[arg(long)]
    follow: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ValueFormat::Value)]
    format: ValueFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cairn: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn: {e}");
            ExitCode::from(cli_exit_code(&e))
        }
    }
}

/// Why a command failed: the client library's error, or stdout that could not be written.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Client(#[from] Error),
    #[error("writing to stdout failed after {printed} record(s): {error}")]
    Stdout { printed: u64, error: std::io::Error },
}

fn cli_exit_code(e: &CliError) -> u8 {
    match e {
        CliError::Client(e) => exit_code(e),
        CliError::Stdout { .. } => 1,
    }
}

fn exit_code(e: &Error) -> u8 {
    match e {
        Error::UnknownTopic(_) => 3,
        Error::Broker { code: ErrorCode::UnknownTopicOrPartition | ErrorCode::GroupIdNotFound, .. } => 3,
        // A broker that stops answering times requests out: unreachable too.
        Error::Connect { .. } | Error::Disconnected { .. } | Error::Timeout { .. } => 4,
        Error::InvalidArgument(_) => 2,
        _ => 1,
    }
}

fn connection(cli_broker: &str) -> ConnectionConfig {
    ConnectionConfig { broker: cli_broker.to_owned(), client_id: "cairn-cli".into(), ..ConnectionConfig::default() }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let conn = connection(&cli.broker);
    match cli.command {
        Command::Topic(cmd) => Ok(topic(conn, cmd).await?),
        Command::Produce(args) => Ok(produce(conn, args).await?),
        Command::Consume(args) => consume(conn, args).await,
        Command::Group(cmd) => Ok(group(conn, cmd).await?),
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Error> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    println!("{s}");
    Ok(())
}

fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(header.iter().map(|h| h.to_string()).collect()));
    for r in rows {
        println!("{}", line(r));
    }
}

async fn topic(conn: ConnectionConfig, cmd: TopicCommand) -> Result<(), Error> {
    let admin = Admin::connect(conn).await?;
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            retention_ms,
            retention_bytes,
            segment_bytes,
            flush_interval_ms,
            cleanup,
        } => {
            let t = NewTopic {
                name: name.clone(),
                partitions,
                retention_ms,
                retention_bytes,
                segment_bytes,
                flush_interval_ms,
                cleanup_policy: cleanup.map(|c| match c {
                    Cleanup::Delete => "delete".to_owned(),
                    Cleanup::Compact => "compact".to_owned(),
                }),
                batch_bytes_max: None,
            };
            admin.create_topic(t).await?;
            println!("created topic {name} with {partitions} partition(s)");
        }
        TopicCommand::List { format } => {
            let topics = admin.list_topics().await?;
            match format {
                Format::Json => print_json(&topics)?,
                Format::Table => print_table(
                    &["TOPIC", "PARTITIONS", "RECORDS"],
                    topics
                        .iter()
                        .map(|t| {
                            let records: i64 = t.partitions.iter().map(|p| p.end_offset - p.start_offset).sum();
                            vec![t.name.clone(), t.partitions.len().to_string(), records.to_string()]
                        })
                        .collect(),
                ),
            }
        }
        TopicCommand::Describe { name, format } => {
            let t = admin.describe_topic(&name).await?;
            match format {
                Format::Json => print_json(&t)?,
                Format::Table => {
                    println!("topic {}", t.name);
                    for (k, v) in &t.config {
                        println!("  {k} = {v}");
                    }
                    print_table(
                        &["PARTITION", "START", "END"],
                        t.partitions
                            .iter()
                            .map(|p| {
                                vec![p.partition.to_string(), p.start_offset.to_string(), p.end_offset.to_string()]
                            })
                            .collect(),
                    );
                }
            }
        }
        TopicCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            println!("deleted topic {name}");
        }
    }
    Ok(())
}

async fn group(conn: ConnectionConfig, cmd: GroupCommand) -> Result<(), Error> {
    let admin = Admin::connect(conn).await?;
    match cmd {
        GroupCommand::List => {
            let groups = admin.list_groups().await?;
            print_table(
                &["GROUP", "STATE", "MEMBERS"],
                groups.into_iter().map(|g| vec![g.group_id, g.state, g.members.to_string()]).collect(),
            );
        }
        GroupCommand::Describe { group, format } => {
            let g = admin.describe_group(&group).await?;
            match format {
                Format::Json => print_json(&g)?,
                Format::Table => {
                    println!(
                        "group {} ({}, generation {}, {} member(s))",
                        g.group,
                        g.state,
                        g.generation,
                        g.members.len()
                    );
                    let dash = || "-".to_owned();
                    print_table(
                        &["TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "MEMBER"],
                        g.partitions
                            .iter()
                            .map(|p| {
                                let owner = g
                                    .members
                                    .iter()
                                    .find(|m| m.assignment.get(&p.topic).is_some_and(|ps| ps.contains(&p.partition)))
                                    .map_or_else(dash, |m| m.member_id.clone());
                                vec![
                                    p.topic.clone(),
                                    p.partition.to_string(),
                                    p.committed.map_or_else(dash, |c| c.to_string()),
                                    p.end.to_string(),
                                    p.lag.map_or_else(dash, |l| l.to_string()),
                                    owner,
                                ]
                            })
                            .collect(),
                    );
                }
            }
        }
    }
    Ok(())
}

async fn produce(conn: ConnectionConfig, args: ProduceArgs) -> Result<(), Error> {
    let acks = match args.acks {
        AcksArg::None => Acks::None,
        AcksArg::Leader => Acks::Leader,
        AcksArg::All => Acks::All,
    };
    let mut headers = Vec::new();
    for h in &args.headers {
        let (k, v) = h.split_once('=').ok_or_else(|| Error::InvalidArgument(format!("--header {h:?} is not K=V")))?;
        headers.push(Header { key: k.to_owned(), value: Some(bytes::Bytes::copy_from_slice(v.as_bytes())) });
    }
    let producer = Producer::connect(ProducerConfig { connection: conn, acks, ..ProducerConfig::default() }).await?;
    let separator = args.key_separator.as_deref().map(str::as_bytes);
    if separator.is_some_and(<[u8]>::is_empty) {
        return Err(Error::InvalidArgument("--key-separator must not be empty".into()));
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(1024);
    // Read stdin on a blocking thread. Lines are bytes: a value need not be UTF-8.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().split(b'\n') {
            let failed = line.is_err();
            if tx.blocking_send(line).is_err() || failed {
                break;
            }
        }
    });
    let mut pending = VecDeque::new();
    let mut sent = 0u64;
    let mut read_error = None;
    while let Some(line) = rx.recv().await {
        let mut line = match line {
            Ok(l) => l,
            Err(e) => {
                // What was read before is still sent.
                read_error = Some(Error::InvalidArgument(format!("reading stdin: {e}")));
                break;
            }
        };
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let line = bytes::Bytes::from(line);
        let split = separator.and_then(|sep| line.windows(sep.len()).position(|w| w == sep).map(|at| (at, sep.len())));
        let (key, value) = match split {
            Some((at, len)) => (Some(line.slice(..at)), line.slice(at + len..)),
            None => (None, line),
        };
        let mut record = ProducerRecord::new(args.topic.clone(), value);
        record.key = key;
        record.partition = args.partition;
        record.headers = headers.clone();
        pending.push_back(producer.send(record).await?);
        sent += 1;
        while pending.len() > 10_000 {
            pending.pop_front().expect("non-empty").await?;
        }
    }
    producer.flush().await?;
    for d in pending {
        d.await?;
    }
    producer.close().await?;
    eprintln!("produced {sent} record(s)");
    read_error.map_or(Ok(()), Err)
}

fn parse_from(from: &str) -> Result<Offset, Error> {
    match from {
        "beginning" => Ok(Offset::Earliest),
        "end" => Ok(Offset::Latest),
        s if s.starts_with('@') => s[1..]
            .parse()
            .map(Offset::Timestamp)
            .map_err(|_| Error::InvalidArgument(format!("--from {s}: not @UNIX_MS"))),
        s => s
            .parse()
            .map(Offset::At)
            .map_err(|_| Error::InvalidArgument(format!("--from {s}: use beginning, end, OFFSET or @UNIX_MS"))),
    }
}

fn render(r: &ConsumerRecord, format: ValueFormat) -> String {
    let text = |b: &Option<bytes::Bytes>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
    match format {
        ValueFormat::Value => text(&r.value).unwrap_or_default(),
        ValueFormat::Json => {
            let headers: serde_json::Map<String, serde_json::Value> = r
                .headers
                .iter()
                .map(|h| (h.key.clone(), text(&h.value).map_or(serde_json::Value::Null, serde_json::Value::String)))
                .collect();
            serde_json::json!({
                "topic": &*r.topic,
                "partition": r.partition,
                "offset": r.offset,
                "timestamp": r.timestamp,
                "key": text(&r.key),
                "value": text(&r.value),
                "headers": headers,
            })
            .to_string()
        }
    }
}

async fn consume(conn: ConnectionConfig, args: ConsumeArgs) -> Result<(), CliError> {
    let start = parse_from(&args.from)?;
    let admin = Admin::connect(conn.clone()).await?;
    let config = ConsumerConfig {
        connection: conn,
        group: args.group.clone(),
        auto_offset_reset: start,
        auto_commit: false,
        ..ConsumerConfig::default()
    };
    let mut consumer = Consumer::connect(config).await?;
    if args.group.is_some() && args.partition.is_none() {
        consumer.subscribe(&[args.topic.as_str()]).await?;
    } else {
        consumer.assign(&args.topic, args.partition.map(|p| vec![p])).await?;
        consumer.seek_all(start);
    }
    // Without --follow, stop at the log end as it is now.
    let info = admin.describe_topic(&args.topic).await?;
    let ends: BTreeMap<u32, i64> = info.partitions.iter().map(|p| (p.partition, p.end_offset)).collect();
    let mut printed: BTreeMap<(String, u32), i64> = BTreeMap::new();
    let mut count = 0u64;
    let mut waiting = false;
    // A failed write to stdout ends the run: what was printed before it is still committed.
    let mut unwritable: Option<std::io::Error> = None;
    let stdout = std::io::stdout();
    'outer: loop {
        if args.count.is_some_and(|c| count >= c) {
            break;
        }
        if !args.follow {
            // Joined (subscribe returned) with no partitions: the group's other members hold
            // them, and there is nothing for this one to read.
            let positions = consumer.positions();
            if positions.is_empty() {
                eprintln!("no partitions assigned to this member; the group's other members hold them");
                break;
            }
            // A position counts records fetched but not yet returned by poll as unread.
            let done =
                positions.iter().all(|((_, p), pos)| pos.is_some_and(|o| o >= ends.get(p).copied().unwrap_or(0)));
            if done {
                break;
            }
        }
        let records = match consumer.poll(Duration::from_millis(500)).await {
            Ok(records) => {
                if std::mem::take(&mut waiting) {
                    eprintln!("reading again");
                }
                records
            }
            // Following, a broker restart is waited out, said once on stderr.
            Err(e) if args.follow && e.is_retriable() => {
                if !std::mem::replace(&mut waiting, true) {
                    eprintln!("waiting for the broker: {e}");
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut out = stdout.lock();
        for r in records {
            if !args.follow && r.offset >= ends.get(&r.partition).copied().unwrap_or(i64::MAX) {
                continue;
            }
            // Stdout is line-buffered: a line that was written has reached it.
            if let Err(e) = writeln!(out, "{}", render(&r, args.format)) {
                unwritable = Some(e);
                break 'outer;
            }
            printed.insert((r.topic.to_string(), r.partition), r.offset + 1);
            count += 1;
            if args.count.is_some_and(|c| count >= c) {
                break 'outer;
            }
        }
    }
    if args.group.is_some() {
        consumer.commit_offsets(&printed).await?;
    }
    consumer.close().await?;
    match unwritable {
        // The reader went away (`| head`): a normal end, as for --count.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Some(error) => Err(CliError::Stdout { printed: count, error }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_that_stops_answering_exits_4_like_one_that_cannot_be_reached() {
        assert_eq!(exit_code(&Error::Timeout { operation: "connect", ms: 5000 }), 4);
        assert_eq!(exit_code(&Error::Timeout { operation: "request", ms: 30_000 }), 4);
        assert_eq!(exit_code(&Error::Broker { code: ErrorCode::RequestTimedOut, message: None }), 1);
        assert_eq!(exit_code(&Error::UnknownTopic("t".into())), 3);
        let full = std::io::Error::from_raw_os_error(28);
        assert_eq!(cli_exit_code(&CliError::Stdout { printed: 3, error: full }), 1);
    }
}
