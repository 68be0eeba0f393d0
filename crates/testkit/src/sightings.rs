//! When each object of a watch was first seen in a given state, on this process's clock:
//! what the benchmarks time a controller's work by.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher;

/// When each object of a watch was first seen in a state `judge` recognises (with its
/// verdict), from a watch that runs until dropped.
pub struct Sightings {
    seen: Arc<Mutex<HashMap<String, (Instant, bool)>>>,
    watch: tokio::task::JoinHandle<()>,
}

impl Sightings {
    /// Starts the watch and returns once its initial list is in.
    pub async fn watch<K>(
        api: Api<K>,
        judge: impl Fn(&K) -> Option<bool> + Send + 'static,
    ) -> Sightings
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let seen: Arc<Mutex<HashMap<String, (Instant, bool)>>> = Arc::default();
        let (listed, ready) = tokio::sync::oneshot::channel();
        let noted = seen.clone();
        let watch = tokio::spawn(async move {
            let mut listed = Some(listed);
            let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
            while let Some(event) = events.next().await {
                let object = match event {
                    Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => object,
                    Ok(watcher::Event::InitDone) => {
                        if let Some(listed) = listed.take() {
                            let _ = listed.send(());
                        }
                        continue;
                    }
                    _ => continue,
                };
                if let Some(verdict) = judge(&object) {
                    let name = object.meta().name.clone().unwrap_or_default();
                    noted
                        .lock()
                        .expect("sightings")
                        .entry(name)
                        .or_insert((Instant::now(), verdict));
                }
            }
        });
        ready.await.expect("the watch lists the objects");
        Sightings { seen, watch }
    }

    /// What was seen so far.
    pub fn so_far(&self) -> HashMap<String, (Instant, bool)> {
        self.seen.lock().expect("sightings").clone()
    }

    pub async fn wait_for(
        &self,
        count: usize,
        limit: Duration,
    ) -> Result<HashMap<String, (Instant, bool)>, String> {
        let deadline = Instant::now() + limit;
        loop {
            let seen = self.seen.lock().expect("sightings").clone();
            if seen.len() >= count {
                return Ok(seen);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "only {} of {count} seen within {limit:?}",
                    seen.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sightings {
    fn drop(&mut self) {
        self.watch.abort();
    }
}
