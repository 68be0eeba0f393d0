//! The operator's control loops. Each reconciler fetches, computes with `crate::status`
//! and `crate::template_build`, and writes status with server-side apply.
//!
//! Templates are built on their provider (`template`); tasks so far record that they were
//! seen, so GitOps tools never mistake an empty status for a healthy one.

mod pool;
mod task;
mod template;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret};
use k8s_openapi::api::events;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, CustomResourceExt, Resource, ResourceExt};
use serde::Serialize;

use crate::metrics::{Metrics, ReconcileResult};
use sandcastle_api::{AgentTask, SandboxTemplate};
use sandcastle_e2b::client::E2bClient;

/// The field manager of every write the operator makes.
pub use sandcastle_api::names::FIELD_MANAGER;

/// Why the operator cannot run or a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "CRD {0} is not installed: apply crds/ (kubectl apply --server-side -f crds/) or install the Helm chart"
    )]
    CrdMissing(String),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    CleanupBlocked(String),
    #[error("the {0} cache did not sync")]
    CacheNotReady(&'static str),
    /// The object changed since this pass read it: the pass worked from an old copy, and
    /// the change will bring a new one.
    #[error("the object changed since it was read")]
    Stale,
}

/// Which objects the operator watches.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// These namespaces, or every namespace when empty.
    pub namespaces: Vec<String>,
}

impl Scope {
    /// Each watched namespace, or `None` for all of them.
    fn targets(&self) -> Vec<Option<&str>> {
        if self.namespaces.is_empty() {
            return vec![None];
        }
        self.namespaces.iter().map(|ns| Some(ns.as_str())).collect()
    }

    fn covers(&self, namespace: &str) -> bool {
        self.namespaces.is_empty() || self.namespaces.iter().any(|watched| watched == namespace)
    }
}

/// What the operator is configured with beyond the cluster it watches.
#[derive(Clone)]
pub struct Settings {
    /// The provider of templates that do not name their own: the embedded server, an
    /// E2B account configured on the operator, or none.
    pub default_provider: Option<E2bClient>,
    /// The operator's embedded server, when it runs one (`spec.provider.embedded`).
    pub embedded: Option<E2bClient>,
    pub metrics: Arc<Metrics>,
    /// Template builds allowed to run at once.
    pub max_concurrent_builds: usize,
    /// How often a Ready template is checked to still exist on its provider.
    pub verify_templates_every: Duration,
    /// How the Claude Code CLI is invoked inside sandboxes (a name on the sandbox's PATH,
    /// or an absolute path).
    pub claude_command: String,
    /// Marks the sandboxes this operator creates, so its orphan sweep touches only those.
    pub instance: String,
    /// How often sandboxes of deleted tasks are looked for.
    pub sweep_orphans_every: Duration,
    /// Tasks allowed to hold a sandbox at once; more wait in the `Queued` phase.
    pub max_running_tasks: usize,
    /// The same cap per namespace, if any.
    pub max_running_tasks_per_namespace: Option<usize>,
}

struct Context {
    client: Client,
    recorder: Recorder,
    default_provider: Option<E2bClient>,
    embedded: Option<E2bClient>,
    metrics: Arc<Metrics>,
    builds: BuildTracker,
    verify_templates_every: Duration,
    claude_command: String,
    instance: String,
    scope: Scope,
    max_running_tasks: usize,
    max_running_tasks_per_namespace: Option<usize>,
    caches: Caches,
    /// What this process remembers of tasks between passes (see its invariants).
    memory: task::TaskMemory,
    /// The warm pools' idle sandboxes, as the template controller last saw them.
    pools: pool::Pools,
    /// When this process started its controllers: no other process makes sandboxes for a
    /// task created after that.
    started: jiff::Timestamp,
}

type TaskRef = ObjectRef<DeserializeGuard<AgentTask>>;

