//! The house rules of docs/ARCHITECTURE.md that a compiler does not check, checked on the
//! source text: who reads an `io::Error`'s kind, who touches sockets and the clock, which way
//! imports point, and how big a room may grow. Each failure names the file and the rule.

use std::fs;
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, as a path relative to `src/` (`server/io.rs`).
fn sources() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    let mut names: Vec<String> = files
        .iter()
        .map(|p| p.strip_prefix(&root).expect("under src").to_string_lossy().replace('\\', "/"))
        .collect();
    names.sort();
    names
}

fn read(name: &str) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(name)).expect("read source")
}

/// The file without its unit tests (everything from the first `#[cfg(test)]` on) and without
/// comment lines, so that a rule is about code, not about what a test or a comment mentions.
fn code(name: &str) -> String {
    let text = read(name);
    let end = text.find("#[cfg(test)]").unwrap_or(text.len());
    text[..end].lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// A module path's first segment: `server/io.rs` -> `server`, `app/mod.rs` -> `app`, `ws.rs` -> `ws`.
fn top(name: &str) -> &str {
    name.split('/').next().unwrap_or(name).trim_end_matches(".rs")
}

/// The files where `needle` appears in code, outside the allowed tops and files.
fn offenders(needle: &str, allowed: &[&str]) -> Vec<String> {
    sources()
        .into_iter()
        .filter(|f| !allowed.iter().any(|a| a == f || *a == top(f)))
        .filter(|f| code(f).contains(needle))
        .collect()
}

/// The sans-IO cores: they decide, and are handed bytes, events and `now`.
const CORES: &[&str] = &["app", "connection", "ws", "http", "gearman", "wheel", "metrics", "buf", "jwt"];

#[test]
fn only_server_io_interprets_an_io_error_in_the_loop() {
    // The loop's socket results are interpreted in server/io.rs; connection.rs is handed the
    // kind as data (a close reason); ws/stream.rs returns WouldBlock from its own in-memory
    // stream to tungstenite, and ws.rs reads it back. The blocking programs (worker, submit, the load generator
    // and a group's supervisor), getrandom's EINTR in random.rs, and errors made (not read) in
    // os.rs and group/board.rs are not the loop.
    let allowed = [
        "server/io.rs",
        "connection.rs",
        "ws.rs",
        "ws/stream.rs",
        "worker.rs",
        "submit.rs",
        "random.rs",
        "os.rs",
        "group",
        "bench",
    ];
    assert_eq!(offenders("ErrorKind", &allowed), Vec::<String>::new(), "who names io::ErrorKind");
}

#[test]
fn the_cores_touch_no_socket_no_clock_and_no_config() {
    for core in CORES {
        for file in sources().into_iter().filter(|f| top(f) == *core) {
            let text = code(&file);
            for banned in [
                "mio::",
                "std::net::TcpStream",
                "Instant::now",
                "SystemTime::now",
                "crate::config",
                "crate::server",
                "crate::cli",
            ] {
                assert!(!text.contains(banned), "{file}: a core must not use {banned}");
            }
        }
    }
}

#[test]
fn only_the_server_and_the_load_generator_use_mio() {
    assert_eq!(offenders("mio::", &["server", "bench", "lib.rs"]), Vec::<String>::new());
}

#[test]
fn config_is_a_leaf_and_only_main_uses_cli() {
    let config = code("config.rs");
    let imports: Vec<&str> = config.lines().filter(|l| l.contains("crate::")).collect();
    let leaf = |l: &&str| l.contains("crate::os") || l.contains("crate::random");
    assert!(imports.iter().all(leaf), "config.rs imports only os and random: {imports:?}");
    assert_eq!(offenders("crate::cli", &["cli"]), Vec::<String>::new(), "cli is for main.rs only");
}

#[test]
fn nothing_but_the_command_line_uses_the_load_generator() {
    assert_eq!(offenders("crate::bench", &["bench", "cli"]), Vec::<String>::new());
}

#[test]
fn rooms_fit_on_a_desk() {
    for file in sources() {
        let lines = read(&file).lines().count();
        let limit = if top(&file) == "app" { 650 } else { 1300 };
        assert!(lines <= limit, "{file} has {lines} lines (at most {limit} here)");
    }
}
