//! The Helm chart and the Dockerfile without a cluster: the real helm lints and renders
//! the chart, kubernetes-validate checks the output against the Kubernetes schemas, the
//! rendered objects are inspected field by field, the CRD copies are compared with
//! `crds/`, and hadolint reads the Dockerfile.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sandcastle_testkit::localcluster::tools_bin_dir;
use serde::Deserialize;
use serde_yaml::Value;

const RESTRICTED_UID: u64 = 65532;
/// The oldest Kubernetes the chart's `kubeVersion` admits.
const KUBE_FLOOR: &str = "1.30.0";
const REFRESH_CRDS: &str = "run `cargo run -- crd --out crds && cargo run -- crd --out charts/sandcastle/files/crds` and commit both";

fn root() -> &'static Path {
    sandcastle_testkit::repo()
}

fn chart_dir() -> PathBuf {
    root().join("charts/sandcastle")
}

fn tool(path: PathBuf) -> PathBuf {
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup",
        path.display()
    );
    path
}

fn helm() -> Command {
    Command::new(tool(tools_bin_dir().join("helm")))
}

fn venv_bin(name: &str) -> PathBuf {
    tool(root().join(".venv/bin").join(name))
}

fn output(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|err| panic!("running {command:?}: {err}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every values file under `ci/`, each a variant the tests render.
fn ci_values_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("ci/ is readable")
        .map(|entry| entry.expect("a ci/ entry").path())
        .filter(|path| path.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "ci/ lost its values files: {files:?}");
    files
}

/// The chart's defaults followed by every ci values file, as `helm` arguments.
fn variants() -> Vec<(String, Vec<String>)> {
    let mut all = vec![("defaults".to_owned(), Vec::new())];
    for file in ci_values_files() {
        let name = file.file_name().expect("a file name").to_string_lossy();
        all.push((
            name.into_owned(),
            vec!["-f".to_owned(), file.display().to_string()],
        ));
    }
    all
}

fn ci(name: &str) -> String {
    let file = chart_dir().join("ci").join(name);
    assert!(file.is_file(), "{} is missing", file.display());
    file.display().to_string()
}

/// `helm template` output as text, or helm's complaint.
fn template(args: &[&str]) -> Result<String, String> {
    let out = output(
        helm()
            .args(["template", "sc", &chart_dir().display().to_string()])
            .args(["--namespace", "ops"])
            .args(args),
    );
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

fn parse(manifests: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(manifests)
        .map(|doc| Value::deserialize(doc).expect("helm renders valid YAML"))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn render(args: &[&str]) -> Vec<Value> {
    parse(&template(args).unwrap_or_else(|err| panic!("helm template {args:?}: {err}")))
}

fn objects<'a>(all: &'a [Value], kind: &str) -> Vec<&'a Value> {
    all.iter().filter(|o| o["kind"] == kind).collect()
}

fn object<'a>(all: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<_> = objects(all, kind)
        .into_iter()
        .filter(|o| o["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name}");
    found[0]
}

fn names(all: &[Value], kind: &str) -> BTreeSet<String> {
    objects(all, kind)
        .iter()
        .map(|o| str_of(&o["metadata"]["name"]).to_owned())
        .collect()
}

fn str_of(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("expected a string, got {value:?}"))
}

fn seq(value: &Value) -> &Vec<Value> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {value:?}"))
}

fn deployment(all: &[Value]) -> &Value {
    object(all, "Deployment", "sc-sandcastle")
}

fn container(all: &[Value]) -> &Value {
    let containers = seq(&deployment(all)["spec"]["template"]["spec"]["containers"]);
    assert_eq!(containers.len(), 1, "the operator pod has one container");
    &containers[0]
}

fn args(all: &[Value]) -> Vec<String> {
    seq(&container(all)["args"])
        .iter()
        .map(|arg| str_of(arg).to_owned())
        .collect()
}

fn env<'a>(all: &'a [Value], name: &str) -> Option<&'a Value> {
    seq(&container(all)["env"])
        .iter()
        .find(|var| var["name"] == name)
}

/// One (apiGroup, resource, verb, resourceName) per permission a rule list grants, so rule
/// sets compare regardless of how they are grouped into rules.
type Grant = (String, String, String, String);

fn grants(rules: &Value) -> BTreeSet<Grant> {
    let mut all = BTreeSet::new();
    for rule in seq(rules) {
        let fields: BTreeSet<&str> = rule
            .as_mapping()
            .expect("a rule is a mapping")
            .keys()
            .map(str_of)
            .collect();
        let allowed = BTreeSet::from(["apiGroups", "resources", "verbs", "resourceNames"]);
        assert!(
            fields.is_subset(&allowed),
            "unexpected rule fields {fields:?}"
        );
        let names: Vec<String> = match rule.get("resourceNames") {
            Some(names) => seq(names).iter().map(|n| str_of(n).to_owned()).collect(),
            None => vec![String::new()],
        };
        for group in seq(&rule["apiGroups"]) {
            for resource in seq(&rule["resources"]) {
                for verb in seq(&rule["verbs"]) {
                    for name in &names {
                        all.insert((
                            str_of(group).to_owned(),
                            str_of(resource).to_owned(),
                            str_of(verb).to_owned(),
                            name.clone(),
                        ));
                    }
                }
            }
        }
    }
    all
}

