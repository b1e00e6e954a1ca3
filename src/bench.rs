//! `gearsock bench`: the load generator (being written; see issue 4).

/// Options of `gearsock bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The mode: connect, roundtrip or jobs.
    pub mode: String,
}

/// Parses `gearsock bench` flags.
pub fn parse_bench(parser: &mut lexopt::Parser) -> Result<crate::config::Command, String> {
    let mut mode = None;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            lexopt::Arg::Value(v) => mode = Some(v.into_string().map_err(|_| "mode is not UTF-8")?),
            other => return Err(other.unexpected().to_string()),
        }
    }
    Ok(crate::config::Command::Bench(BenchOptions { mode: mode.ok_or("MODE is missing")? }))
}

/// Runs the benchmark.
pub fn run_bench(opts: &BenchOptions) -> Result<i32, Box<dyn std::error::Error>> {
    Err(format!("bench mode {:?} is not available yet", opts.mode).into())
}
