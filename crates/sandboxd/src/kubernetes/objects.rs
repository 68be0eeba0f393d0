//! What the kubernetes runtime writes to the cluster, as pure functions of the sandbox and
//! the server's settings: the sandbox's Pod, the Secret holding its access token, its
//! NetworkPolicy, and the ConfigMap a template lives in; and the sandbox read back from
//! its Pod. Everything a replica needs to answer for a sandbox is on these objects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, ContainerStatus, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::KubeConfig;
use sandcastle_e2b::envd::ENVD_PORT;
use sandcastle_e2b::models::{BuildLogEntry, BuildStatus, BuildStatusReason};

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "sandcastle-sandboxd";
pub const SANDBOX_ID: &str = "e2b.sandcastle.dev/sandbox-id";
pub const TEMPLATE_ID: &str = "e2b.sandcastle.dev/template-id";
const ALIAS: &str = "e2b.sandcastle.dev/alias";
const METADATA: &str = "e2b.sandcastle.dev/metadata";
pub const END_AT: &str = "e2b.sandcastle.dev/end-at";
const STARTED_AT: &str = "e2b.sandcastle.dev/started-at";
const CPU_COUNT: &str = "e2b.sandcastle.dev/cpu-count";
const MEMORY_MB: &str = "e2b.sandcastle.dev/memory-mb";
const TEMPLATE_KEY: &str = "template.json";
pub const TOKEN_KEY: &str = "accessToken";
/// Where the init container puts envd, in a volume of the pod's own.
const ENVD_DIR: &str = "/.sandcastle";

pub fn pod_name(sandbox_id: &str) -> String {
    format!("sandbox-{sandbox_id}")
}

pub fn template_object_name(template_id: &str) -> String {
    format!("template-{template_id}")
}

/// The label selector of every sandbox pod this server made.
pub fn sandbox_selector() -> String {
    format!("{MANAGED_BY}={MANAGER},{SANDBOX_ID}")
}

pub fn template_selector() -> String {
    format!("{MANAGED_BY}={MANAGER},{TEMPLATE_ID}")
}

/// A template: an image and how sandboxes of it start. Kept whole, as JSON, in a
/// ConfigMap of the sandbox namespace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    pub id: String,
    pub aliases: Vec<String>,
    pub cpu_count: u32,
    pub memory_mb: u32,
    /// Every build requested, newest last; `image` is the last that succeeded.
    pub builds: Vec<Build>,
    pub image: Option<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Build {
    pub id: String,
    pub status: BuildStatus,
    pub reason: Option<BuildStatusReason>,
    pub logs: Vec<BuildLogEntry>,
    pub created_at: String,
    pub updated_at: String,
    /// While the image is being built: what the build makes of the template once pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingBuild>,
}

/// A build whose image a builder Job is making.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingBuild {
    /// The Dockerfile's lines after FROM, each with its step: kaniko's output is
    /// attributed to steps by them.
    pub lines: Vec<(String, Option<u32>)>,
    pub settings: super::build::Settings,
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
}

pub fn template_config_map(config: &KubeConfig, template: &Template) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {
            "name": template_object_name(&template.id),
            "namespace": config.namespace,
            "labels": {MANAGED_BY: MANAGER, TEMPLATE_ID: template.id},
        },
        "data": {TEMPLATE_KEY: serde_json::to_string(template).expect("template")},
    }))
    .expect("a ConfigMap")
}

pub fn template_of(config_map: &ConfigMap) -> Option<Template> {
    let text = config_map.data.as_ref()?.get(TEMPLATE_KEY)?;
    serde_json::from_str(text).ok()
}

/// The user a template's processes run as by default: E2B's `user` unless it says `root`.
pub fn runs_as_root(template: &Template) -> bool {
    template.user.as_deref() == Some("root")
}

/// One sandbox to make.
pub struct PodPlan<'a> {
    pub sandbox_id: &'a str,
    pub template: &'a Template,
    pub image: &'a str,
    pub metadata: &'a BTreeMap<String, String>,
    pub started_at: jiff::Timestamp,
    pub end_at: jiff::Timestamp,
}

