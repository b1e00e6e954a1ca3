//! scripts/demo.sh, as a user runs it in a terminal: it starts gearmand, the server and the
//! worker, waits for the server to listen, and one Ctrl-C (SIGINT to the terminal's foreground
//! group, as a real terminal sends it) stops all three within 2 s, leaving nothing behind. A
//! taken port stops it with a message instead of a worker talking to someone else's program.
//! Driven through a pseudo-terminal by Python's standard `pty` module.

mod common;

use std::process::Command;

use common::{BIN, free_port};

/// Runs the demo in a pseudo-terminal; prints what the driver saw as JSON.
const DRIVER: &str = r#"
import json, os, pty, signal, sys, time
script, env_json, ctrl_c = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
env = dict(os.environ, **json.loads(env_json))
pid, fd = pty.fork()
if pid == 0:
    os.execvpe("bash", ["bash", script], env)
out = b""
def read_for(seconds, until=None):
    global out
    end = time.time() + seconds
    while time.time() < end:
        try:
            import select
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk: return False
                out += chunk
        except OSError:
            return False
        if until and until in out: return True
    return False
ready = read_for(30, b"Ctrl-C stops everything")
result = {"ready": ready}
if ctrl_c and ready:
    read_for(1)
    os.write(fd, b"\x03")  # the terminal's Ctrl-C: SIGINT to the foreground process group
    t0 = time.time()
    status = None
    while time.time() - t0 < 5:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done: break
        read_for(0.05)
    result["exit_s"] = round(time.time() - t0, 2)
    result["exited"] = status is not None and done == pid
else:
    t0 = time.time()
    while time.time() - t0 < 10:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done: result["exited"] = True; result["status"] = os.waitstatus_to_exitcode(status); break
        read_for(0.05)
read_for(0.2)
result["output"] = out.decode(errors="replace")
print(json.dumps(result))
"#;

fn run_demo(env: &[(&str, String)], ctrl_c: bool) -> serde_json::Value {
    let script = format!("{}/scripts/demo.sh", env!("CARGO_MANIFEST_DIR"));
    let env: serde_json::Map<String, serde_json::Value> =
        env.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone()))).collect();
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            DRIVER,
            &script,
            &serde_json::Value::Object(env).to_string(),
            if ctrl_c { "1" } else { "0" },
        ])
        .output()
        .expect("run the pty driver");
    assert!(out.status.success(), "driver: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("driver JSON")
}

/// PIDs of processes whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let out = Command::new("pgrep").args(["-f", needle]).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect()
}

fn demo_env(gearmand_port: u16, listen: &str, logs: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("GEARMAND_PORT", gearmand_port.to_string()),
        ("LISTEN", listen.to_string()),
        ("LOG_DIR", logs.display().to_string()),
        ("SKIP_BUILD", "1".into()),
        ("BIN", BIN.to_string()),
    ]
}

#[test]
fn one_ctrl_c_stops_the_whole_demo_within_two_seconds() {
    let (gport, port) = (free_port(), free_port());
    let listen = format!("127.0.0.1:{port}");
    let logs = std::env::temp_dir().join(format!("gearsock-demo-{}", std::process::id()));
    let r = run_demo(&demo_env(gport, &listen, &logs), true);
    let output = r["output"].as_str().unwrap_or("");
    assert_eq!(r["ready"], true, "the demo never said it was ready:\n{output}");
    assert!(output.contains(&format!("listening on ws://{listen}")), "{output}");
    assert!(output.contains("worker | waiting"), "{output}");
    assert!(output.contains(&format!("its log: {}/gearmand.log", logs.display())), "{output}");
    assert_eq!(r["exited"], true, "demo.sh still running 5 s after Ctrl-C:\n{output}");
    let secs = r["exit_s"].as_f64().unwrap_or(99.0);
    assert!(secs <= 2.0, "demo.sh took {secs} s to stop:\n{output}");
    assert!(output.contains("worker | stopped"), "the worker stopped on its own:\n{output}");
    for needle in [format!("--port={gport}"), format!("--listen {listen}"), format!("ws://{listen}")] {
        assert_eq!(processes_with(&needle), Vec::<String>::new(), "left running: {needle}");
    }
    assert!(logs.join("gearmand.log").exists(), "gearmand's log is where the demo said");
    std::fs::remove_dir_all(&logs).ok();
}

#[test]
fn a_taken_port_stops_the_demo_with_a_message() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("addr").to_string();
    let gport = free_port();
    let logs = std::env::temp_dir().join(format!("gearsock-demo-taken-{}", std::process::id()));
    let r = run_demo(&demo_env(gport, &listen, &logs), false);
    let output = r["output"].as_str().unwrap_or("");
    assert_eq!(r["exited"], true, "{output}");
    assert_eq!(r["status"], 1, "{output}");
    assert!(output.contains(&format!("the server did not start (is {listen} taken")), "{output}");
    assert!(!output.contains("starting the article's worker"), "{output}");
    assert_eq!(processes_with(&format!("--port={gport}")), Vec::<String>::new(), "gearmand left running");
    std::fs::remove_dir_all(&logs).ok();
}