/// A rule as written in the tests: apiGroup, resources, verbs, resourceNames.
type Rule<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [&'a str]);

fn expected(table: &[Rule]) -> BTreeSet<Grant> {
    let mut all = BTreeSet::new();
    for (group, resources, verbs, names) in table {
        let names: Vec<&str> = if names.is_empty() {
            vec![""]
        } else {
            names.to_vec()
        };
        for resource in *resources {
            for verb in *verbs {
                for name in &names {
                    all.insert((
                        group.to_string(),
                        resource.to_string(),
                        verb.to_string(),
                        name.to_string(),
                    ));
                }
            }
        }
    }
    all
}

/// What the operator does in each namespace it watches: exactly this, nothing more.
fn watch_grants() -> BTreeSet<Grant> {
    expected(&[
        (
            "sandcastle.dev",
            &["agenttasks"],
            &["get", "list", "watch", "patch", "update", "delete"],
            &[],
        ),
        (
            "sandcastle.dev",
            &["sandboxtemplates"],
            &["get", "list", "watch", "patch", "update"],
            &[],
        ),
        (
            "sandcastle.dev",
            &["agenttasks/status", "sandboxtemplates/status"],
            &["get", "patch", "update"],
            &[],
        ),
        (
            "sandcastle.dev",
            &["agenttasks/finalizers", "sandboxtemplates/finalizers"],
            &["update"],
            &[],
        ),
        ("", &["secrets"], &["get", "list", "watch"], &[]),
        (
            "",
            &["configmaps"],
            &["get", "list", "watch", "create", "patch"],
            &[],
        ),
        ("events.k8s.io", &["events"], &["create", "patch"], &[]),
    ])
}

fn crd_grants() -> BTreeSet<Grant> {
    expected(&[(
        "apiextensions.k8s.io",
        &["customresourcedefinitions"],
        &["get"],
        &[
            "agenttasks.sandcastle.dev",
            "sandboxtemplates.sandcastle.dev",
        ],
    )])
}

fn assert_binds_operator(binding: &Value, role_kind: &str, role: &str) {
    assert_eq!(binding["roleRef"]["kind"], role_kind);
    assert_eq!(binding["roleRef"]["name"], role);
    assert_eq!(binding["roleRef"]["apiGroup"], "rbac.authorization.k8s.io");
    let subjects = seq(&binding["subjects"]);
    assert_eq!(subjects.len(), 1, "{binding:?}");
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    assert_eq!(subjects[0]["name"], "sc-sandcastle");
    assert_eq!(subjects[0]["namespace"], "ops");
}

#[test]
fn lint_is_strict_clean_for_the_defaults_and_every_ci_values_file() {
    for (variant, values) in variants() {
        let out = output(
            helm()
                .args(["lint", "--strict", "--kube-version", KUBE_FLOOR])
                .arg(chart_dir())
                .args(&values),
        );
        assert!(
            out.status.success(),
            "helm lint --strict ({variant}) failed:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

#[test]
fn rendered_manifests_pass_strict_kubernetes_schemas() {
    for (variant, values) in variants() {
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        let manifests = template(&values).unwrap_or_else(|err| panic!("{variant}: {err}"));
        let mut validate = Command::new(venv_bin("python"))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chart/validate.py"))
            .args(["--version", KUBE_FLOOR, "--version", "latest"])
            .args(["--no-schema", "monitoring.coreos.com/v1/ServiceMonitor"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tests/chart/validate.py");
        validate
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(manifests.as_bytes())
            .expect("writing the manifests");
        let out = validate.wait_with_output().expect("validate.py finishes");
        let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success(),
            "{variant}: manifests failed validation:\n{report}"
        );
        let validated = report.lines().filter(|l| l.starts_with("ok ")).count();
        let skipped = report.lines().filter(|l| l.starts_with("skipped ")).count();
        assert_eq!(
            validated,
            2 * (parse(&manifests).len() - skipped),
            "{variant}: every object is validated against both versions:\n{report}"
        );
    }
}

#[test]
fn every_variant_runs_as_the_restricted_pod_security_profile_requires() {
    for (variant, values) in variants() {
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        let all = render(&values);
        let pod = &deployment(&all)["spec"]["template"]["spec"];
        let pod_security = &pod["securityContext"];
        assert_eq!(pod_security["runAsNonRoot"], true, "{variant}");
        for field in ["runAsUser", "runAsGroup", "fsGroup"] {
            assert_eq!(
                pod_security[field].as_u64(),
                Some(RESTRICTED_UID),
                "{variant}: pod {field} must be the numeric UID"
            );
        }
        assert_eq!(
            pod_security["seccompProfile"]["type"], "RuntimeDefault",
            "{variant}"
        );
        for field in ["hostNetwork", "hostPID", "hostIPC"] {
            assert!(pod.get(field).is_none(), "{variant}: {field} is set");
        }
        let security = &container(&all)["securityContext"];
        assert_eq!(security["allowPrivilegeEscalation"], false, "{variant}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{variant}");
        assert_eq!(security["runAsNonRoot"], true, "{variant}");
        assert_eq!(security["runAsUser"].as_u64(), Some(RESTRICTED_UID));
        assert_eq!(
            security["capabilities"]["drop"],
            serde_yaml::from_str::<Value>("[ALL]").unwrap()
        );
        assert!(security["capabilities"].get("add").is_none(), "{variant}");
        assert!(security.get("privileged").is_none(), "{variant}");
        assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
        if let Some(volumes) = pod.get("volumes") {
            for volume in seq(volumes) {
                let kinds: Vec<&str> = volume
                    .as_mapping()
                    .expect("a volume is a mapping")
                    .keys()
                    .map(str_of)
                    .filter(|key| *key != "name")
                    .collect();
                assert_eq!(kinds, ["emptyDir"], "{variant}: volume {volume:?}");
            }
        }
        assert_eq!(pod["automountServiceAccountToken"], true, "{variant}");
        assert_eq!(pod["serviceAccountName"], "sc-sandcastle", "{variant}");
        let resources = &container(&all)["resources"];
        for field in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    !resources[field][resource].is_null(),
                    "{variant}: no {field}.{resource}"
                );
            }
        }
    }
}

#[test]
fn probes_hit_the_admin_port_by_name() {
    let all = render(&[]);
    let operator = container(&all);
    let ports = seq(&operator["ports"]);
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["name"], "http-metrics");
    assert_eq!(ports[0]["containerPort"].as_u64(), Some(8080));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(operator[probe]["httpGet"]["path"], path);
        assert_eq!(operator[probe]["httpGet"]["port"], "http-metrics");
    }
    assert!(args(&all).contains(&"--admin-address=0.0.0.0:8080".to_owned()));
    let service = object(&all, "Service", "sc-sandcastle-metrics");
    let service_ports = seq(&service["spec"]["ports"]);
    assert_eq!(service_ports[0]["targetPort"], "http-metrics");
    assert_eq!(
        service["spec"]["selector"],
        deployment(&all)["spec"]["selector"]["matchLabels"]
    );

    let moved = render(&["--set", "adminPort=9443"]);
    assert!(args(&moved).contains(&"--admin-address=0.0.0.0:9443".to_owned()));
    assert_eq!(
        seq(&container(&moved)["ports"])[0]["containerPort"].as_u64(),
        Some(9443)
    );
}

