//! The Gearman binary protocol, sans-IO.
pub mod client;
pub mod packet;
pub mod worker;
