//! Running AI coding agents: what the operator needs to know about each agent CLI.

pub mod stream_json;
