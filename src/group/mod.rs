//! A group of event-loop processes on one port (`gearsock serve --processes N`, N > 1).
//!
//! ```text
//!                       supervisor (supervisor.rs: no event loop, no clients)
//!      reserves ADDR (bound with SO_REUSEPORT, never listening), creates the board,
//!      starts, watches and restarts the children, stops them on SIGINT/SIGTERM
//!            |  re-executes itself: serve ... --listen ADDR --instance-id ID-i
//!            |                      --group-slot i --group-board FD
//!            v
//!   child p0        child p1       ...   each: today's loop, its own listener on ADDR with
//!   (server/)       (server/)            SO_REUSEPORT; the kernel spreads new connections
//!      \               |              /
//!       +--------- board.rs ---------+   shared memory, one slot per process: each child's
//!                                        figures (page.rs: Report), the supervisor's pid and
//!                                        restart count; read when /metrics or /healthz is asked
//! ```
//!
//! Nothing is shared on the hot path: a child's clients, jobs and gearmand links are its own.
//! With one process (the default) none of this exists.

pub(crate) mod board;
pub(crate) mod page;
pub mod supervisor;