#[test]
fn two_replicas_elect_a_leader_by_default() {
    let all = render(&[]);
    assert_eq!(deployment(&all)["spec"]["replicas"].as_u64(), Some(2));
    let args = args(&all);
    assert_eq!(
        args[0], "run",
        "the image's entrypoint takes the subcommand"
    );
    for expected in [
        "--leader-election",
        "--leader-election-lease=sc-sandcastle",
        "--leader-election-lease-seconds=15",
        "--provider=e2b",
        "--e2b-domain=e2b.app",
        "--instance=sc-sandcastle",
        "--log=info",
        "--log-format=json",
    ] {
        assert!(
            args.contains(&expected.to_owned()),
            "{expected} missing from {args:?}"
        );
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "{args:?}"
    );
    assert_eq!(
        env(&all, "POD_NAME").expect("POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env(&all, "SANDCASTLE_LEADER_ELECTION_NAMESPACE").expect("lease namespace")["valueFrom"]["fieldRef"]
            ["fieldPath"],
        "metadata.namespace"
    );
    let pdb = object(&all, "PodDisruptionBudget", "sc-sandcastle");
    assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(1));
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment(&all)["spec"]["selector"]["matchLabels"]
    );

    let single = render(&[
        "--set",
        "leaderElection.enabled=false",
        "--set",
        "replicaCount=1",
    ]);
    let args = self::args(&single);
    assert!(
        !args.iter().any(|a| a.starts_with("--leader-election")),
        "{args:?}"
    );
    assert!(env(&single, "SANDCASTLE_LEADER_ELECTION_NAMESPACE").is_none());
    assert!(
        objects(&single, "PodDisruptionBudget").is_empty(),
        "minAvailable 1 of 1 blocks drains"
    );
    assert!(!names(&single, "Role").contains("sc-sandcastle-leader-election"));
}

#[test]
fn the_embedded_provider_runs_one_replica_whatever_replica_count_says() {
    let all = render(&[
        "--set",
        "provider.embedded.enabled=true",
        "--set",
        "replicaCount=5",
    ]);
    let spec = &deployment(&all)["spec"];
    assert_eq!(spec["replicas"].as_u64(), Some(1));
    assert_eq!(spec["strategy"]["type"], "Recreate");
    assert!(objects(&all, "PodDisruptionBudget").is_empty());
    let args = args(&all);
    for expected in [
        "--provider=embedded",
        "--sandboxd-root=/var/lib/sandcastle/sandboxd",
        "--sandboxd-isolation=auto",
    ] {
        assert!(
            args.contains(&expected.to_owned()),
            "{expected} missing from {args:?}"
        );
    }
    assert!(!args.iter().any(|a| a.starts_with("--e2b-")), "{args:?}");
    let mounts = seq(&container(&all)["volumeMounts"]);
    let sandboxd = mounts
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/sandcastle/sandboxd")
        .expect("the sandboxd root is a writable mount");
    let volume = seq(&spec["template"]["spec"]["volumes"])
        .iter()
        .find(|v| v["name"] == sandboxd["name"])
        .expect("the mount has a volume");
    assert_eq!(volume["emptyDir"]["sizeLimit"], "2Gi");
}

#[test]
fn cluster_role_grants_exactly_what_the_operator_uses() {
    let all = render(&[]);
    assert_eq!(
        names(&all, "ClusterRole"),
        BTreeSet::from(["sc-sandcastle".to_owned(), "sc-sandcastle-crds".to_owned()])
    );
    assert_eq!(
        grants(&object(&all, "ClusterRole", "sc-sandcastle")["rules"]),
        watch_grants()
    );
    assert_eq!(
        grants(&object(&all, "ClusterRole", "sc-sandcastle-crds")["rules"]),
        crd_grants()
    );
    for name in ["sc-sandcastle", "sc-sandcastle-crds"] {
        assert_binds_operator(
            object(&all, "ClusterRoleBinding", name),
            "ClusterRole",
            name,
        );
    }
    let namespaced: Vec<_> = objects(&all, "Role")
        .into_iter()
        .map(|r| str_of(&r["metadata"]["name"]))
        .collect();
    assert_eq!(namespaced, ["sc-sandcastle-leader-election"]);
}

