//! gearsock: WebSocket clients run jobs on Gearman workers and watch them live.
pub mod buf;
pub mod gearman;
pub mod submit;
pub mod wheel;
pub mod worker;