/// The controllers' caches, which the reconcilers read instead of asking the apiserver on
/// every pass; each task controller adds its own as it starts.
#[derive(Default)]
struct Caches {
    tasks: Mutex<Vec<Store<DeserializeGuard<AgentTask>>>>,
    templates: Mutex<Vec<Store<DeserializeGuard<SandboxTemplate>>>>,
    /// How to wake a task's reconcile, per task controller: its namespace (`None` for
    /// all) and the trigger it listens to.
    wake: Mutex<Vec<(Option<String>, UnboundedSender<TaskRef>)>>,
}

/// A cache that has not listed its objects after this long fails the pass, which is then
/// retried, instead of answering from half a list.
const CACHE_SYNC: Duration = Duration::from_secs(30);

impl Caches {
    async fn synced<K>(stores: Vec<Store<K>>, what: &'static str) -> Result<Vec<Store<K>>, Error>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        for store in &stores {
            tokio::time::timeout(CACHE_SYNC, store.wait_until_ready())
                .await
                .map_err(|_| Error::CacheNotReady(what))?
                .map_err(|_| Error::CacheNotReady(what))?;
        }
        Ok(stores)
    }

    /// Every task the operator watches (those that match the types), once the caches
    /// have listed them.
    async fn tasks(&self) -> Result<Vec<Arc<DeserializeGuard<AgentTask>>>, Error> {
        let stores = self.tasks.lock().expect("task caches").clone();
        let stores = Self::synced(stores, "AgentTask").await?;
        Ok(stores
            .iter()
            .flat_map(|store| store.state())
            .filter(|guard| guard.0.is_ok())
            .collect())
    }

    async fn template(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<SandboxTemplate>, Error> {
        let stores = self.templates.lock().expect("template caches").clone();
        let stores = Self::synced(stores, "SandboxTemplate").await?;
        let key = ObjectRef::new(name).within(namespace);
        Ok(stores
            .iter()
            .find_map(|store| store.get(&key))
            .and_then(|guard| guard.0.as_ref().ok().cloned()))
    }

    /// Every template the operator watches, once the caches have listed them.
    async fn templates(&self) -> Result<Vec<SandboxTemplate>, Error> {
        let stores = self.templates.lock().expect("template caches").clone();
        let stores = Self::synced(stores, "SandboxTemplate").await?;
        Ok(stores
            .iter()
            .flat_map(|store| store.state())
            .filter_map(|guard| guard.0.as_ref().ok().cloned())
            .collect())
    }

    /// The trigger of the task controller that watches `namespace`.
    fn waker(&self, namespace: &str) -> Option<UnboundedSender<TaskRef>> {
        self.wake
            .lock()
            .expect("wakers")
            .iter()
            .find(|(watched, _)| {
                watched
                    .as_deref()
                    .is_none_or(|watched| watched == namespace)
            })
            .map(|(_, sender)| sender.clone())
    }
}

/// Which templates are building (bounded by the operator setting) and how far each build's
/// log has been read. In memory: after a restart a build is picked up from its status and
/// its log read again from the start.
struct BuildTracker {
    limit: usize,
    running: Mutex<HashSet<String>>,
    log_offsets: Mutex<HashMap<String, usize>>,
    last_checked: Mutex<HashMap<String, std::time::Instant>>,
}

impl BuildTracker {
    fn new(limit: usize) -> Self {
        BuildTracker {
            limit: limit.max(1),
            running: Mutex::default(),
            log_offsets: Mutex::default(),
            last_checked: Mutex::default(),
        }
    }

    fn limit(&self) -> usize {
        self.limit
    }

    /// Takes a slot for the template unless all are taken by others.
    fn try_start(&self, key: &str) -> bool {
        let mut running = self.running.lock().expect("build slots");
        if running.contains(key) || running.len() < self.limit {
            running.insert(key.to_string());
            true
        } else {
            false
        }
    }

    /// A build found running (after a restart) holds its slot whatever the limit.
    fn resume(&self, key: &str) {
        self.running
            .lock()
            .expect("build slots")
            .insert(key.to_string());
    }

    fn finish(&self, key: &str) {
        self.running.lock().expect("build slots").remove(key);
    }

