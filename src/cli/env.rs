//! `serve`'s settings from the environment and from `--env-file`: every flag `--some-flag` of
//! `gearsock serve --help` can also be `GEARSOCK_SOME_FLAG`, turned here into arguments placed
//! before the command line's, so that one parser reads all of them and a flag added to the help
//! text gets its variable without code. It also remembers where each setting came from, for
//! `--print-config`. It reads the environment it is given and the one file named; it starts
//! nothing.
//!
//! Precedence: a flag on the command line, then `--env-file` (re-read on SIGHUP, so it must beat
//! the environment the process started with), then the environment, then the default.

use std::collections::BTreeMap;
use std::ffi::OsString;

/// Where a setting came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// Not given: the default.
    Default,
    /// `GEARSOCK_…` in the environment.
    Environment(String),
    /// `GEARSOCK_…` in the `--env-file`.
    File(String),
    /// On the command line.
    Flag,
}

/// One `serve` flag as its help line describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Flag {
    /// Without the dashes: `max-connections`.
    pub name: String,
    /// Takes a value (`--listen ADDR`) rather than being a switch (`--echo`).
    pub takes_value: bool,
    /// May be given more than once; from the environment as a comma-separated list.
    pub repeatable: bool,
    /// The help text's default, the last `(…)` of its first line, if any.
    pub default: String,
}

/// Flags that are one setting given two ways: either on the command line overrides both from
/// the environment (which would otherwise conflict with it).
const SAME_SETTING: &[(&str, &str)] = &[("worker-token", "worker-token-file")];

/// These are about this run of the command, not settings.
const NOT_SETTINGS: &[&str] = &["help", "version", "print-config", "env-file"];

/// The flags of a help text: lines `  --name [VALUE]  text`, with continuation lines indented.
pub(crate) fn flags(help: &str) -> Vec<Flag> {
    let mut out: Vec<Flag> = Vec::new();
    for line in help.lines() {
        if let Some(rest) = line.strip_prefix("  --") {
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap_or("").to_string();
            let value = words.next().unwrap_or("");
            let takes_value = !value.is_empty() && value.chars().all(|c| c.is_ascii_uppercase() || c == ':');
            // The default is the help line's last `(…)` up to a `;`, when it reads as a value
            // (no words without a figure: "(keeps it off the command line)" is not one).
            let default = line.trim_end().strip_suffix(')').and_then(|l| l.rsplit_once('(')).map(|(_, d)| d);
            let default = default.map(|d| d.split(';').next().unwrap_or("").to_string());
            let default = default.filter(|d| !d.contains(' ') || d.contains(|c: char| c.is_ascii_digit()));
            let default = match (takes_value, default) {
                (false, _) => "false".to_string(),
                (true, d) => d.unwrap_or_else(|| "unset".to_string()),
            };
            out.push(Flag { takes_value, repeatable: line.contains("repeatable"), default, name });
        } else if line.starts_with("      ")
            && let Some(last) = out.last_mut()
        {
            last.repeatable |= line.contains("repeatable");
        }
    }
    out.retain(|f| !NOT_SETTINGS.contains(&f.name.as_str()));
    out
}

/// `--max-connections` → `GEARSOCK_MAX_CONNECTIONS`.
pub(crate) fn var_name(flag: &str) -> String {
    format!("GEARSOCK_{}", flag.to_ascii_uppercase().replace('-', "_"))
}

/// The value of `--name` among `args` (`--name V` or `--name=V`), the last one given.
pub(crate) fn flag_value(args: &[OsString], name: &str) -> Option<String> {
    let (long, eq) = (format!("--{name}"), format!("--{name}="));
    let mut found = None;
    for (i, arg) in args.iter().enumerate() {
        let arg = arg.to_str().unwrap_or("");
        if arg == long {
            found = args.get(i + 1).and_then(|v| v.to_str()).map(String::from);
        } else if let Some(v) = arg.strip_prefix(&eq) {
            found = Some(v.to_string());
        }
    }
    found
}

/// `KEY=VALUE` lines (blank lines and `#` comments skipped, one pair of quotes removed), as
/// systemd's `EnvironmentFile=` reads them.
pub(crate) fn read_env_file(path: &str) -> Result<Vec<(String, String)>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--env-file {path:?}: cannot read it: {e}"))?;
    let mut vars = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("--env-file {path:?} line {}: expected KEY=VALUE, got {line:?}", n + 1))?;
        let value = value.trim();
        let unquoted = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|&(a, b)| value.strip_prefix(a)?.strip_suffix(b))
            .unwrap_or(value);
        vars.push((key.trim().to_string(), unquoted.to_string()));
    }
    Ok(vars)
}

