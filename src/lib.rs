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
pub mod app;
#[cfg(feature = "bench")]
pub mod bench;
pub mod buf;
pub mod cli;
pub mod config;
pub mod connection;
pub mod gearman;
pub mod group;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod os;
pub mod random;
pub mod server;
pub mod submit;
pub mod wheel;
pub mod worker;
pub mod ws;