    /// Whether a Ready template is due for a check on its provider: never checked by this
    /// process, or not within `every`.
    fn check_due(&self, key: &str, every: Duration) -> bool {
        self.last_checked
            .lock()
            .expect("checks")
            .get(key)
            .is_none_or(|at| at.elapsed() >= every)
    }

    fn checked(&self, key: &str) {
        self.last_checked
            .lock()
            .expect("checks")
            .insert(key.to_string(), std::time::Instant::now());
    }

    fn log_offset(&self, build_id: &str) -> Option<usize> {
        self.log_offsets
            .lock()
            .expect("log offsets")
            .get(build_id)
            .copied()
    }

    fn set_log_offset(&self, build_id: &str, offset: usize) {
        self.log_offsets
            .lock()
            .expect("log offsets")
            .insert(build_id.to_string(), offset);
    }

    fn forget_logs(&self, build_id: &str) {
        self.log_offsets
            .lock()
            .expect("log offsets")
            .insert(build_id.to_string(), 0);
    }
}

/// Fails with a message that says what to do when the CRDs are missing.
pub async fn check_crds(client: &Client) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [AgentTask::crd_name(), SandboxTemplate::crd_name()] {
        if crds.get_opt(name).await?.is_none() {
            return Err(Error::CrdMissing(name.to_owned()));
        }
    }
    Ok(())
}

/// Runs the controllers until `shutdown` completes.
pub async fn run(
    client: Client,
    scope: Scope,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    check_crds(&client).await?;
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), Reporter::from(FIELD_MANAGER)),
        default_provider: settings.default_provider,
        embedded: settings.embedded,
        metrics: settings.metrics,
        builds: BuildTracker::new(settings.max_concurrent_builds),
        verify_templates_every: settings.verify_templates_every,
        claude_command: settings.claude_command,
        instance: settings.instance,
        scope: scope.clone(),
        max_running_tasks: settings.max_running_tasks.max(1),
        max_running_tasks_per_namespace: settings
            .max_running_tasks_per_namespace
            .map(|cap| cap.max(1)),
        caches: Caches::default(),
        memory: task::TaskMemory::default(),
        pools: pool::Pools::default(),
        started: jiff::Timestamp::now(),
    });
    let stop = stop_signal(shutdown);
    // kube's Controller watches one namespace or all; a list of namespaces gets a pair of
    // controllers each, sharing the context (and so the caps and build slots).
    let loops = scope.targets().into_iter().flat_map(|namespace| {
        [
            task_controller(&client, namespace, &ctx, stop.clone()).boxed(),
            template_controller(&client, namespace, &ctx, stop.clone()).boxed(),
        ]
    });
    let loops = futures::future::join_all(loops.collect::<Vec<_>>());
    let sweeper = {
        let (ctx, every) = (ctx.clone(), settings.sweep_orphans_every);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                task::sweep_orphans(&ctx).await;
            }
        })
    };
    let keeper = {
        let ctx = ctx.clone();
        tokio::spawn(async move { pool::keep_pools_forever(&ctx).await })
    };
    loops.await;
    sweeper.abort();
    keeper.abort();
    Ok(())
}

fn api_in<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Passes that run at once, per controller. kube's default is no bound, and a started
/// operator then begins a pass for every object in its cache together: 4,000 of the
/// 10,000 finished tasks of the benchmark at once took 17 MB (4.3 KB each), which the
/// allocator kept afterwards. A pass waits mostly on the apiserver or the provider, so a
/// few hundred keep both busy, and a provider that hangs still leaves slots for others.
const RECONCILES_AT_ONCE: u16 = 256;

/// A watch of `api`'s objects kept in a cache without their `managedFields` (nothing in
/// the operator reads them, and they are most of the memory a finished task takes) and
/// without whatever else `slim` drops, and the stream of changes that feeds it.
fn cached_watch<K>(
    api: Api<K>,
    slim: impl Fn(&mut K) + Send + Sync + 'static,
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let objects = watcher(api, watcher::Config::default().any_semantic())
        .backoff(Redial::default())
        .modify(move |object| {
            object.managed_fields_mut().clear();
            slim(object);
        });
    (
        store,
        reflector::reflector(writer, objects).applied_objects(),
    )
}

