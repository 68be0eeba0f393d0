//! The template the task suites and the operator benchmark start from: the provider's
//! own `base`, adopted.

use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use sandcastle_api::{SandboxTemplate, TemplatePhase};
use serde_json::json;

/// Adopts the provider's `base` template in `namespace` and waits until the operator has
/// it Ready.
pub async fn adopt_base(client: &kube::Client, namespace: &str) {
    let templates: Api<SandboxTemplate> = Api::namespaced(client.clone(), namespace);
    let base: SandboxTemplate = serde_json::from_value(json!({
        "apiVersion": "sandcastle.dev/v1alpha1", "kind": "SandboxTemplate",
        "metadata": {"name": "base"}, "spec": {"existing": {"templateId": "base"}},
    }))
    .expect("a template");
    templates
        .create(&PostParams::default(), &base)
        .await
        .expect("create the base template");
    let deadline = Instant::now() + Duration::from_secs(60);
    while templates
        .get("base")
        .await
        .expect("the base template")
        .status
        .and_then(|status| status.phase)
        != Some(TemplatePhase::Ready)
    {
        assert!(
            Instant::now() < deadline,
            "the base template was not adopted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