/// The command line with the settings of `env` and the `file`'s variables put before it, and
/// where each setting came from. A `GEARSOCK_` variable that names no flag is refused (a typo
/// would otherwise be ignored).
pub(crate) fn with_env(
    help: &str,
    args: Vec<OsString>,
    env: impl IntoIterator<Item = (String, String)>,
    file: Option<(&str, Vec<(String, String)>)>,
) -> Result<(Vec<OsString>, BTreeMap<String, Source>), String> {
    let flags = flags(help);
    let mut given: BTreeMap<String, (String, Source)> = BTreeMap::new();
    let file_path = file.as_ref().map(|(p, _)| p.to_string()).unwrap_or_default();
    let from_env = env.into_iter().map(|(k, v)| (k.clone(), v, Source::Environment(k)));
    let from_file = file.into_iter().flat_map(|(_, vars)| vars).map(|(k, v)| (k.clone(), v, Source::File(k)));
    for (key, value, source) in from_env.chain(from_file) {
        if !key.starts_with("GEARSOCK_") || key == "GEARSOCK_ENV_FILE" || key.starts_with("GEARSOCK_TEST_") {
            continue;
        }
        let flag = flags.iter().find(|f| var_name(&f.name) == key).ok_or_else(|| {
            let place =
                if matches!(source, Source::File(_)) { format!(" in {file_path}") } else { String::new() };
            format!("{key}{place}: no such setting (each is GEARSOCK_ and a serve flag's name, see --help)")
        })?;
        given.insert(flag.name.clone(), (value, source)); // the file's comes later and wins
    }
    let mut sources: BTreeMap<String, Source> = BTreeMap::new();
    let mut out = Vec::new();
    for f in &flags {
        let given_as_flag = |name: &str| {
            args.iter().any(|a| {
                let a = a.to_str().unwrap_or("");
                a.strip_prefix("--").is_some_and(|n| n == name || n.starts_with(&format!("{name}=")))
            })
        };
        if given_as_flag(&f.name) {
            sources.insert(f.name.clone(), Source::Flag); // flags win
            continue;
        }
        let other_way = SAME_SETTING.iter().find_map(|&(a, b)| match f.name.as_str() {
            n if n == a => Some(b),
            n if n == b => Some(a),
            _ => None,
        });
        if other_way.is_some_and(given_as_flag) {
            continue; // the flag's other form wins too
        }
        let Some((value, source)) = given.remove(&f.name) else { continue };
        let var = var_name(&f.name);
        if !f.takes_value {
            match value.as_str() {
                "1" | "true" => out.push(format!("--{}", f.name).into()),
                "0" | "false" | "" => {}
                other => return Err(format!("{var}={other:?}: expected 1, true, 0 or false")),
            }
        } else if f.repeatable {
            for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                out.extend([format!("--{}", f.name).into(), part.into()]);
            }
        } else {
            out.extend([format!("--{}", f.name).into(), OsString::from(value)]);
        }
        sources.insert(f.name.clone(), source);
    }
    out.extend(args);
    Ok((out, sources))
}

/// `--print-config`: every setting, its value and where it came from; secrets as `<set>`.
pub(crate) fn print_config(help: &str, args: &[OsString], sources: &BTreeMap<String, Source>) -> String {
    let mut out = String::new();
    for f in flags(help) {
        let source = sources.get(&f.name).cloned().unwrap_or(Source::Default);
        let value = match (&source, f.takes_value) {
            (Source::Default, _) => f.default.clone(),
            (_, false) => "true".into(),
            (_, true) if f.repeatable => all_values(args, &f.name).join(","),
            (_, true) => flag_value(args, &f.name).unwrap_or_default(),
        };
        let secret = f.name.contains("token") && !f.name.ends_with("-file");
        let value = if secret && source != Source::Default { "<set>".to_string() } else { value };
        let from = match source {
            Source::Default => "default".to_string(),
            Source::Environment(var) => format!("environment {var}"),
            Source::File(var) => format!("env file {var}"),
            Source::Flag => "flag".to_string(),
        };
        out.push_str(&format!("--{:<28} {:<24} ({from})\n", f.name, value));
    }
    out
}