#[test]
fn watched_namespaces_get_roles_and_no_cluster_wide_watch_rights() {
    let all = render(&["-f", &ci("namespaced-values.yaml")]);
    assert_eq!(
        names(&all, "ClusterRole"),
        BTreeSet::from(["sc-sandcastle-crds".to_owned()]),
        "only the CRD check stays cluster-wide"
    );
    assert_eq!(
        grants(&object(&all, "ClusterRole", "sc-sandcastle-crds")["rules"]),
        crd_grants()
    );
    let watch_roles: BTreeMap<&str, &Value> = objects(&all, "Role")
        .into_iter()
        .filter(|r| r["metadata"]["name"] == "sc-sandcastle")
        .map(|r| (str_of(&r["metadata"]["namespace"]), r))
        .collect();
    assert_eq!(
        watch_roles.keys().copied().collect::<Vec<_>>(),
        ["team-a", "team-b"]
    );
    for (namespace, role) in watch_roles {
        assert_eq!(grants(&role["rules"]), watch_grants(), "{namespace}");
        let binding = objects(&all, "RoleBinding")
            .into_iter()
            .find(|b| {
                b["metadata"]["name"] == "sc-sandcastle" && b["metadata"]["namespace"] == namespace
            })
            .unwrap_or_else(|| panic!("no RoleBinding in {namespace}"));
        assert_binds_operator(binding, "Role", "sc-sandcastle");
    }
    let args = args(&all);
    for namespace in ["--namespace=team-a", "--namespace=team-b"] {
        assert!(args.contains(&namespace.to_owned()), "{args:?}");
    }
}

#[test]
fn the_lease_role_lives_in_the_release_namespace_and_names_its_lease() {
    let all = render(&["--set", "leaderElection.leaseName=my-lease"]);
    let role = object(&all, "Role", "sc-sandcastle-leader-election");
    assert_eq!(role["metadata"]["namespace"], "ops");
    assert_eq!(
        grants(&role["rules"]),
        expected(&[
            ("coordination.k8s.io", &["leases"], &["create"], &[]),
            (
                "coordination.k8s.io",
                &["leases"],
                &["get", "patch"],
                &["my-lease"]
            ),
        ])
    );
    let binding = object(&all, "RoleBinding", "sc-sandcastle-leader-election");
    assert_eq!(binding["metadata"]["namespace"], "ops");
    assert_binds_operator(binding, "Role", "sc-sandcastle-leader-election");
    assert!(args(&all).contains(&"--leader-election-lease=my-lease".to_owned()));
}

#[test]
fn crds_carry_the_keep_policy_only_when_asked_and_vanish_when_disabled() {
    let crd_names = BTreeSet::from([
        "agenttasks.sandcastle.dev".to_owned(),
        "sandboxtemplates.sandcastle.dev".to_owned(),
    ]);
    let kept = render(&[]);
    assert_eq!(names(&kept, "CustomResourceDefinition"), crd_names);
    for crd in objects(&kept, "CustomResourceDefinition") {
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep"
        );
        assert_eq!(
            crd["metadata"]["labels"]["app.kubernetes.io/instance"],
            "sc"
        );
    }
    let dropped = render(&["--set", "crds.keep=false"]);
    assert_eq!(names(&dropped, "CustomResourceDefinition"), crd_names);
    for crd in objects(&dropped, "CustomResourceDefinition") {
        assert!(
            crd["metadata"].get("annotations").is_none(),
            "{:?}",
            crd["metadata"]
        );
    }
    let absent = render(&["-f", &ci("no-crds-values.yaml")]);
    assert!(objects(&absent, "CustomResourceDefinition").is_empty());
    assert_eq!(objects(&absent, "Deployment").len(), 1);
}