/// The sandbox's Pod. The sandbox container runs envd, placed by an init container from
/// the server's own image, as its entrypoint; the template's CPU and memory are its
/// requests and limits. No ServiceAccount token, no host namespaces, no privilege
/// escalation, every capability dropped; a template whose user is `root` runs as root
/// (and keeps the capabilities a root user needs to act as another), any other as uid
/// 1000 under the restricted Pod Security profile.
pub fn sandbox_pod(config: &KubeConfig, plan: &PodPlan<'_>) -> Pod {
    let root = runs_as_root(plan.template);
    let cpu = plan.template.cpu_count.max(1);
    let fraction = config.cpu_request_fraction.clamp(0.001, 1.0);
    let cpu_request = format!("{}m", ((cpu as f64) * 1000.0 * fraction).ceil() as u64);
    let memory = format!("{}Mi", plan.template.memory_mb.max(128));
    let (pod_security, container_security) = if root {
        (
            json!({"runAsUser": 0, "runAsGroup": 0, "seccompProfile": {"type": "RuntimeDefault"}}),
            json!({
                "allowPrivilegeEscalation": false,
                "capabilities": {
                    "drop": ["ALL"],
                    "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "SETGID", "SETUID"],
                },
            }),
        )
    } else {
        (
            json!({
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "fsGroup": 1000,
                "runAsNonRoot": true,
                "seccompProfile": {"type": "RuntimeDefault"},
            }),
            json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}),
        )
    };
    let envd = format!("{ENVD_DIR}/envd");
    let mut spec = json!({
        "restartPolicy": "Never",
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        // The pause container is PID 1 and reaps what a sandbox's processes orphan;
        // envd is an ordinary process that SIGTERM ends.
        "shareProcessNamespace": true,
        "hostname": "sandbox",
        // Bounds a sandbox whose every server is gone for good: the kubelet ends it at
        // the longest life a create or set-timeout may ask for.
        "activeDeadlineSeconds": config.max_timeout.as_secs().max(1),
        "terminationGracePeriodSeconds": 5,
        "securityContext": pod_security,
        "volumes": [{"name": "envd", "emptyDir": {"sizeLimit": "256Mi"}}],
        "initContainers": [{
            "name": "envd",
            "image": config.envd_image,
            "imagePullPolicy": "IfNotPresent",
            "command": [config.envd_path, "install", envd],
            "volumeMounts": [{"name": "envd", "mountPath": ENVD_DIR}],
            "securityContext": container_security,
            "resources": {
                "requests": {"cpu": "10m", "memory": "16Mi"},
                "limits": {"cpu": "500m", "memory": "128Mi"},
            },
        }],
        "containers": [{
            "name": "sandbox",
            "image": plan.image,
            "imagePullPolicy": "IfNotPresent",
            "command": [envd, "serve"],
            "env": [{"name": "SANDCASTLE_SANDBOX_ID", "value": plan.sandbox_id}],
            "ports": [{"name": "envd", "containerPort": ENVD_PORT}],
            "volumeMounts": [{"name": "envd", "mountPath": ENVD_DIR, "readOnly": true}],
            "securityContext": container_security,
            "resources": {
                "requests": {"cpu": cpu_request, "memory": memory},
                "limits": {"cpu": cpu.to_string(), "memory": memory},
            },
        }],
    });
    if let Some(class) = &config.runtime_class {
        spec["runtimeClassName"] = json!(class);
    }
    if !config.node_selector.is_empty() {
        spec["nodeSelector"] = json!(config.node_selector);
    }
    if !config.tolerations.is_empty() {
        spec["tolerations"] = json!(config.tolerations);
    }
    let mut annotations = BTreeMap::from([
        (
            METADATA.to_string(),
            serde_json::to_string(plan.metadata).expect("metadata"),
        ),
        (END_AT.to_string(), plan.end_at.to_string()),
        (STARTED_AT.to_string(), plan.started_at.to_string()),
        (CPU_COUNT.to_string(), cpu.to_string()),
        (
            MEMORY_MB.to_string(),
            plan.template.memory_mb.max(128).to_string(),
        ),
    ]);
    if let Some(alias) = plan.template.aliases.first() {
        annotations.insert(ALIAS.to_string(), alias.clone());
    }
    serde_json::from_value(json!({
        "metadata": {
            "name": pod_name(plan.sandbox_id),
            "namespace": config.namespace,
            "labels": {
                MANAGED_BY: MANAGER,
                SANDBOX_ID: plan.sandbox_id,
                TEMPLATE_ID: plan.template.id,
            },
            "annotations": annotations,
        },
        "spec": spec,
    }))
    .expect("a Pod")
}

