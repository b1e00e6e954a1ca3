//! `gearsock token`'s flags, parsed into `TokenOptions`.

use std::time::Duration;

use super::{Command, VERSION, value};
use crate::jwt::MAX_SUB_BYTES;
use crate::mint::TokenOptions;

pub(super) const TOKEN_HELP: &str = "\
gearsock token: print a signed client token (HS256 JWT), for development, tests and curl

usage: gearsock token --key-file PATH --sub NAME [flags]

flags:
  --key-file PATH        the server's --client-token-key-file; its first secret signs (required)
  --sub NAME             the client's name, 1 to 128 bytes (required)
  --ttl DURATION         how long it is valid: 90s, 30m, 1h, 2d, or seconds (1h)
  --function PATTERN     a function it may submit, exact or a prefix ending in * (repeatable;
                         none: what the server allows)
  --max-jobs N           at most N unfinished jobs per connection (the server's limit if lower)
  -h, --help             this text
  -V, --version          the version
";

/// Parses `gearsock token` flags.
pub(super) fn parse_token(parser: &mut lexopt::Parser) -> Result<Command, String> {
    use lexopt::Arg::{Long, Short};
    let mut o = TokenOptions {
        key_file: String::new(),
        sub: String::new(),
        ttl: Duration::from_secs(3600),
        functions: Vec::new(),
        max_jobs: None,
    };
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("key-file") => o.key_file = value(parser)?,
            Long("sub") => o.sub = value(parser)?,
            Long("ttl") => o.ttl = duration(&value::<String>(parser)?)?,
            Long("function") => o.functions.push(value(parser)?),
            Long("max-jobs") => o.max_jobs = Some(value(parser)?),
            Long("help") | Short('h') => return Ok(Command::Help(TOKEN_HELP.into())),
            Long("version") | Short('V') => return Ok(Command::Help(VERSION.into())),
            other => return Err(other.unexpected().to_string()),
        }
    }
    if o.key_file.is_empty() {
        return Err("--key-file PATH is required (the server's --client-token-key-file)".into());
    }
    if o.sub.is_empty() || o.sub.len() > MAX_SUB_BYTES {
        return Err(format!("--sub must be 1 to {MAX_SUB_BYTES} bytes"));
    }
    if o.functions.iter().any(String::is_empty) {
        return Err("--function: a pattern cannot be empty".into());
    }
    Ok(Command::Token(o))
}

/// `90s`, `30m`, `1h`, `2d` or plain seconds; more than zero.
fn duration(text: &str) -> Result<Duration, String> {
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = digits.parse().map_err(|_| format!("--ttl {text:?}: a number then s, m, h or d"))?;
    let per = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("--ttl {text:?}: the unit is s, m, h or d")),
    };
    match n.checked_mul(per) {
        Some(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err(format!("--ttl {text:?}: more than zero, and less than forever")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(list: &[&str]) -> Result<TokenOptions, String> {
        let mut parser = lexopt::Parser::from_args(list.iter().map(std::ffi::OsString::from));
        match parse_token(&mut parser)? {
            Command::Token(o) => Ok(o),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn flags_fill_the_claims_and_bad_ones_are_named() {
        let o = token(&[
            "--key-file",
            "k",
            "--sub",
            "a",
            "--ttl",
            "30m",
            "--function",
            "resize*",
            "--max-jobs",
            "2",
        ])
        .expect("parses");
        assert_eq!(
            (o.ttl, o.functions, o.max_jobs),
            (Duration::from_secs(1800), vec!["resize*".into()], Some(2))
        );
        assert_eq!(
            token(&["--key-file", "k", "--sub", "a", "--ttl", "90"]).unwrap().ttl,
            Duration::from_secs(90)
        );
        assert!(token(&["--sub", "a"]).unwrap_err().contains("--key-file"));
        assert!(token(&["--key-file", "k"]).unwrap_err().contains("--sub"));
        assert!(token(&["--key-file", "k", "--sub", "a", "--ttl", "1w"]).unwrap_err().contains("unit"));
        assert!(
            token(&["--key-file", "k", "--sub", "a", "--ttl", "0"]).unwrap_err().contains("more than zero")
        );
    }
}