#[test]
fn optional_objects_follow_their_switches() {
    let defaults = render(&[]);
    assert_eq!(objects(&defaults, "Service").len(), 1);
    assert!(objects(&defaults, "ServiceMonitor").is_empty());
    assert!(objects(&defaults, "NetworkPolicy").is_empty());

    let all = render(&["-f", &ci("namespaced-values.yaml")]);
    let monitor = object(&all, "ServiceMonitor", "sc-sandcastle");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["namespaceSelector"]["matchNames"][0], "ops");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http-metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    let service = object(&all, "Service", "sc-sandcastle-metrics");
    let service_labels = service["metadata"]["labels"].as_mapping().expect("labels");
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("matchLabels");
    assert!(!selector.is_empty());
    for (key, value) in selector {
        assert_eq!(
            service_labels.get(key),
            Some(value),
            "the monitor must select the Service"
        );
    }

    let policy = object(&all, "NetworkPolicy", "sc-sandcastle");
    let spec = &policy["spec"];
    assert_eq!(
        spec["podSelector"]["matchLabels"],
        deployment(&all)["spec"]["selector"]["matchLabels"]
    );
    let ingress = seq(&spec["ingress"]);
    assert_eq!(ingress.len(), 1, "only the admin port is reachable");
    assert_eq!(ingress[0]["ports"][0]["port"], "http-metrics");
    assert_eq!(
        ingress[0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    let egress_ports: BTreeSet<(u64, &str)> = seq(&spec["egress"])
        .iter()
        .flat_map(|rule| seq(&rule["ports"]))
        .map(|port| {
            (
                port["port"].as_u64().expect("numeric port"),
                str_of(&port["protocol"]),
            )
        })
        .collect();
    assert_eq!(
        egress_ports,
        BTreeSet::from([(53, "UDP"), (53, "TCP"), (443, "TCP"), (6443, "TCP")])
    );

    let quiet = render(&[
        "--set",
        "service.enabled=false",
        "--set",
        "podDisruptionBudget.enabled=false",
    ]);
    assert!(objects(&quiet, "Service").is_empty());
    assert!(objects(&quiet, "PodDisruptionBudget").is_empty());
    let err = template(&[
        "--set",
        "service.enabled=false",
        "--set",
        "serviceMonitor.enabled=true",
    ])
    .expect_err("a ServiceMonitor without its Service is refused");
    assert!(
        err.contains("serviceMonitor.enabled needs service.enabled"),
        "{err}"
    );
}

#[test]
fn e2b_settings_and_the_api_key_reference_reach_the_operator() {
    let defaults = render(&[]);
    assert!(env(&defaults, "E2B_API_KEY").is_none());
    let chart: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart_dir().join("Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart.yaml parses");
    assert_eq!(
        container(&defaults)["image"],
        format!("sandcastle:{}", str_of(&chart["appVersion"])).as_str(),
        "the tag defaults to appVersion"
    );

    let all = render(&["-f", &ci("e2b-values.yaml")]);
    let args = args(&all);
    for expected in [
        "--provider=e2b",
        "--e2b-domain=e2b.internal.example.com",
        "--e2b-api-url=https://api.e2b.internal.example.com",
        "--e2b-sandbox-url=https://{port}-{sandboxId}.{domain}",
        "--max-running-tasks-per-namespace=5",
        "--log-format=text",
    ] {
        assert!(
            args.contains(&expected.to_owned()),
            "{expected} missing from {args:?}"
        );
    }
    let key = &env(&all, "E2B_API_KEY").expect("E2B_API_KEY")["valueFrom"]["secretKeyRef"];
    assert_eq!(key["name"], "e2b-api-key");
    assert_eq!(key["key"], "api-key");
    assert_eq!(
        container(&all)["image"],
        "registry.example.com/sandcastle@sha256:0000000000000000000000000000000000000000000000000000000000000000"
    );
}

#[test]
fn large_numbers_render_as_plain_integers() {
    // Helm reads numbers as floats; printed naively, 86400000 becomes 8.64e+07.
    let all = render(&[
        "--set",
        "operator.sweepOrphansEvery=86400000",
        "--set",
        "operator.maxRunningTasks=100000000",
        "--set",
        "terminationGracePeriodSeconds=86400000",
    ]);
    let args = args(&all);
    assert!(
        args.contains(&"--sweep-orphans-every=86400000".to_owned()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--max-running-tasks=100000000".to_owned()),
        "{args:?}"
    );
    assert_eq!(
        deployment(&all)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64(),
        Some(86_400_000)
    );
}

/// The release notes, rendered the way `helm install` prints them, without a cluster.
fn notes(args: &[&str]) -> String {
    let out = output(
        helm()
            .args(["install", "sc", "--dry-run=client", "--namespace", "ops"])
            .arg(chart_dir())
            .args(args),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let (_, notes) = stdout.split_once("NOTES:").expect("helm prints NOTES");
    notes.to_owned()
}

#[test]
fn notes_warn_about_the_embedded_provider_and_a_missing_api_key() {
    let embedded = notes(&["--set", "provider.embedded.enabled=true"]);
    for expected in [
        "DEVELOPMENT ONLY",
        "exactly 1 replica",
        "unconfined",
        "ServiceAccount token",
        "kubectl -n ops rollout status deployment/sc-sandcastle",
    ] {
        assert!(
            embedded.contains(expected),
            "{expected:?} missing from:\n{embedded}"
        );
    }
    assert!(!embedded.contains("spec.provider.e2b"), "{embedded}");

    let keyless = notes(&[]);
    assert!(keyless.contains("spec.provider.e2b"), "{keyless}");
    assert!(keyless.contains("ProviderNotConfigured"), "{keyless}");
    assert!(!keyless.contains("DEVELOPMENT ONLY"), "{keyless}");

    let keyed = notes(&["--set", "provider.e2b.apiKeySecretRef.name=e2b"]);
    assert!(!keyed.contains("spec.provider.e2b"), "{keyed}");
    assert!(keyed.contains("Secret e2b (key api-key)"), "{keyed}");
}

#[test]
fn the_values_schema_rejects_typos_and_wrong_types() {
    template(&["--set", "replicaCount=3"]).expect("a valid value renders");
    for (set, complaint) in [
        ("replicaCount=two", "replicaCount"),
        ("replicaCuont=2", "replicaCuont"),
        ("provider.e2b.apiKeySecretRef.nmae=x", "nmae"),
        ("provider.embedded.isolation=bwrap", "isolation"),
        ("crds.enabled=yes", "enabled"),
        ("replicaCount=0", "replicaCount"),
    ] {
        let err = template(&["--set", set]).expect_err(&format!("--set {set} must be refused"));
        assert!(
            err.contains("schema") && err.contains(complaint),
            "--set {set}: {err}"
        );
    }
}

#[test]
fn the_values_schema_closes_every_object_and_matches_values_yaml() {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).expect("the schema"),
    )
    .expect("the schema is JSON");
    let values: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml parses");
    let mut checked = 0;
    check_closed(&schema, &values, "", &mut checked);
    assert!(checked >= 15, "only {checked} objects checked");
}

/// Every schema object that names its properties forbids others, and values.yaml sets each
/// named property (parent charts inject `global`, so only it may be missing).
fn check_closed(
    schema: &serde_json::Value,
    values: &serde_json::Value,
    path: &str,
    checked: &mut usize,
) {
    let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) else {
        return;
    };
    *checked += 1;
    assert_eq!(
        schema.get("additionalProperties"),
        Some(&serde_json::Value::Bool(false)),
        "{path}: the schema must reject unknown keys"
    );
    let present: BTreeSet<&str> = values
        .as_object()
        .unwrap_or_else(|| panic!("{path}: values.yaml has no object here"))
        .keys()
        .map(String::as_str)
        .collect();
    let described: BTreeSet<&str> = properties
        .keys()
        .map(String::as_str)
        .filter(|key| !(path.is_empty() && *key == "global"))
        .collect();
    assert_eq!(
        present, described,
        "{path}: values.yaml and the schema differ"
    );
    for (key, sub) in properties {
        if let Some(value) = values.get(key) {
            check_closed(sub, value, &format!("{path}.{key}"), checked);
        }
    }
}