fn owned_by(pod: &Pod) -> serde_json::Value {
    json!([{
        "apiVersion": "v1",
        "kind": "Pod",
        "name": pod.metadata.name,
        "uid": pod.metadata.uid,
        "blockOwnerDeletion": true,
    }])
}

/// The sandbox's access token, in a Secret its Pod owns, so any replica can hand it out
/// and it goes when the Pod does.
pub fn token_secret(pod: &Pod, token: &str) -> Secret {
    serde_json::from_value(json!({
        "metadata": {
            "name": pod.metadata.name,
            "namespace": pod.metadata.namespace,
            "labels": {MANAGED_BY: MANAGER},
            "ownerReferences": owned_by(pod),
        },
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }))
    .expect("a Secret")
}

/// Ingress only from the sandbox server, to envd; egress only to DNS and, when the
/// sandbox may reach the internet, to every address outside the denied ranges (the
/// cluster's own networks and the cloud metadata address by default), plus whatever
/// `allowed` names.
/// What a sandbox may reach besides DNS, from a create's `allow_internet_access` and
/// `network`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Egress {
    /// Everything outside the server's denied ranges and `denied`.
    pub internet: bool,
    /// Reachable whatever else says: `allowOut`.
    pub allowed: Vec<String>,
    /// Denied besides the server's ranges: `denyOut`.
    pub denied: Vec<String>,
}

impl Egress {
    /// Checks a create's egress wishes. Every entry must be an address or a CIDR: a
    /// NetworkPolicy cannot name hosts, and this runtime has no egress proxy that could.
    pub fn of(
        internet: Option<bool>,
        network: Option<&sandcastle_e2b::models::SandboxNetwork>,
    ) -> Result<Egress, String> {
        let cidrs = |field: &str, entries: &[String]| -> Result<Vec<String>, String> {
            entries
                .iter()
                .map(|entry| {
                    entry
                        .parse::<ipnet::IpNet>()
                        .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .map(|net| net.trunc().to_string())
                        .map_err(|_| {
                            format!(
                                "network.{field} entry {entry:?} is not an IP address or CIDR: sandboxes on pods are fenced by NetworkPolicy, which cannot name hosts"
                            )
                        })
                })
                .collect()
        };
        let network = network.cloned().unwrap_or_default();
        Ok(Egress {
            internet: internet.unwrap_or(true),
            allowed: cidrs("allowOut", &network.allow_out)?,
            denied: cidrs("denyOut", &network.deny_out)?,
        })
    }
}