/// How often the watches try again while the apiserver cannot be reached. kube's default
/// (client-go's) waits up to 30 s and keeps that delay for two minutes after the watches
/// work again, which left the operator blind for 100 s after a 10 s outage; one replica's
/// few watches are little load for an apiserver that is back.
struct Redial {
    delay: Duration,
}

impl Redial {
    const FIRST: Duration = Duration::from_millis(500);
    const MOST: Duration = Duration::from_secs(4);
}

impl Default for Redial {
    fn default() -> Self {
        Redial { delay: Self::FIRST }
    }
}

impl Iterator for Redial {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.delay;
        self.delay = (delay * 2).min(Self::MOST);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for Redial {
    fn reset(&mut self) {
        self.delay = Self::FIRST;
    }
}

async fn task_controller(
    client: &Client,
    namespace: Option<&str>,
    ctx: &Arc<Context>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (task_store, task_changes) = cached_watch(
        api_in::<DeserializeGuard<AgentTask>>(client, namespace),
        |guard| {
            if let Ok(task) = guard.0.as_mut() {
                task::slim_if_finished(task);
            }
        },
    );
    let tasks = Controller::for_stream(task_changes, task_store.clone())
        .with_config(controller::Config::default().concurrency(RECONCILES_AT_ONCE))
        .trigger_backoff(Redial::default());
    ctx.metrics.watch_tasks(task_store.clone());
    let secret_task_store = task_store.clone();
    // Whole templates, cached: a task reads its template from here, and the cache has the
    // change before the task it wakes is reconciled.
    let (template_store, templates) = cached_watch(
        api_in::<DeserializeGuard<SandboxTemplate>>(client, namespace),
        |_| {},
    );
    let (wake, woken) = futures::channel::mpsc::unbounded();
    ctx.caches
        .tasks
        .lock()
        .expect("task caches")
        .push(task_store.clone());
    ctx.caches
        .templates
        .lock()
        .expect("template caches")
        .push(template_store);
    ctx.caches
        .wake
        .lock()
        .expect("wakers")
        .push((namespace.map(str::to_string), wake));
    tasks
        .reconcile_on(woken)
        .watches_stream(templates, move |template| {
            referring(&task_store, &template, |task: &AgentTask, name| {
                task.spec.template_ref.name == name
            })
        })
        .watches(
            api_in::<PartialObjectMeta<Secret>>(client, namespace),
            watcher::Config::default().any_semantic(),
            move |secret| {
                referring(&secret_task_store, &secret, |task: &AgentTask, name| {
                    task.spec
                        .env_from
                        .iter()
                        .any(|source| source.secret_ref.name == name)
                        || task.spec.env.iter().any(|variable| {
                            variable
                                .value_from
                                .as_ref()
                                .is_some_and(|source| source.secret_key_ref.name == name)
                        })
                })
            },
        )
        .graceful_shutdown_on(stop)
        .run(reconcile_task, error_policy, ctx.clone())
        .for_each(|result| async move { log_result("AgentTask", result) })
        .await
}

async fn template_controller(
    client: &Client,
    namespace: Option<&str>,
    ctx: &Arc<Context>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (store, changes) = cached_watch(
        api_in::<DeserializeGuard<SandboxTemplate>>(client, namespace),
        |_| {},
    );
    let templates = Controller::for_stream(changes, store.clone())
        .with_config(controller::Config::default().concurrency(RECONCILES_AT_ONCE))
        .trigger_backoff(Redial::default());
    let config_map_store = store.clone();
    // Metadata only: a data change bumps the resourceVersion, and Secret values never
    // enter the operator's cache.
    templates
        .watches(
            api_in::<PartialObjectMeta<ConfigMap>>(client, namespace),
            watcher::Config::default()
                .any_semantic()
                .labels(&format!("!{}", sandcastle_api::names::TRANSCRIPT_LABEL)),
            move |config_map| {
                referring(
                    &config_map_store,
                    &config_map,
                    |template: &SandboxTemplate, name| {
                        template.spec.build.as_ref().is_some_and(|build| {
                            crate::template_build::referenced_config_maps(build)
                                .iter()
                                .any(|used| used == name)
                        })
                    },
                )
            },
        )
        .watches(
            api_in::<PartialObjectMeta<Secret>>(client, namespace),
            watcher::Config::default().any_semantic(),
            move |secret| {
                referring(&store, &secret, |template: &SandboxTemplate, name| {
                    template
                        .spec
                        .provider
                        .as_ref()
                        .and_then(|provider| provider.e2b.as_ref())
                        .is_some_and(|e2b| e2b.api_key_secret_ref.name == name)
                })
            },
        )
        .graceful_shutdown_on(stop)
        .run(reconcile_template, error_policy, ctx.clone())
        .for_each(|result| async move { log_result("SandboxTemplate", result) })
        .await
}

/// The objects of `store` in the other object's namespace that `uses` says refer to it
/// by name.
fn referring<K, Other>(
    store: &Store<DeserializeGuard<K>>,
    object: &Other,
    uses: impl Fn(&K, &str) -> bool,
) -> Vec<ObjectRef<DeserializeGuard<K>>>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    Other: Resource,
{
    let namespace = object.meta().namespace.clone();
    let name = object.meta().name.clone().unwrap_or_default();
    store
        .state()
        .iter()
        .filter_map(|guard| guard.0.as_ref().ok())
        .filter(|referrer| referrer.meta().namespace == namespace && uses(referrer, &name))
        .map(|referrer| {
            ObjectRef::new(&referrer.name_any()).within(namespace.as_deref().unwrap_or_default())
        })
        .collect()
}

/// One shutdown signal for any number of controllers: each clone completes when
/// `shutdown` does.
fn stop_signal(
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> futures::future::Shared<futures::future::BoxFuture<'static, ()>> {
    shutdown.boxed().shared()
}

fn log_result<T: std::fmt::Debug>(
    kind: &str,
    result: Result<T, kube::runtime::controller::Error<Error, watcher::Error>>,
) {
    match result {
        Ok(object) => tracing::debug!(kind, ?object, "reconciled"),
        // A wake-up or a timer for an object deleted meanwhile: nothing to do.
        Err(kube::runtime::controller::Error::ObjectNotFound(object)) => {
            tracing::debug!(kind, %object, "gone before its reconcile")
        }
        Err(err) => tracing::warn!(kind, error = %err, "reconcile failed"),
    }
}

fn error_policy<K>(_object: Arc<DeserializeGuard<K>>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "will retry");
    Action::requeue(Duration::from_secs(5))
}

