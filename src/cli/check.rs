//! The command line's own checks of what a flag's text means: addresses (`HOST:PORT`,
//! `--listen`'s `:PORT` and host names), log levels and report URLs, each refused with the
//! flag, the value and what would be valid (`HOST:PORT` itself is `config`'s, which checks it
//! again for every source). It opens no socket; a `--listen` host name is
//! looked up once, here, before anything starts (the one blocking lookup of a start).

use std::net::{SocketAddr, ToSocketAddrs};

pub(crate) use crate::config::host_port;
use crate::config::is_host;

/// What `--listen` takes: `IP:PORT`, `HOST:PORT` (looked up now, the first address is used),
/// or `:PORT` for every address, as nginx and Go read it. Port 0 picks a free port.
pub(crate) fn listen_addr(text: &str) -> Result<SocketAddr, String> {
    let bad = |why: &str| {
        format!(
            "--listen {text:?}: {why}; expected IP:PORT, HOST:PORT or :PORT (127.0.0.1:8080, localhost:8080, :0)"
        )
    };
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("the port is 0 to 65535"))?;
    if host.is_empty() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if !is_host(host) {
        return Err(bad("not a host name"));
    }
    let mut found = (host, port).to_socket_addrs().map_err(|e| bad(&format!("cannot look it up ({e})")))?;
    found.next().ok_or_else(|| bad("the name has no address"))
}

/// `--log-level`'s value.
pub(crate) fn log_level(text: &str) -> Result<log::LevelFilter, String> {
    text.parse().map_err(|_| format!("{text:?}: expected off, error, warn, info, debug or trace"))
}

/// `worker --report`: the worker speaks plain `ws://` only (its client has no TLS).
pub(crate) fn report_url(text: &str) -> Result<String, String> {
    match text.strip_prefix("ws://") {
        Some(rest) if !rest.is_empty() => Ok(text.to_string()),
        _ => Err(format!(
            "{text:?}: expected a ws:// URL (ws://127.0.0.1:8080); the worker has no TLS, so \
             wss:// goes through a local ws:// listener, and http:// is not a WebSocket"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gearmand_addresses_need_a_host_and_a_port() {
        for good in ["127.0.0.1:4730", "gear.example:4730", "[::1]:4730", "localhost:1"] {
            assert_eq!(host_port("--gearmand", good), Ok(()), "{good}");
        }
        for bad in ["nohost", "127.0.0.1:abc", ":4730", "h:0", "h:70000", "[::1:4730", "a b:1"] {
            let err = host_port("--gearmand", bad).unwrap_err();
            assert!(err.starts_with(&format!("--gearmand {bad:?}")) && err.contains("HOST:PORT"), "{err}");
        }
    }

    #[test]
    fn listen_takes_a_bare_port_and_host_names() {
        assert_eq!(listen_addr(":0"), Ok(SocketAddr::from(([0, 0, 0, 0], 0))));
        assert_eq!(listen_addr("127.0.0.1:8080"), Ok(SocketAddr::from(([127, 0, 0, 1], 8080))));
        assert!(listen_addr("localhost:8080").is_ok_and(|a| a.ip().is_loopback() && a.port() == 8080));
        for bad in ["8080", "localhost:http", "a/b:1", "1.2.3.4:99999"] {
            assert!(listen_addr(bad).unwrap_err().contains("expected IP:PORT"), "{bad}");
        }
    }

    #[test]
    fn levels_and_report_urls_say_what_is_valid() {
        assert_eq!(log_level("debug"), Ok(log::LevelFilter::Debug));
        assert!(log_level("loud").unwrap_err().contains("off, error, warn, info, debug or trace"));
        assert!(report_url("ws://127.0.0.1:8080").is_ok());
        for bad in ["wss://x", "http://x", "ws://"] {
            assert!(report_url(bad).unwrap_err().contains("expected a ws:// URL"), "{bad}");
        }
    }
}
