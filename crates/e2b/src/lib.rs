//! The E2B sandbox protocol: wire types shared by the client and the embedded server, and
//! the client the operator drives sandboxes and template builds with.

pub mod client;
pub mod config;
pub mod envd;
pub mod envd_client;
pub mod error;
pub mod models;
pub mod retry;
pub mod secret;
pub mod template;
