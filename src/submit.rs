//! `gearsock submit FUNCTION [PAYLOAD]`: the article's `gearman-client.php`, over one blocking
//! gearmand connection.
//!
//! This module owns that command's socket and its printed lines. The protocol is
//! `gearman::ClientSession`'s; this module only moves bytes and prints events. It blocks, so it
//! must never be used from the event-loop server.

use std::error::Error;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use crate::buf::InBuf;
use crate::gearman::client::{ClientSession, JobEvent, JobMode, JobTag, Priority};
use crate::worker::{DEFAULT_MAX_BODY_BYTES, say};

/// The article's line after `runTasks()` / `doBackground()` returns.
const BEFORE_RECEIVED: &str = "before the 'received' message";

/// Options of `gearsock submit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmitOptions {
    /// gearmand address, `host:port`. Default `127.0.0.1:4730`.
    pub gearmand: String,
    /// The function to call.
    pub function: String,
    /// The workload. Default empty.
    pub payload: Vec<u8>,
    /// Submit a background job and poll its status (`--background`). Default false.
    pub background: bool,
    /// Queue level (`--priority`). Default normal.
    pub priority: Priority,
    /// Unique id; empty (the default) makes every submission its own job.
    pub unique: String,
    /// Pause between status polls of a background job, in milliseconds. Default 1000, as the
    /// article's `sleep(1)`.
    pub poll_interval_ms: u64,
}

impl Default for SubmitOptions {
    fn default() -> Self {
        SubmitOptions {
            gearmand: "127.0.0.1:4730".into(),
            function: String::new(),
            payload: b"noop".to_vec(), // the article's workload
            background: false,
            priority: Priority::Normal,
            unique: String::new(),
            poll_interval_ms: 1000,
        }
    }
}

/// Runs `gearsock submit` and returns the process exit code.
///
/// Foreground: prints `sending`, then `data: …` per WORK_DATA (and `warning: …` per
/// WORK_WARNING; WORK_STATUS and the result go to stderr as `status: n/d` and
/// `complete: <result>`, so stdout shows exactly the article's lines), then `failed`,
/// `exception: …` or `error: CODE message`, and last the article's
/// `before the 'received' message`. Exit code 0 on completion, 1 otherwise.
///
/// Background: prints `sending`, `before the 'received' message` once gearmand created the job,
/// then `checking` per status poll until gearmand no longer knows the job. Exit code 0 (1 if
/// gearmand refused the job).
///
/// A lost or failed gearmand connection is an `Err`.
pub fn run_submit(opts: &SubmitOptions) -> Result<i32, Box<dyn Error>> {
    if opts.function.is_empty() {
        return Err("a function name is required".into());
    }
    let mut link = Link::connect(&opts.gearmand)?;
    link.session.start(&mut link.out);
    say("sending");
    let mode = if opts.background { JobMode::Background } else { JobMode::Foreground };
    link.session.submit(
        JobTag(1),
        opts.function.as_bytes(),
        opts.unique.as_bytes(),
        &opts.payload,
        mode,
        opts.priority,
        &mut link.out,
    );
    link.flush()?;
    if opts.background {
        run_background(&mut link, Duration::from_millis(opts.poll_interval_ms))
    } else {
        run_foreground(&mut link)
    }
}

/// Prints the job's stream until its terminal event.
fn run_foreground(link: &mut Link) -> Result<i32, Box<dyn Error>> {
    let code = loop {
        match link.next_event()? {
            JobEvent::Created { .. }
            | JobEvent::StatusRes { .. }
            | JobEvent::StatusFailed { .. }
            | JobEvent::Forwarded { .. } => {}
            JobEvent::Data { data, .. } => say(&format!("data: {}", String::from_utf8_lossy(&data))),
            JobEvent::Warning { data, .. } => say(&format!("warning: {}", String::from_utf8_lossy(&data))),
            JobEvent::Status { numerator, denominator, .. } => {
                // Progress goes to stderr: stdout keeps the article's exact lines.
                eprintln!("status: {numerator}/{denominator}");
            }
            JobEvent::Complete { data, .. } => {
                // The result goes to stderr too: the article's client prints none.
                eprintln!("complete: {}", String::from_utf8_lossy(&data));
                break 0;
            }
            JobEvent::Failed { .. } | JobEvent::TooLarge { .. } => {
                say("failed");
                break 1;
            }
            JobEvent::Exception { data, .. } => {
                say(&format!("exception: {}", String::from_utf8_lossy(&data)));
                break 1;
            }
            JobEvent::Rejected { code, message, .. } => {
                say(&format!("error: {code} {message}"));
                break 1;
            }
        }
    };
    say(BEFORE_RECEIVED);
    Ok(code)
}

/// Waits for JOB_CREATED, then polls GET_STATUS until the job is unknown (done or gone).
fn run_background(link: &mut Link, poll_interval: Duration) -> Result<i32, Box<dyn Error>> {
    let handle = loop {
        match link.next_event()? {
            JobEvent::Created { handle, .. } => break handle,
            JobEvent::Rejected { code, message, .. } => {
                say(&format!("error: {code} {message}"));
                return Ok(1);
            }
            _ => {}
        }
    };
    say(BEFORE_RECEIVED);
    loop {
        thread::sleep(poll_interval);
        say("checking");
        link.session.get_status(&handle, 0, &mut link.out);
        link.flush()?;
        let known = loop {
            if let JobEvent::StatusRes { known, .. } = link.next_event()? {
                break known;
            }
        };
        if !known {
            return Ok(0);
        }
    }
}

/// The command's one gearmand connection.
struct Link {
    stream: TcpStream,
    session: ClientSession,
    input: InBuf,
    out: Vec<u8>,
    scratch: Vec<u8>,
}

impl Link {
    fn connect(addr: &str) -> io::Result<Link> {
        let stream = TcpStream::connect(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot connect to gearmand {addr}: {e}")))?;
        stream.set_nodelay(true)?;
        Ok(Link {
            stream,
            session: ClientSession::new(DEFAULT_MAX_BODY_BYTES),
            input: InBuf::new(DEFAULT_MAX_BODY_BYTES),
            out: Vec::new(),
            scratch: vec![0; 64 * 1024],
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        let result = self.stream.write_all(&self.out);
        self.out.clear();
        result
    }

    /// The next event, reading from gearmand as long as none is queued.
    fn next_event(&mut self) -> Result<JobEvent, Box<dyn Error>> {
        loop {
            if let Some(event) = self.session.poll_event() {
                return Ok(event);
            }
            let n = match self.stream.read(&mut self.scratch) {
                Ok(0) => return Err("gearmand closed the connection".into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.input.extend(&self.scratch[..n]);
            self.session.handle_input(&mut self.input)?;
        }
    }
}
