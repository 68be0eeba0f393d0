use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};

/// How long the apiserver gets to establish a CRD.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the CRDs could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("applying CRD {name}: {source}")]
    Apply {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("CRD {name} was not established within {ESTABLISH_TIMEOUT:?}")]
    NotEstablished { name: String },
    #[error("waiting for CRD {name}: {source}")]
    Wait {
        name: String,
        #[source]
        source: kube::runtime::wait::Error,
    },
}

/// Applies both CRDs with server-side apply and waits until the apiserver serves them.
pub async fn install(client: &kube::Client) -> Result<(), InstallError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("sandcastle").force();
    for crd in super::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .map_err(|source| InstallError::Apply {
                name: name.clone(),
                source,
            })?;
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        match tokio::time::timeout(ESTABLISH_TIMEOUT, established).await {
            Err(_) => return Err(InstallError::NotEstablished { name }),
            Ok(Err(source)) => return Err(InstallError::Wait { name, source }),
            Ok(Ok(_)) => {}
        }
    }
    Ok(())
}
