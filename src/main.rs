//! `gearsock`: pick the subcommand, load its configuration, run it. Nothing else.

use std::io::Write;
use std::process::ExitCode;

use gearsock::config::{Command, parse_args};

fn main() -> ExitCode {
    let command = match parse_args(std::env::args_os().skip(1).collect()) {
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
        Command::Serve(cfg) => {
            let _ = simple_logger::SimpleLogger::new().with_level(cfg.log_level).init();
            gearsock::server::Server::bind(&cfg)
                .and_then(|mut server| {
                    println!("listening on ws://{}", server.local_addr());
                    let _ = std::io::stdout().flush();
                    server.run()
                })
                .map(|()| 0)
                .map_err(Into::into)
        }
        Command::Worker(opts) => {
            let _ = simple_logger::SimpleLogger::new().with_level(log::LevelFilter::Warn).init();
            gearsock::worker::run_worker(&opts).map(|()| 0)
        }
        Command::Submit(opts) => gearsock::submit::run_submit(&opts),
        Command::Bench(opts) => gearsock::bench::run_bench(&opts),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("gearsock: {e}");
            ExitCode::FAILURE
        }
    }
}