pub fn network_policy(config: &KubeConfig, pod: &Pod, egress_of: &Egress) -> NetworkPolicy {
    let sandbox_id = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SANDBOX_ID))
        .cloned()
        .unwrap_or_default();
    let mut from = json!({"podSelector": {"matchLabels": config.server_labels}});
    if let Some(namespace) = &config.server_namespace {
        from["namespaceSelector"] =
            json!({"matchLabels": {"kubernetes.io/metadata.name": namespace}});
    }
    let mut egress = vec![json!({
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    })];
    if egress_of.internet {
        let except: Vec<&String> = config
            .denied_cidrs
            .iter()
            .chain(egress_of.denied.iter().filter(|cidr| !cidr.contains(':')))
            .collect();
        egress.push(json!({"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": except}}]}));
    }
    if !egress_of.allowed.is_empty() {
        let to: Vec<_> = egress_of
            .allowed
            .iter()
            .map(|cidr| json!({"ipBlock": {"cidr": cidr}}))
            .collect();
        egress.push(json!({"to": to}));
    }
    serde_json::from_value(json!({
        "metadata": {
            "name": pod.metadata.name,
            "namespace": pod.metadata.namespace,
            "labels": {MANAGED_BY: MANAGER},
            "ownerReferences": owned_by(pod),
        },
        "spec": {
            "podSelector": {"matchLabels": {SANDBOX_ID: sandbox_id}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [from], "ports": [{"protocol": "TCP", "port": ENVD_PORT}]}],
            "egress": egress,
        },
    }))
    .expect("a NetworkPolicy")
}

/// A sandbox as its Pod records it.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxView {
    pub id: String,
    pub template_id: String,
    pub alias: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub started_at: jiff::Timestamp,
    pub end_at: jiff::Timestamp,
    pub cpu_count: u32,
    pub memory_mb: u32,
    /// Where envd answers, once the pod runs.
    pub ip: Option<String>,
    pub live: Liveness,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Scheduled, pulling or starting.
    Pending,
    Running,
    /// Ended, being deleted, or failing to start; why, when the kubelet says.
    Gone(String),
}

