//! `cairn-bench`: throughput and latency of Cairn on the real path (client library, TCP, broker).

mod latency;
mod report;
mod suite;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use cairn_client::Acks;
use workload::Opts;

/// The load generator allocates and frees a batch's pieces, a request's chunks and a
/// response's results per request on every producer; glibc's allocator spent a quarter of its
/// CPU there on the 1,000-partition workload (P6), and the load generator's CPU is CPU the
/// broker does not get on a shared machine.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for Cairn.
#[derive(Debug, Parser)]
#[command(name = "cairn-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Produce records as fast as possible (or at --rate); latency = send to acknowledgement.
    Produce(Common),
    /// Consume a topic from offset 0; latency = duration of each poll.
    Consume(Common),
    /// Fixed-rate end-to-end latency: producer send (intended time) to consumer arrival.
    E2e(Common),
    /// Start a fresh broker (release build) on a temp dir, run the standard workloads, print a
    /// markdown table.
    Suite(SuiteArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AcksArg {
    None,
    Leader,
    All,
}

#[derive(Debug, Args)]
struct Common {
    /// Broker address.
    #[arg(long, env = "CAIRN_BROKER", default_value = "127.0.0.1:7070")]
    broker: String,
    /// Topic (created if missing).
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Partitions of the topic: it is created with these (default 1). A topic that exists
    /// already is used as it is, unless this asks for another partition count (an error).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    partitions: Option<u32>,
    /// Concurrent producers (one connection each).
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Concurrent consumers (one connection each).
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Records to measure; without it, run for --duration.
    #[arg(long)]
    messages: Option<u64>,
    /// Seconds to run when --messages is not given (at a fixed --rate: send every record
    /// scheduled within them, however late, so that a stall's records count in the latency).
    /// Produce and e2e only: consume reads --messages records, or everything the topic holds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Record value size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Producer batch size in bytes.
    #[arg(long, default_value_t = 512 * 1024)]
    batch_bytes: usize,
    /// Producer linger in ms (default 5; 0 for e2e).
    #[arg(long)]
    linger_ms: Option<u64>,
    /// Producer acks.
    #[arg(long, value_enum, default_value_t = AcksArg::Leader)]
    acks: AcksArg,
    /// Fixed total send rate in records/s (e2e default 10,000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    rate: Option<u64>,
    /// Keyed records over N distinct keys, at most 1,000,000 (0 = no keys).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=1_000_000))]
    keys: u64,
    /// Warm-up before measuring, unmeasured: records per producer for produce (default 50,000)
    /// and e2e (default one second at --rate); records a throwaway consumer reads first for
    /// consume (default 100,000). 0 skips it.
    #[arg(long)]
    warmup: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Draw the latency percentile curve and throughput over time into an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Worker threads of the load generator's runtime (default: one per core). One keeps a
    /// low-rate latency run free of the load generator's own cross-thread wake-ups.
    #[arg(long)]
    workers: Option<usize>,
}

#[derive(Debug, Args)]
struct SuiteArgs {
    /// Scale the standard record counts (1.0 = the sizes in BENCHMARKS.md).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// The broker binary (default: cairn-broker next to this executable).
    #[arg(long)]
    broker_bin: Option<PathBuf>,
}

/// The warm-up a workload gets when `--warmup` is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Produce,
    Consume,
    E2e,
}

fn opts(c: &Common, workload: Workload) -> Opts {
    let e2e = workload == Workload::E2e;
    let producers = c.producers.max(1);
    let warmup = c.warmup.unwrap_or(match workload {
        Workload::Produce => 50_000,
        Workload::Consume => 100_000,
        Workload::E2e => (c.rate.unwrap_or(workload::E2E_RATE) / producers as u64).max(1),
    });
    Opts {
        broker: c.broker.clone(),
        topic: c.topic.clone(),
        partitions: c.partitions,
        producers,
        consumers: c.consumers.max(1),
        messages: c.messages,
        duration: Duration::from_secs(c.duration),
        size: c.size,
        batch_bytes: c.batch_bytes,
        linger: Duration::from_millis(c.linger_ms.unwrap_or(if e2e { 0 } else { 5 })),
        acks: match c.acks {
            AcksArg::None => Acks::None,
            AcksArg::Leader => Acks::Leader,
            AcksArg::All => Acks::All,
        },
        rate: c.rate,
        keys: c.keys,
        warmup,
        progress: !c.json,
        command: command_line(std::env::args(), std::env::var("CAIRN_BROKER").ok()),
    }
}

/// The command line as a shell would take it back: arguments quoted where needed, and the
/// broker address from `CAIRN_BROKER` when no `--broker` was given.
fn command_line(args: impl Iterator<Item = String>, env_broker: Option<String>) -> String {
    let quote = |a: &str| {
        let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c);
        if !a.is_empty() && a.chars().all(plain) {
            a.to_owned()
        } else {
            format!("'{}'", a.replace('\'', "'\\''"))
        }
    };
    let args: Vec<String> = args.collect();
    let mut out: Vec<String> = args.iter().map(|a| quote(a)).collect();
    if let Some(b) = env_broker.filter(|_| !args.iter().any(|a| a == "--broker" || a.starts_with("--broker="))) {
        out.insert(0, format!("CAIRN_BROKER={}", quote(&b)));
    }
    out.join(" ")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (common, report) = match &cli.command {
        Command::Produce(c) => (c, workload::produce(&opts(c, Workload::Produce)).await?),
        Command::Consume(c) => {
            if c.rate.is_some() {
                anyhow::bail!("--rate paces producers: it applies to produce and e2e, not to consume");
            }
            (c, workload::consume(&opts(c, Workload::Consume)).await?)
        }
        Command::E2e(c) => (c, workload::e2e(&opts(c, Workload::E2e)).await?),
        Command::Suite(s) => return suite::run(s.scale, s.broker_bin.clone()).await,
    };
    if common.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print();
    }
    if let Some(path) = &common.plot {
        report.plot(path)?;
        if !common.json {
            println!("plot          {}", path.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Produce(c) | Command::Consume(c) | Command::E2e(c) = &cli.command {
        if let Some(n) = c.workers {
            builder.worker_threads(n.max(1));
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cairn-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::command_line;

    fn args(a: &[&str]) -> impl Iterator<Item = String> {
        a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn the_reported_command_line_can_be_run_again() {
        let line = command_line(args(&["cairn-bench", "produce", "--topic", "it's", "--size", "1024"]), None);
        assert_eq!(line, r"cairn-bench produce --topic 'it'\''s' --size 1024");
        let line = command_line(args(&["cairn-bench", "produce"]), Some("10.0.0.1:7070".into()));
        assert_eq!(line, "CAIRN_BROKER=10.0.0.1:7070 cairn-bench produce");
        let line = command_line(args(&["cairn-bench", "produce", "--broker", "h:1"]), Some("x:2".into()));
        assert_eq!(line, "cairn-bench produce --broker h:1");
    }
}
