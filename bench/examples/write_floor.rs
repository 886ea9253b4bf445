//! The kernel's floor for a write pattern: `write_floor DIR FILES WRITE_BYTES TOTAL_BYTES`
//! creates `FILES` fresh files in `DIR` and writes `TOTAL_BYTES` into them with positioned
//! writes of `WRITE_BYTES` each, round robin, then prints the CPU time and wall time it took.
//! Nothing else happens in the loop, so its CPU time is what the page cache charges for that
//! pattern: P6's is `1000 13400` (1,000 partitions, ~13 KB batches), P2's `4 524288`.
//! See BENCHMARKS.md ("P6 against a fast P2: the floor").

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, files, write_bytes, total] = args.as_slice() else {
        anyhow::bail!("usage: write_floor DIR FILES WRITE_BYTES TOTAL_BYTES");
    };
    let (files, write_bytes, total): (usize, usize, u64) = (files.parse()?, write_bytes.parse()?, total.parse()?);
    anyhow::ensure!(files > 0 && write_bytes > 0, "FILES and WRITE_BYTES must be positive");
    let handles: Vec<File> = (0..files)
        .map(|i| File::create(std::path::Path::new(dir).join(format!("f{i:05}"))))
        .collect::<Result<_, _>>()?;
    let buf = vec![b'x'; write_bytes];
    let mut at = vec![0u64; files];
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    let mut done = 0u64;
    let mut i = 0;
    while done < total {
        handles[i].write_all_at(&buf, at[i])?;
        at[i] += write_bytes as u64;
        done += write_bytes as u64;
        i = (i + 1) % files;
    }
    let (cpu, wall) = (cpu_seconds() - cpu0, wall0.elapsed().as_secs_f64());
    let gb = done as f64 / 1e9;
    println!(
        "{files} files, {write_bytes}-byte writes, {done} bytes: cpu {cpu:.2} s ({:.2} s/GB), wall {wall:.2} s, {:.2} GB/s",
        cpu / gb,
        gb / wall
    );
    Ok(())
}

/// User plus system CPU time of this process so far.
fn cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}
