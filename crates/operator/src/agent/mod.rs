//! Running AI coding agents: what the operator needs to know about each agent CLI, how
//! the agent process is started and recorded, which files it changed, and keeping secret
//! values out of everything captured from it.

pub mod artifacts;
pub mod files;
pub mod git;
pub mod invocation;
pub mod redact;
pub mod stream_json;
pub mod transcript;
