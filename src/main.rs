//! `gearsock`: pick the subcommand, load its configuration, run it. Nothing else.

use std::io::Write;
use std::process::ExitCode;

use gearsock::cli::{Command, parse_args};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let command = match parse_args(args.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let result: Result<i32, Box<dyn std::error::Error>> = match command {
        Command::Help(text) => {
            print!("{text}");
            Ok(0)
        }
        // Several processes: this one supervises them (it serves no client itself).
        Command::Serve(cfg) if cfg.processes > 1 && cfg.group_child.is_none() => {
            gearsock::logging::init_as(cfg.log_level, "group");
            gearsock::group::supervisor::run(&cfg, &args)
        }
        Command::Serve(cfg) => {
            let who = cfg.group_child.map(|g| format!("p{}", g.slot)).unwrap_or_default();
            gearsock::logging::init_as(cfg.log_level, &who);
            gearsock::server::Server::bind(&cfg)
                .and_then(|mut server| {
                    // SIGHUP reads the settings again the way they were read now.
                    server.set_reload(move || match parse_args(args.clone())? {
                        Command::Serve(cfg) => Ok(*cfg),
                        _ => Err("the command line no longer names serve".into()),
                    });
                    println!("listening on ws://{}", server.local_addr());
                    let _ = std::io::stdout().flush();
                    server.run()
                })
                .map(|()| 0)
                .map_err(Into::into)
        }
        Command::Worker(opts) => {
            gearsock::logging::init(log::LevelFilter::Warn);
            gearsock::worker::run_worker(&opts).map(|()| 0)
        }
        Command::Submit(opts) => gearsock::submit::run_submit(&opts),
        Command::Token(opts) => gearsock::mint::run_token(&opts),
        #[cfg(feature = "bench")]
        Command::Bench(opts) => gearsock::bench::run_bench(&opts),
    };
    // The log is written by its own thread: let it finish before the process ends.
    gearsock::logging::flush(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("gearsock: {e}");
            ExitCode::FAILURE
        }
    }
}
