//! Sandcastle: a Kubernetes operator that runs AI coding agents in E2B-compatible sandboxes.

#![deny(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod controller;
pub mod crd;
pub mod e2b;
pub mod leader;
pub mod localcluster;
pub mod metrics;
pub mod sandboxd;
pub mod status;
pub mod template_build;
