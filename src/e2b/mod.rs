//! The E2B sandbox protocol: wire types shared by the client and the embedded server.

pub mod envd;
pub mod models;
pub mod error;
pub mod retry;
pub mod secret;
pub mod template;
