//! Sandcastle's operator: the controllers that build `SandboxTemplate`s and run
//! `AgentTask`s on an E2B-compatible provider, with their pure logic, metrics and leader
//! election.

pub mod admin;
pub mod agent;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod status;
pub mod template_build;
pub mod text;
