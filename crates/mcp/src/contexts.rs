//! Execution contexts: a long-lived interpreter each, on a share of a pooled sandbox, so
//! what one call defines the next can use. Calls without a context get an interpreter of
//! their own for the call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::exec::{Execution, Language};
use crate::interpreter::{DRIVER_DIR, Interpreter};
use crate::sandboxes::{Lease, Pool};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Pool(#[from] crate::sandboxes::PoolError),
    #[error(transparent)]
    Interpreter(#[from] crate::interpreter::InterpreterError),
    #[error(
        "no context {0:?}: it was never made, was deleted, or sat idle past the idle \
         timeout; make one with create_context"
    )]
    UnknownContext(String),
    #[error("context {id:?} runs {has}, not {asked}: make a {asked} context for that")]
    WrongLanguage {
        id: String,
        has: &'static str,
        asked: &'static str,
    },
    #[error("at most {0} contexts may exist at once; delete one first")]
    TooManyContexts(usize),
}

struct Context {
    interpreter: Interpreter,
    cwd: String,
    last_used: Instant,
    /// Held for as long as the context lives: its share of the sandbox.
    lease: Lease,
}

/// What `list_contexts` shows of one.
#[derive(Clone, Debug, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContextInfo {
    pub id: String,
    pub language: Language,
    pub sandbox_id: String,
    pub idle_seconds: u64,
}

pub struct Runner {
    pool: Arc<Pool>,
    contexts: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Context>>>>,
    max_contexts: usize,
    context_idle_timeout: Duration,
}

impl Runner {
    pub fn new(pool: Arc<Pool>, max_contexts: usize, context_idle_timeout: Duration) -> Runner {
        Runner {
            pool,
            contexts: Mutex::new(HashMap::new()),
            max_contexts,
            context_idle_timeout,
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub async fn create_context(&self, language: Language) -> Result<ContextInfo, RunError> {
        if self.contexts.lock().expect("contexts lock").len() >= self.max_contexts {
            return Err(RunError::TooManyContexts(self.max_contexts));
        }
        let lease = self.pool.acquire().await?;
        let id = format!("ctx-{:016x}", rand::random::<u64>());
        let cwd = format!("{DRIVER_DIR}/{id}");
        let interpreter = Interpreter::start(lease.envd().clone(), language, &cwd).await?;
        let info = ContextInfo {
            id: id.clone(),
            language,
            sandbox_id: lease.sandbox_id().to_string(),
            idle_seconds: 0,
        };
        let context = Context {
            interpreter,
            cwd,
            last_used: Instant::now(),
            lease,
        };
        self.contexts
            .lock()
            .expect("contexts lock")
            .insert(id, Arc::new(tokio::sync::Mutex::new(context)));
        tracing::info!(context = %info.id, sandbox = %info.sandbox_id, language = language.as_str(), "made a context");
        Ok(info)
    }

    pub async fn delete_context(&self, id: &str) -> Result<(), RunError> {
        let context = self
            .contexts
            .lock()
            .expect("contexts lock")
            .remove(id)
            .ok_or_else(|| RunError::UnknownContext(id.to_string()))?;
        let mut context = context.lock().await;
        end(&mut context).await;
        Ok(())
    }

    pub async fn list_contexts(&self) -> Vec<ContextInfo> {
        let contexts: Vec<(String, Arc<tokio::sync::Mutex<Context>>)> = self
            .contexts
            .lock()
            .expect("contexts lock")
            .iter()
            .map(|(id, context)| (id.clone(), context.clone()))
            .collect();
        let mut infos = Vec::new();
        for (id, context) in contexts {
            let context = context.lock().await;
            infos.push(ContextInfo {
                id,
                language: context.interpreter.language(),
                sandbox_id: context.lease.sandbox_id().to_string(),
                idle_seconds: context.last_used.elapsed().as_secs(),
            });
        }
        infos.sort_by(|a, b| a.id.cmp(&b.id));
        infos
    }

    /// Runs code in a context (its calls one after another), or alone.
    pub async fn run(
        &self,
        code: &str,
        language: Option<Language>,
        context: Option<&str>,
        timeout: Duration,
    ) -> Result<Execution, RunError> {
        let Some(id) = context else {
            return self
                .run_alone(code, language.unwrap_or(Language::Python), timeout)
                .await;
        };
        let context = self
            .contexts
            .lock()
            .expect("contexts lock")
            .get(id)
            .cloned()
            .ok_or_else(|| RunError::UnknownContext(id.to_string()))?;
        let mut context = context.lock().await;
        let has = context.interpreter.language();
        if let Some(asked) = language
            && asked != has
        {
            return Err(RunError::WrongLanguage {
                id: id.to_string(),
                has: has.as_str(),
                asked: asked.as_str(),
            });
        }
        context.last_used = Instant::now();
        let outcome = context.interpreter.run(code, timeout).await;
        context.last_used = Instant::now();
        if context.interpreter.gone().is_some() {
            // Its state is lost: a call that finds the id gone says so plainly.
            self.contexts.lock().expect("contexts lock").remove(id);
            end(&mut context).await;
        }
        Ok(outcome?)
    }

    async fn run_alone(
        &self,
        code: &str,
        language: Language,
        timeout: Duration,
    ) -> Result<Execution, RunError> {
        let lease = self.pool.acquire().await?;
        let cwd = format!("{DRIVER_DIR}/call-{:016x}", rand::random::<u64>());
        let mut interpreter = Interpreter::start(lease.envd().clone(), language, &cwd).await?;
        let outcome = interpreter.run(code, timeout).await;
        interpreter.kill().await;
        let _ = lease.envd().remove(&cwd).await;
        Ok(outcome?)
    }

    /// Ends the contexts idle past the idle timeout.
    pub async fn tend(&self) {
        let idle: Vec<(String, Arc<tokio::sync::Mutex<Context>>)> = {
            let mut contexts = self.contexts.lock().expect("contexts lock");
            let expired: Vec<String> = contexts
                .iter()
                .filter(|(_, context)| {
                    // A context in a call is not idle, whatever it last finished.
                    context.try_lock().is_ok_and(|context| {
                        context.last_used.elapsed() >= self.context_idle_timeout
                    })
                })
                .map(|(id, _)| id.clone())
                .collect();
            expired
                .into_iter()
                .filter_map(|id| contexts.remove(&id).map(|context| (id, context)))
                .collect()
        };
        for (id, context) in idle {
            tracing::info!(context = %id, "ending an idle context");
            end(&mut *context.lock().await).await;
        }
    }

    /// Forgets every context, at shutdown: killing the pool's sandboxes ends their
    /// interpreters, so none is stopped one by one first.
    pub fn forget_all(&self) {
        self.contexts.lock().expect("contexts lock").clear();
    }
}

async fn end(context: &mut Context) {
    context.interpreter.kill().await;
    let _ = context.lease.envd().remove(&context.cwd).await;
}