pub fn sandbox_of(pod: &Pod) -> Option<SandboxView> {
    let labels = pod.metadata.labels.as_ref()?;
    let annotations = pod.metadata.annotations.as_ref()?;
    let timestamp = |key: &str| annotations.get(key)?.parse::<jiff::Timestamp>().ok();
    let number = |key: &str| {
        annotations
            .get(key)
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    let status = pod.status.as_ref();
    let live = if pod.metadata.deletion_timestamp.is_some() {
        Liveness::Gone("deleted".into())
    } else {
        match status.and_then(|status| status.phase.as_deref()) {
            Some("Running") => Liveness::Running,
            Some("Succeeded") | Some("Failed") => Liveness::Gone(
                status
                    .and_then(|status| status.reason.clone().or(status.message.clone()))
                    .or_else(|| container_ending(pod))
                    .unwrap_or_else(|| "ended".into()),
            ),
            _ => match start_failure(pod) {
                Some(reason) => Liveness::Gone(reason),
                None => Liveness::Pending,
            },
        }
    };
    Some(SandboxView {
        id: labels.get(SANDBOX_ID)?.clone(),
        template_id: labels.get(TEMPLATE_ID).cloned().unwrap_or_default(),
        alias: annotations.get(ALIAS).cloned(),
        metadata: annotations
            .get(METADATA)
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_default(),
        started_at: timestamp(STARTED_AT)?,
        end_at: timestamp(END_AT)?,
        cpu_count: number(CPU_COUNT),
        memory_mb: number(MEMORY_MB),
        ip: status
            .and_then(|status| status.pod_ip.clone())
            .filter(|ip| !ip.is_empty()),
        live,
    })
}

/// The statuses of the pod's init containers, then of its containers.
fn containers(pod: &Pod) -> impl Iterator<Item = &ContainerStatus> {
    pod.status.iter().flat_map(|status| {
        status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
    })
}

/// How the first container that ended did, as the kubelet tells it.
fn container_ending(pod: &Pod) -> Option<String> {
    containers(pod).find_map(|container| {
        let ended = container.state.as_ref()?.terminated.as_ref()?;
        Some(format!(
            "container {} ended: {} (exit code {})",
            container.name,
            ended.reason.as_deref().unwrap_or("terminated"),
            ended.exit_code
        ))
    })
}

/// Why a pending pod will never run on its own: its image cannot be pulled, or its
/// container cannot be created.
fn start_failure(pod: &Pod) -> Option<String> {
    const HOPELESS: &[&str] = &[
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    ];
    containers(pod).find_map(|container| {
        let waiting = container.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref()?;
        HOPELESS.contains(&reason).then(|| {
            format!(
                "container {}: {reason}: {}",
                container.name,
                waiting.message.as_deref().unwrap_or_default()
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> KubeConfig {
        let mut config = KubeConfig::new("sandboxes", "registry.local/sandcastle:1");
        config.server_labels = BTreeMap::from([("app".to_string(), "sandboxd".to_string())]);
        config.server_namespace = Some("sandcastle-system".into());
        config
    }

    fn template(user: Option<&str>) -> Template {
        Template {
            id: "tpl".into(),
            aliases: vec!["base".into()],
            cpu_count: 2,
            memory_mb: 512,
            user: user.map(str::to_string),
            ..Template::default()
        }
    }

    fn pod_of(template: &Template) -> Pod {
        let metadata = BTreeMap::from([("task".to_string(), "t1".to_string())]);
        let at: jiff::Timestamp = "2026-12-04T10:00:00Z".parse().unwrap();
        sandbox_pod(
            &config(),
            &PodPlan {
                sandbox_id: "abc",
                template,
                image: "registry.local/base:1",
                metadata: &metadata,
                started_at: at,
                end_at: at + jiff::SignedDuration::from_secs(300),
            },
        )
    }

    #[test]
    fn a_user_template_runs_restricted_without_a_token() {
        let pod = pod_of(&template(None));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.host_network, None);
        assert_eq!(spec.host_pid, None);
        let security = spec.security_context.as_ref().unwrap();
        assert_eq!(security.run_as_user, Some(1000));
        assert_eq!(security.run_as_non_root, Some(true));
        let sandbox = &spec.containers[0];
        let container = sandbox.security_context.as_ref().unwrap();
        assert_eq!(container.allow_privilege_escalation, Some(false));
        assert_eq!(
            container.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(container.capabilities.as_ref().unwrap().add, None);
        let resources = sandbox.resources.as_ref().unwrap();
        assert_eq!(resources.requests.as_ref().unwrap()["cpu"].0, "2000m");
        assert_eq!(resources.requests.as_ref().unwrap()["memory"].0, "512Mi");
        assert_eq!(resources.limits.as_ref().unwrap()["cpu"].0, "2");
        assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "512Mi");
        assert_eq!(spec.active_deadline_seconds, Some(24 * 3600));
    }

    #[test]
    fn cpu_requests_may_be_a_share_of_the_limit_but_memory_never() {
        let mut config = config();
        config.cpu_request_fraction = 0.1;
        let template = template(None);
        let metadata = BTreeMap::new();
        let at = jiff::Timestamp::now();
        let pod = sandbox_pod(
            &config,
            &PodPlan {
                sandbox_id: "abc",
                template: &template,
                image: "x",
                metadata: &metadata,
                started_at: at,
                end_at: at,
            },
        );
        let resources = pod.spec.unwrap().containers[0].resources.clone().unwrap();
        assert_eq!(resources.requests.as_ref().unwrap()["cpu"].0, "200m");
        assert_eq!(resources.limits.as_ref().unwrap()["cpu"].0, "2");
        assert_eq!(resources.requests, {
            let mut limits = resources.limits.clone().unwrap();
            limits.insert(
                "cpu".into(),
                resources.requests.as_ref().unwrap()["cpu"].clone(),
            );
            Some(limits)
        });
    }

    #[test]
    fn a_root_template_runs_as_root_with_the_capabilities_to_switch_users() {
        let pod = pod_of(&template(Some("root")));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.security_context.as_ref().unwrap().run_as_user, Some(0));
        let container = spec.containers[0].security_context.as_ref().unwrap();
        assert_eq!(container.allow_privilege_escalation, Some(false));
        assert!(
            container
                .capabilities
                .as_ref()
                .unwrap()
                .add
                .as_ref()
                .unwrap()
                .contains(&"SETUID".to_string())
        );
    }

    #[test]
    fn the_pod_carries_no_environment_but_its_id() {
        let pod = pod_of(&template(None));
        let text = serde_json::to_string(&pod).unwrap();
        let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
        assert_eq!(env.len(), 1);
        assert_eq!(env[0].name, "SANDCASTLE_SANDBOX_ID");
        assert!(!text.contains("accessToken"));
    }

    #[test]
    fn the_sandbox_reads_back_from_its_pod() {
        let pod = pod_of(&template(None));
        let view = sandbox_of(&pod).unwrap();
        assert_eq!(view.id, "abc");
        assert_eq!(view.template_id, "tpl");
        assert_eq!(view.alias.as_deref(), Some("base"));
        assert_eq!(view.metadata["task"], "t1");
        assert_eq!(view.cpu_count, 2);
        assert_eq!(view.memory_mb, 512);
        assert_eq!(view.live, Liveness::Pending);
        assert_eq!(
            view.started_at.duration_until(view.end_at),
            jiff::SignedDuration::from_secs(300)
        );
    }

    #[test]
    fn an_unpullable_image_is_a_sandbox_that_will_never_run() {
        let mut pod = pod_of(&template(None));
        pod.status = serde_json::from_value(json!({
            "phase": "Pending",
            "containerStatuses": [{
                "name": "sandbox", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}},
            }],
        }))
        .unwrap();
        match sandbox_of(&pod).unwrap().live {
            Liveness::Gone(reason) => assert!(reason.contains("ErrImagePull"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_policy_admits_only_the_server_and_denies_the_cluster() {
        let mut pod = pod_of(&template(None));
        pod.metadata.uid = Some("uid-1".into());
        let egress = Egress::of(
            None,
            Some(&sandcastle_e2b::models::SandboxNetwork {
                allow_out: vec!["192.0.2.2".into()],
                deny_out: vec!["203.0.113.9/24".into()],
            }),
        )
        .expect("addresses");
        assert_eq!(
            egress,
            Egress {
                internet: true,
                allowed: vec!["192.0.2.2/32".into()],
                denied: vec!["203.0.113.0/24".into()],
            }
        );
        let policy = network_policy(&config(), &pod, &egress);
        let text = serde_json::to_value(&policy).unwrap();
        assert_eq!(text["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(
            text["spec"]["podSelector"]["matchLabels"][SANDBOX_ID],
            "abc"
        );
        let from = &text["spec"]["ingress"][0]["from"][0];
        assert_eq!(from["podSelector"]["matchLabels"]["app"], "sandboxd");
        assert_eq!(
            from["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "sandcastle-system"
        );
        let internet = &text["spec"]["egress"][1]["to"][0]["ipBlock"];
        assert_eq!(internet["cidr"], "0.0.0.0/0");
        assert!(
            internet["except"]
                .as_array()
                .unwrap()
                .contains(&json!("169.254.0.0/16"))
        );
        assert!(
            internet["except"]
                .as_array()
                .unwrap()
                .contains(&json!("203.0.113.0/24"))
        );
        assert_eq!(
            text["spec"]["egress"][2]["to"][0]["ipBlock"]["cidr"],
            "192.0.2.2/32"
        );
        let off = Egress::of(Some(false), None).expect("no wishes");
        let closed = serde_json::to_value(network_policy(&config(), &pod, &off)).unwrap();
        assert_eq!(closed["spec"]["egress"].as_array().unwrap().len(), 1);
        for (allow, deny) in [
            (vec!["api.anthropic.com".to_string()], vec![]),
            (vec![], vec!["10.0.0.0/33".to_string()]),
        ] {
            let message = Egress::of(
                None,
                Some(&sandcastle_e2b::models::SandboxNetwork {
                    allow_out: allow,
                    deny_out: deny,
                }),
            )
            .expect_err("refused");
            assert!(message.contains("not an IP address or CIDR"), "{message}");
        }
    }

    #[test]
    fn templates_round_trip_through_their_config_map() {
        let template = template(Some("root"));
        let config_map = template_config_map(&config(), &template);
        assert_eq!(template_of(&config_map), Some(template));
    }
}