// `object`, not `name`: the JSON log writes the span's own name under `name`.
#[tracing::instrument(skip_all, fields(namespace = guard_namespace(&guard), object = guard_name(&guard)))]
async fn reconcile_task(
    guard: Arc<DeserializeGuard<AgentTask>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let metrics = ctx.metrics.clone();
    measured(&metrics, "agenttask", async move {
        match valid(&guard) {
            Some(task) => task::reconcile(Arc::new(task.clone()), ctx).await,
            None => Ok(Action::await_change()),
        }
    })
    .await
}

// `object`, not `name`: the JSON log writes the span's own name under `name`.
#[tracing::instrument(skip_all, fields(namespace = guard_namespace(&guard), object = guard_name(&guard)))]
async fn reconcile_template(
    guard: Arc<DeserializeGuard<SandboxTemplate>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let metrics = ctx.metrics.clone();
    measured(&metrics, "sandboxtemplate", async move {
        match valid(&guard) {
            Some(template) => template::reconcile(Arc::new(template.clone()), ctx).await,
            None => Ok(Action::await_change()),
        }
    })
    .await
}

/// Runs one reconcile and records it under controller-runtime's metric names.
async fn measured(
    metrics: &Metrics,
    controller: &'static str,
    reconcile: impl Future<Output = Result<Action, Error>>,
) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let outcome = reconcile.await;
    let result = match &outcome {
        Err(_) => ReconcileResult::error,
        Ok(action) if *action == Action::await_change() => ReconcileResult::success,
        Ok(_) => ReconcileResult::requeue_after,
    };
    metrics.reconciled(controller, result, started.elapsed());
    outcome
}

