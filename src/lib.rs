//! Sandcastle: a Kubernetes operator that runs AI coding agents in E2B-compatible sandboxes.

#![deny(unsafe_code)]

pub mod agent;
pub mod controller;
pub mod crd;
pub mod e2b;
pub mod localcluster;
pub mod sandboxd;
pub mod status;
pub mod template_build;
