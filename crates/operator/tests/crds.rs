//! The CRDs without a cluster: drift against `crds/`, the examples, and the CEL rules
//! evaluated client-side on the same table the apiserver test uses.

use kube::CustomResourceExt;
use kube::core::cel::Validator;
use sandcastle_api::{self as crd, AgentTask, SandboxTemplate};
use sandcastle_testkit::cases;
use serde_json::Value;

fn schema_of(kind: &str) -> Value {
    let crd = match kind {
        "AgentTask" => AgentTask::crd(),
        "SandboxTemplate" => SandboxTemplate::crd(),
        other => panic!("no CRD for kind {other}"),
    };
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the CRD has a schema");
    serde_json::to_value(schema).expect("the schema serializes")
}

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = sandcastle_testkit::repo().join("crds");
    for one in crd::all() {
        let path = dir.join(crd::file_name(&one));
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
        let generated = crd::to_yaml(std::slice::from_ref(&one)).expect("the CRD renders");
        assert!(
            committed == generated,
            "{} is stale: run `cargo run -- crd --out crds && cargo run -- crd --out charts/sandcastle/files/crds` and commit both (the chart carries a copy)",
            path.display()
        );
    }
    let files = std::fs::read_dir(&dir).expect("crds/ is readable").count();
    assert_eq!(
        files,
        crd::all().len(),
        "crds/ holds a file no CRD generates"
    );
}

#[test]
fn cel_cases_are_rejected_client_side_with_their_message() {
    let validator = Validator::new();
    let cel_cases: Vec<_> = cases::invalid_cases()
        .into_iter()
        .filter(|case| case.check == cases::Check::Cel)
        .collect();
    assert!(cel_cases.len() >= 20, "the table lost its CEL cases");
    for case in cel_cases {
        let schema = schema_of(&case.kind);
        let (object, old) = match case.updated_object("x") {
            Some(updated) => (updated, Some(case.object("x"))),
            None => (case.object("x"), None),
        };
        let errors = validator
            .validate(&schema, &object, old.as_ref())
            .expect_err(&format!("case {:?} passed client-side CEL", case.name));
        assert!(
            errors
                .iter()
                .any(|e| e.message.contains(&case.message) && e.field_path == case.field),
            "case {:?}: expected {:?} at {} among {errors:?}",
            case.name,
            case.message,
            case.field
        );
    }
}

#[test]
fn schema_cases_pass_cel_so_only_the_schema_rejects_them() {
    // Keeps the table honest: a case labelled `schema` must not rely on a CEL rule.
    let validator = Validator::new();
    for case in cases::invalid_cases()
        .into_iter()
        .filter(|case| case.check == cases::Check::Schema)
    {
        let errors = validator.validate(&schema_of(&case.kind), &case.object("x"), None);
        if let Err(errors) = errors {
            assert!(
                !errors.iter().any(|e| e.message.contains(&case.message)),
                "case {:?} is labelled schema but a CEL rule gives its message",
                case.name
            );
        }
    }
}

#[test]
fn examples_deserialize_and_pass_cel() {
    let validator = Validator::new();
    let mut resources = 0;
    for (path, docs) in cases::examples() {
        for doc in docs {
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            let result = match kind.as_str() {
                "AgentTask" => serde_json::from_value::<AgentTask>(doc.clone()).map(drop),
                "SandboxTemplate" => {
                    serde_json::from_value::<SandboxTemplate>(doc.clone()).map(drop)
                }
                _ => continue,
            };
            result.unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            validator
                .validate(&schema_of(&kind), &doc, None)
                .unwrap_or_else(|err| panic!("{}: {err:?}", path.display()));
            resources += 1;
        }
    }
    assert!(resources >= 5, "examples/ lost its resources");
}

#[test]
fn unchanged_spec_passes_the_immutability_rule() {
    let validator = Validator::new();
    let task = cases::invalid_cases()
        .into_iter()
        .find(|case| case.name == "changed prompt")
        .expect("the table has the immutability case");
    let object = task.object("x");
    validator
        .validate(&schema_of("AgentTask"), &object, Some(&object))
        .expect("re-applying the same spec is allowed");
}