/// Every value of a repeatable flag, in order.
fn all_values(args: &[OsString], name: &str) -> Vec<String> {
    let long = format!("--{name}");
    let mut out = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        match arg.to_str() {
            Some(a) if a == long => out.extend(args.get(i + 1).and_then(|v| v.to_str()).map(String::from)),
            Some(a) => out.extend(a.strip_prefix(&format!("{long}=")).map(String::from)),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELP: &str = "flags:
  --listen ADDR              listen here (127.0.0.1:8080; port 0 picks one)
  --allowed-origin ORIGIN    allow this Origin
                             (repeatable; default any)
  --max-connections N        open client connections (1000)
  --worker-token T           the token
  --echo                     echo mode
  -h, --help                 this text
";

    fn os(list: &[&str]) -> Vec<OsString> {
        list.iter().map(Into::into).collect()
    }

    #[test]
    fn flags_come_from_the_help_text() {
        let f = flags(HELP);
        assert_eq!(
            f.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
            ["listen", "allowed-origin", "max-connections", "worker-token", "echo"]
        );
        assert!(f[1].repeatable && f[1].takes_value && !f[4].takes_value);
        assert_eq!((f[0].default.as_str(), f[2].default.as_str()), ("127.0.0.1:8080", "1000"));
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_the_environment() {
        let env = [
            ("GEARSOCK_MAX_CONNECTIONS", "5"),
            ("GEARSOCK_ALLOWED_ORIGIN", "https://a, https://b"),
            ("GEARSOCK_ECHO", "true"),
            ("GEARSOCK_LISTEN", ":1"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let file = vec![("GEARSOCK_LISTEN".to_string(), ":2".to_string())];
        let (args, sources) =
            with_env(HELP, os(&["--max-connections", "7"]), env, Some(("/etc/g.env", file))).unwrap();
        assert_eq!(
            args,
            os(&[
                "--listen",
                ":2",
                "--allowed-origin",
                "https://a",
                "--allowed-origin",
                "https://b",
                "--echo",
                "--max-connections",
                "7"
            ])
        );
        assert_eq!(sources["max-connections"], Source::Flag);
        assert_eq!(sources["listen"], Source::File("GEARSOCK_LISTEN".into()));
        let text = print_config(HELP, &args, &sources);
        assert!(
            text.contains("https://a,https://b") && text.contains("(environment GEARSOCK_ALLOWED_ORIGIN)"),
            "{text}"
        );
        let bad =
            |k: &str, v: &str| with_env(HELP, vec![], [(k.to_string(), v.to_string())], None).unwrap_err();
        assert!(bad("GEARSOCK_ECHO", "yes").contains("expected 1, true, 0 or false"));
        assert!(bad("GEARSOCK_MAX_CONECTIONS", "1").contains("no such setting"));
        let (args, sources) =
            with_env(HELP, vec![], [("GEARSOCK_WORKER_TOKEN".into(), "s".into())], None).unwrap();
        assert!(print_config(HELP, &args, &sources).contains("<set>"));
        let help = format!("{HELP}  --worker-token-file PATH   the same, from a file\n");
        let env = [("GEARSOCK_WORKER_TOKEN".to_string(), "s".to_string())];
        let (args, _) = with_env(&help, os(&["--worker-token-file", "/f"]), env, None).unwrap();
        assert_eq!(args, os(&["--worker-token-file", "/f"]), "the flag's other form wins too");
    }

    #[test]
    fn env_files_read_as_systemd_does() {
        let path = std::env::temp_dir().join(format!("gearsock-env-{}", std::process::id()));
        std::fs::write(
            &path,
            "# settings\n\nGEARSOCK_LOG_LEVEL=debug\nGEARSOCK_ALLOWED_ORIGIN=\"https://a\"\n",
        )
        .unwrap();
        let vars = read_env_file(path.to_str().unwrap()).unwrap();
        assert_eq!(vars[1], ("GEARSOCK_ALLOWED_ORIGIN".to_string(), "https://a".to_string()));
        std::fs::write(&path, "nonsense\n").unwrap();
        assert!(read_env_file(path.to_str().unwrap()).unwrap_err().contains("line 1"));
        std::fs::remove_file(&path).unwrap();
    }
}
