//! The loop's fixed tokens and the mapping between a client's `ConnId` and its `Token`.
//!
//! `LISTENER`, `SIGNALS`, `RESOLVER` and `ADMIN` come first, then one token per `--gearmand` link, then clients:
//! a client's token is its slab key plus `first_client`. Numbers only: it knows nothing of what
//! a link or a client is.

use mio::Token;

/// The WebSocket/HTTP listener.
pub(crate) const LISTENER: Token = Token(0);
/// The signal pipe (SIGINT, SIGTERM).
pub(crate) const SIGNALS: Token = Token(1);
/// The resolver thread's waker (a host name was looked up).
pub(crate) const RESOLVER: Token = Token(2);
/// The admin listener (`--admin-listen`).
pub(crate) const ADMIN: Token = Token(3);
/// The first gearmand link.
const FIRST_LINK: usize = 4;

/// What a token names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tok {
    /// The listener.
    Listener,
    /// The signal pipe.
    Signals,
    /// The resolver's waker.
    Resolver,
    /// The admin listener.
    Admin,
    /// A gearmand link, by index.
    Link(usize),
    /// A client, by slab key.
    Client(usize),
}

/// Token layout for a server with `links` gearmand links.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tokens {
    links: usize,
}

impl Tokens {
    /// Layout for `links` gearmand links.
    pub fn new(links: usize) -> Self {
        Tokens { links }
    }

    /// The token of gearmand link `i`.
    pub fn link(&self, i: usize) -> Token {
        Token(FIRST_LINK + i)
    }

    /// The token of the client in slab slot `key`.
    pub fn client(&self, key: usize) -> Token {
        Token(FIRST_LINK + self.links + key)
    }

    /// What `token` names.
    pub fn parse(&self, token: Token) -> Tok {
        match token.0 {
            0 => Tok::Listener,
            1 => Tok::Signals,
            2 => Tok::Resolver,
            3 => Tok::Admin,
            n if n < FIRST_LINK + self.links => Tok::Link(n - FIRST_LINK),
            n => Tok::Client(n - FIRST_LINK - self.links),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let t = Tokens::new(2);
        assert_eq!(t.parse(LISTENER), Tok::Listener);
        assert_eq!(t.parse(SIGNALS), Tok::Signals);
        assert_eq!(t.parse(RESOLVER), Tok::Resolver);
        assert_eq!(t.parse(ADMIN), Tok::Admin);
        assert_eq!(t.parse(t.link(1)), Tok::Link(1));
        assert_eq!(t.parse(t.client(0)), Tok::Client(0));
        assert_eq!(t.parse(t.client(7)), Tok::Client(7));
    }
}