/// The object, or `None` (logged) when it does not match the types: one bad object must
/// not stop the watch of all the others.
fn valid<K>(guard: &DeserializeGuard<K>) -> Option<&K> {
    match &guard.0 {
        Ok(object) => Some(object),
        Err(invalid) => {
            tracing::warn!(error = %invalid.error, "object does not match the CRD types; skipped");
            None
        }
    }
}

fn guard_namespace<K: Resource>(guard: &DeserializeGuard<K>) -> String {
    guard.meta().namespace.clone().unwrap_or_default()
}

fn guard_name<K: Resource>(guard: &DeserializeGuard<K>) -> String {
    guard.meta().name.clone().unwrap_or_default()
}

/// The longest object name kube's `Recorder` can name an Event after: it names each one
/// `<object>.<nanoseconds in hex>`, 17 characters more, and a name has at most 253.
const RECORDER_NAME_LIMIT: usize = 236;

/// Publishes `event` about `regarding` through `recorder`; about an object whose name is
/// too long for the recorder's Event names (which the apiserver would refuse), it posts
/// the same Event under a name the apiserver generates from the object's.
async fn publish_event(
    client: &Client,
    recorder: &Recorder,
    event: &Event,
    regarding: &ObjectReference,
) -> Result<(), kube::Error> {
    let name = regarding.name.as_deref().unwrap_or_default();
    if name.len() <= RECORDER_NAME_LIMIT {
        return recorder.publish(event, regarding).await;
    }
    let namespace = regarding.namespace.clone().unwrap_or_default();
    let events: Api<events::v1::Event> = Api::namespaced(client.clone(), &namespace);
    // Object names are ASCII, so any byte index is a character boundary; a generated
    // name's prefix must end in `-` after an alphanumeric character.
    let prefix = format!(
        "{}-",
        name[..RECORDER_NAME_LIMIT].trim_end_matches(['-', '.'])
    );
    let posted = events::v1::Event {
        metadata: ObjectMeta {
            generate_name: Some(prefix),
            namespace: Some(namespace),
            ..ObjectMeta::default()
        },
        action: Some(event.action.clone()),
        reason: Some(event.reason.clone()),
        note: event.note.clone(),
        type_: Some(
            match event.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .into(),
        ),
        event_time: Some(MicroTime(jiff::Timestamp::now())),
        regarding: Some(regarding.clone()),
        related: event.secondary.clone(),
        reporting_controller: Some(FIELD_MANAGER.into()),
        reporting_instance: Some(FIELD_MANAGER.into()),
        ..events::v1::Event::default()
    };
    events.create(&PostParams::default(), &posted).await?;
    Ok(())
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// Applies `status` and returns the resourceVersion it made. `unless_changed` makes the
/// write hold only if the object is still the version read, so a pass working from a
/// stale cache cannot undo a newer status (`Error::Stale`).
async fn apply_status<K, S>(
    client: &Client,
    object: &K,
    status: &S,
    unless_changed: bool,
) -> Result<String, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    S: Serialize,
{
    let api: Api<K> = Api::namespaced(client.clone(), &object.namespace().unwrap_or_default());
    let mut patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    if unless_changed {
        patch["metadata"] = serde_json::json!({"resourceVersion": object.resource_version()});
    }
    let written = api
        .patch_status(
            &object.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|error| match error {
            kube::Error::Api(status) if status.is_conflict() => Error::Stale,
            error => Error::Kube(error),
        })?;
    Ok(written.resource_version().unwrap_or_default())
}