fn yaml_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .map(|path| {
            let name = path
                .file_name()
                .expect("a file name")
                .to_string_lossy()
                .into_owned();
            let bytes = std::fs::read(&path).expect("a readable file");
            (name, bytes)
        })
        .collect()
}

#[test]
fn the_chart_carries_byte_identical_copies_of_crds() {
    let canonical = yaml_files(&root().join("crds"));
    let copies = yaml_files(&chart_dir().join("files/crds"));
    assert_eq!(
        copies.keys().collect::<Vec<_>>(),
        canonical.keys().collect::<Vec<_>>(),
        "charts/sandcastle/files/crds/ and crds/ hold different files: {REFRESH_CRDS}"
    );
    for (name, bytes) in &canonical {
        assert!(
            copies[name] == *bytes,
            "charts/sandcastle/files/crds/{name} differs from crds/{name}: {REFRESH_CRDS}"
        );
    }
}

#[test]
fn rendered_crds_equal_crds_apart_from_the_chart_metadata() {
    let chart_labels = [
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/part-of",
        "helm.sh/chart",
    ];
    let all = render(&[]);
    let rendered = objects(&all, "CustomResourceDefinition");
    let canonical = yaml_files(&root().join("crds"));
    assert_eq!(rendered.len(), canonical.len());
    for (name, bytes) in canonical {
        let want: Value = serde_yaml::from_slice(&bytes).expect("a CRD file parses");
        let mut got = rendered
            .iter()
            .find(|crd| crd["metadata"]["name"] == want["metadata"]["name"])
            .map(|crd| (*crd).clone())
            .unwrap_or_else(|| panic!("crds/{name} is not rendered"));
        let metadata = got["metadata"].as_mapping_mut().expect("metadata");
        let labels = metadata
            .remove("labels")
            .expect("the chart labels its CRDs");
        let label_keys: BTreeSet<&str> = labels
            .as_mapping()
            .expect("labels")
            .keys()
            .map(str_of)
            .collect();
        assert_eq!(label_keys, BTreeSet::from(chart_labels), "{name}");
        let annotations = metadata.remove("annotations").expect("kept by default");
        assert_eq!(
            annotations,
            serde_yaml::from_str::<Value>("{helm.sh/resource-policy: keep}").unwrap()
        );
        assert!(
            got == want,
            "the rendered {name} differs from crds/{name}: {REFRESH_CRDS}"
        );
    }
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let out = output(
        Command::new(venv_bin("hadolint"))
            .arg("--no-color")
            .arg(root().join("Dockerfile")),
    );
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "hadolint findings:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn the_image_and_the_chart_agree_on_user_and_command() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("the Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .collect();
    let froms: Vec<Vec<&str>> = instructions
        .iter()
        .filter_map(|line| line.strip_prefix("FROM "))
        .map(|from| from.split_whitespace().collect())
        .collect();
    assert!(froms.len() >= 2, "a builder and a runtime stage");
    let aliases: Vec<&str> = froms
        .iter()
        .filter_map(|words| words.get(2).copied())
        .collect();
    let stages: Vec<&str> = froms
        .iter()
        .map(|words| words[0])
        .filter(|image| !aliases.contains(image))
        .collect();
    for image in stages {
        let (registry, _) = image.split_once('/').expect("a registry host");
        let (_, tag) = image.rsplit_once(':').expect("a tag");
        assert!(
            registry.contains('.') && tag != "latest",
            "{image}: base images are fully qualified and pinned"
        );
    }
    let runtime = instructions
        .iter()
        .rposition(|line| line.starts_with("FROM "))
        .expect("a FROM");
    let runtime_stage = &instructions[runtime..];
    assert_eq!(
        runtime_stage[0],
        "FROM gcr.io/distroless/cc-debian12:nonroot"
    );
    assert!(runtime_stage.contains(&"USER 65532:65532"));
    assert!(runtime_stage.contains(&r#"ENTRYPOINT ["/usr/local/bin/sandcastle"]"#));
    assert!(runtime_stage.contains(&r#"CMD ["run"]"#));
    assert!(
        !runtime_stage.iter().any(|line| line.starts_with("RUN ")),
        "the runtime stage has no shell to run anything with"
    );
    let all = render(&[]);
    assert_eq!(
        deployment(&all)["spec"]["template"]["spec"]["securityContext"]["runAsUser"].as_u64(),
        Some(RESTRICTED_UID)
    );
    assert!(
        container(&all).get("command").is_none(),
        "the image's entrypoint runs"
    );
}

fn sandboxd_args(all: &[Value]) -> Vec<String> {
    let pod = &object(all, "Deployment", "sc-sandcastle-sandboxd")["spec"]["template"]["spec"];
    let containers = seq(&pod["containers"]);
    assert_eq!(containers.len(), 1, "the sandbox server has one container");
    seq(&containers[0]["args"])
        .iter()
        .map(|arg| str_of(arg).to_owned())
        .collect()
}

fn assert_binds_sandboxd(binding: &Value, role: &str) {
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(binding["roleRef"]["name"], role);
    let subjects = seq(&binding["subjects"]);
    assert_eq!(subjects.len(), 1, "{binding:?}");
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    assert_eq!(subjects[0]["name"], "sc-sandcastle-sandboxd");
    assert_eq!(subjects[0]["namespace"], "ops");
}

#[test]
fn the_sandbox_server_gets_exactly_its_grants_in_its_namespaces_and_the_operator_uses_it() {
    let all = render(&["-f", &ci("sandboxd-values.yaml")]);

    let role = object(&all, "Role", "sc-sandcastle-sandboxd");
    assert_eq!(role["metadata"]["namespace"], "sandboxes");
    assert_eq!(
        grants(&role["rules"]),
        expected(&[
            (
                "",
                &["pods"],
                &["get", "list", "watch", "create", "patch", "delete"],
                &[]
            ),
            ("", &["secrets"], &["get", "create"], &[]),
            ("networking.k8s.io", &["networkpolicies"], &["create"], &[]),
            (
                "",
                &["configmaps"],
                &[
                    "get",
                    "list",
                    "create",
                    "update",
                    "patch",
                    "delete",
                    "deletecollection"
                ],
                &[]
            ),
        ])
    );
    let binding = object(&all, "RoleBinding", "sc-sandcastle-sandboxd");
    assert_eq!(binding["metadata"]["namespace"], "sandboxes");
    assert_binds_sandboxd(binding, "sc-sandcastle-sandboxd");

    let builds = object(&all, "Role", "sc-sandcastle-sandboxd-builds");
    assert_eq!(builds["metadata"]["namespace"], "sandbox-builds");
    assert_eq!(
        grants(&builds["rules"]),
        expected(&[
            (
                "batch",
                &["jobs"],
                &["get", "create", "delete", "deletecollection"],
                &[]
            ),
            ("", &["pods"], &["list"], &[]),
            ("", &["pods/log"], &["get"], &[]),
            ("", &["configmaps"], &["create"], &[]),
        ])
    );
    let binding = object(&all, "RoleBinding", "sc-sandcastle-sandboxd-builds");
    assert_eq!(binding["metadata"]["namespace"], "sandbox-builds");
    assert_binds_sandboxd(binding, "sc-sandcastle-sandboxd-builds");
    for binding in objects(&all, "ClusterRoleBinding") {
        assert!(
            seq(&binding["subjects"])
                .iter()
                .all(|subject| subject["name"] != "sc-sandcastle-sandboxd"),
            "the sandbox server has no cluster-wide rights: {binding:?}"
        );
    }

    let server = sandboxd_args(&all);
    for expected in [
        "sandboxd-kubernetes",
        "--namespace=sandboxes",
        "--base-image=registry.example.com/sandbox-full:latest",
        "--envd-image=registry.example.com/sandcastle:0.1.0",
        "--server-label=app.kubernetes.io/instance=sc",
        "--server-label=app.kubernetes.io/name=sandcastle-sandboxd",
        "--server-namespace=ops",
        "--runtime-class-name=gvisor",
        "--node-selector=sandcastle.dev/sandboxes=true",
        "--cpu-request-fraction=0.25",
        "--builder-image=registry.example.com/sandcastle-builder:v1.24.0",
        "--builder-repository=registry.internal:5000/templates",
        "--builder-namespace=sandbox-builds",
        "--build-timeout=1800",
        "--builder-insecure",
    ] {
        assert!(
            server.contains(&expected.to_owned()),
            "{expected} missing from {server:?}"
        );
    }
    let tolerations = server
        .iter()
        .find_map(|arg| arg.strip_prefix("--tolerations="))
        .expect("--tolerations");
    let tolerations: serde_json::Value = serde_json::from_str(tolerations).expect("JSON");
    assert_eq!(tolerations[0]["key"], "sandcastle.dev/sandboxes");

    let operator = args(&all);
    for expected in [
        "--provider=e2b",
        "--e2b-api-url=http://sc-sandcastle-sandboxd.ops.svc:3000",
        "--e2b-sandbox-url=http://sc-sandcastle-sandboxd.ops.svc:49983",
    ] {
        assert!(
            operator.contains(&expected.to_owned()),
            "{expected} missing from {operator:?}"
        );
    }
    assert!(!operator.iter().any(|arg| arg.starts_with("--e2b-domain")));
    let key = &env(&all, "E2B_API_KEY").expect("E2B_API_KEY")["valueFrom"]["secretKeyRef"];
    assert_eq!(key["name"], "sc-sandcastle-sandboxd");
    assert_eq!(key["key"], "api-key");
    let secret = object(&all, "Secret", "sc-sandcastle-sandboxd");
    assert_eq!(
        str_of(&secret["data"]["api-key"]).len(),
        56,
        "40 random characters, base64"
    );

    // Each Deployment's selector matches only its own pods, so neither adopts the other's.
    let operator_pods = &deployment(&all)["spec"];
    let server_pods = &object(&all, "Deployment", "sc-sandcastle-sandboxd")["spec"];
    let matches = |selector: &Value, labels: &Value| {
        selector["matchLabels"]
            .as_mapping()
            .expect("matchLabels")
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    };
    assert!(matches(
        &operator_pods["selector"],
        &operator_pods["template"]["metadata"]["labels"]
    ));
    assert!(matches(
        &server_pods["selector"],
        &server_pods["template"]["metadata"]["labels"]
    ));
    assert!(!matches(
        &operator_pods["selector"],
        &server_pods["template"]["metadata"]["labels"]
    ));
    assert!(!matches(
        &server_pods["selector"],
        &operator_pods["template"]["metadata"]["labels"]
    ));
    let pdb = object(&all, "PodDisruptionBudget", "sc-sandcastle");
    assert!(!matches(
        &pdb["spec"]["selector"],
        &server_pods["template"]["metadata"]["labels"]
    ));

    let policy = object(&all, "NetworkPolicy", "sc-sandcastle");
    let to_server = seq(&policy["spec"]["egress"])
        .iter()
        .find(|rule| {
            rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                == "sandcastle-sandboxd"
        })
        .expect("egress to the sandbox server");
    let ports: BTreeSet<u64> = seq(&to_server["ports"])
        .iter()
        .map(|port| port["port"].as_u64().expect("a port number"))
        .collect();
    assert_eq!(ports, BTreeSet::from([3000, 49983]));

    let notes = notes(&["-f", &ci("sandboxd-values.yaml")]);
    for expected in [
        "E2B_API_URL=http://sc-sandcastle-sandboxd.ops.svc:3000",
        "E2B_SANDBOX_URL=http://sc-sandcastle-sandboxd.ops.svc:49983",
        "Secret sc-sandcastle-sandboxd, key api-key",
        "under RuntimeClass gvisor",
        "kaniko Jobs in sandbox-builds",
    ] {
        assert!(
            notes.contains(expected),
            "{expected:?} missing from:\n{notes}"
        );
    }
    assert!(!notes.contains("spec.provider.e2b"), "{notes}");
}

#[test]
fn the_sandbox_server_without_a_builder_has_no_build_rights_and_bad_combinations_fail() {
    let base = [
        "--set",
        "sandboxd.enabled=true",
        "--set",
        "sandboxd.baseImage=base:1",
    ];
    let all = render(&base);
    assert!(
        !names(&all, "Role").contains("sc-sandcastle-sandboxd-builds"),
        "no builder, no build Role"
    );
    assert_eq!(
        object(&all, "Role", "sc-sandcastle-sandboxd")["metadata"]["namespace"],
        "ops",
        "sandboxes default to the release namespace"
    );
    let server = sandboxd_args(&all);
    assert!(
        server.contains(&"--cpu-request-fraction=1".to_owned()),
        "{server:?}"
    );
    let denied: Vec<&String> = server
        .iter()
        .filter(|arg| arg.starts_with("--deny-cidr="))
        .collect();
    assert_eq!(
        denied.len(),
        5,
        "the private and metadata ranges: {server:?}"
    );
    assert!(server.contains(&"--deny-cidr=169.254.0.0/16".to_owned()));
    let mut extra = base.to_vec();
    extra.extend(["--set", "sandboxd.extraDenyCidrs={203.0.113.7/32}"]);
    let with_extra = sandboxd_args(&render(&extra));
    assert!(
        with_extra.contains(&"--deny-cidr=203.0.113.7/32".to_owned())
            && with_extra.contains(&"--deny-cidr=10.0.0.0/8".to_owned()),
        "extraDenyCidrs adds to the defaults: {with_extra:?}"
    );
    let mut five = base.to_vec();
    five.extend(["--set", "sandboxd.cpuRequestPercent=5"]);
    assert!(
        sandboxd_args(&render(&five)).contains(&"--cpu-request-fraction=0.05".to_owned()),
        "a percent set on the command line is a fraction for the server"
    );
    assert!(
        !server.iter().any(|arg| arg.starts_with("--builder")),
        "{server:?}"
    );
    assert!(
        !server
            .iter()
            .any(|arg| arg.starts_with("--server-namespace")),
        "{server:?}"
    );
    assert!(
        server.contains(&format!(
            "--envd-image={}",
            str_of(&container(&all)["image"])
        )),
        "envd comes from the operator's image by default: {server:?}"
    );
    assert!(notes(&base).contains("templates with RUN or COPY steps fail"));

    let own_key = render(&[
        "--set",
        "sandboxd.enabled=true",
        "--set",
        "sandboxd.baseImage=base:1",
        "--set",
        "sandboxd.apiKeySecretRef.name=mine",
    ]);
    assert!(!names(&own_key, "Secret").contains("sc-sandcastle-sandboxd"));
    let key = &env(&own_key, "E2B_API_KEY").expect("E2B_API_KEY")["valueFrom"]["secretKeyRef"];
    assert_eq!(key["name"], "mine");

    for (extra, complaint) in [
        (vec![], "sandboxd.baseImage is required"),
        (
            vec![
                "--set",
                "sandboxd.baseImage=base:1",
                "--set",
                "provider.embedded.enabled=true",
            ],
            "exclude each other",
        ),
        (
            vec![
                "--set",
                "sandboxd.baseImage=base:1",
                "--set",
                "sandboxd.builder.image=kaniko:1",
            ],
            "sandboxd.builder.repository is required",
        ),
    ] {
        let mut args = vec!["--set", "sandboxd.enabled=true"];
        args.extend(extra);
        let err = template(&args).expect_err(&format!("{args:?} must be refused"));
        assert!(err.contains(complaint), "{args:?}: {err}");
    }
}
