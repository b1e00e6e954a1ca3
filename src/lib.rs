//! gearsock: WebSocket clients run jobs on Gearman workers and watch them live.
//!
//! One thread, one `mio::Poll`, no async runtime. Data flows like this:
//!
//! ```text
//! client socket --bytes--> server::io::fill --> ws::Ws (tungstenite over memory) --text--> app::App
//! app::App --Effect::Submit--> gearman::client::ClientSession --bytes--> gearmand socket
//! gearmand socket --bytes--> ClientSession --JobEvent--> App --Effect::Send--> Ws --> flush
//! wheel::TimerWheel --expired--> App (status polls, grace) / server (timeouts, reconnects)
//! ```
//!
//! Only `server` touches sockets and the clock; `ws`, `gearman`, `app` and `wheel` are sans-IO
//! and tested without a network. `worker` and `submit` are small blocking programs (the
//! article's worker and client); `bench` is the load generator.
// What the library exports is a choice: the modules below are public because `main.rs`, the
// tests, the fuzz targets or the benches use them, and inside each only the items they use are
// `pub` (the rest is `pub(crate)`). `connection`, `http` and `os` are the server's alone.
pub mod app;
#[cfg(feature = "bench")]
pub mod bench;
pub mod buf;
pub mod cli;
pub mod config;
mod connection;
pub mod gearman;
pub mod group;
mod http;
pub mod jwt;
pub mod logging;
pub mod metrics;
pub mod mint;
mod os;
pub mod random;
pub mod server;
pub mod submit;
pub mod wheel;
pub mod worker;
pub mod ws;
