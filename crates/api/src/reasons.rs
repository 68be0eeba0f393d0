//! The reasons the operator writes on conditions and events: fixed sets that GitOps
//! health checks, alerts and the troubleshooting guide can match on.

macro_rules! reasons {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
        }

        impl $name {
            /// Every reason, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant),)*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownReason;

            fn from_str(text: &str) -> Result<Self, UnknownReason> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|reason| reason.as_str() == text)
                    .ok_or_else(|| UnknownReason(text.to_string()))
            }
        }

        impl PartialEq<$name> for Option<String> {
            fn eq(&self, reason: &$name) -> bool {
                self.as_deref() == Some(reason.as_str())
            }
        }
    };
}

/// A reason string that is none of a set's.
#[derive(Debug, thiserror::Error)]
#[error("unknown reason {0:?}")]
pub struct UnknownReason(pub String);

reasons! {
    /// Why a template is (not yet) Ready, on its conditions and events.
    TemplateReason {
        BuildStarted,
        Building,
        BuildSucceeded,
        Adopted,
        BuildFailed,
        /// The build ran past `spec.build.timeoutSeconds`.
        BuildTimedOut,
        MissingCredentials,
        Unauthorized,
        MissingConfigMap,
        TemplateNotFound,
        ProviderNotConfigured,
        ProviderUnavailable,
        Queued,
        DeletionBlocked,
        /// Event only: the provider's template was deleted with the resource.
        Deleted,
        /// Event only: a Ready template vanished from its provider and is built again.
        TemplateVanished,
    }
}

reasons! {
    /// Why a template's warm pool is (not) full, on its `PoolReady` condition.
    PoolReason {
        /// The pool holds its size of idle sandboxes of the current build.
        PoolFull,
        /// Fewer idle sandboxes than the size: after claims, a start, or a provider that
        /// refuses creates.
        PoolFilling,
        /// Idle sandboxes of an older build are being replaced after a rebuild.
        PoolRolling,
    }
}

impl TemplateReason {
    /// Whether the template waits for a change (spec, Secret, ConfigMap) rather than for
    /// time: kstatus' `Stalled`.
    pub fn is_stalled(self) -> bool {
        matches!(
            self,
            TemplateReason::BuildFailed
                | TemplateReason::BuildTimedOut
                | TemplateReason::MissingCredentials
                | TemplateReason::Unauthorized
                | TemplateReason::MissingConfigMap
                | TemplateReason::TemplateNotFound
                | TemplateReason::ProviderNotConfigured
        )
    }

    /// The reasons a template's conditions carry (the rest are events only).
    pub fn on_conditions() -> impl Iterator<Item = TemplateReason> {
        TemplateReason::ALL.iter().copied().filter(|reason| {
            !matches!(
                reason,
                TemplateReason::Deleted | TemplateReason::TemplateVanished
            )
        })
    }
}

reasons! {
    /// Why a task is where it is, on its conditions (`status.reason`) and events.
    TaskReason {
        /// Waiting for its SandboxTemplate to be Ready.
        TemplateNotReady,
        /// Waiting for a Secret or key its environment names.
        MissingSecret,
        /// Over the operator's cap of running tasks, waiting in creation order.
        Queued,
        /// The provider could not be reached or answered with an error; retried.
        ProviderUnavailable,
        /// The provider refused a sandbox for lack of capacity; retried.
        ProviderBusy,
        /// The provider refused the sandbox for good (a bad template, say).
        ProviderRejected,
        /// The apiserver refused the operator's finalizer (RBAC, an admission policy).
        FinalizerRefused,
        /// A sandbox is being made for the task.
        Provisioning,
        /// Event: the sandbox exists.
        SandboxCreated,
        /// The agent runs.
        Running,
        /// Event: the agent started.
        Started,
        Succeeded,
        /// The agent exited non-zero or reported an error.
        AgentFailed,
        /// The model's API answered with an error the CLI gave up on.
        AgentApiError,
        /// Claude Code found no credentials for the model in its environment.
        MissingModelCredentials,
        /// Claude Code stopped at its turn limit.
        MaxTurns,
        /// Claude Code gave no answer matching `claudeCode.jsonSchema`
        /// (`error_max_structured_output_retries`, or a run that ended without one).
        StructuredOutputFailed,
        /// Claude Code refused `claudeCode.jsonSchema`: not a valid JSON Schema.
        InvalidJsonSchema,
        /// The agent ended without a result; retried within the backoff limit.
        AgentIncomplete,
        /// The agent's process vanished without an exit status.
        AgentLost,
        /// The sandbox vanished; retried within the backoff limit.
        SandboxLost,
        /// The sandbox was paused on its provider; the task waits for it to be resumed.
        SandboxPaused,
        /// `activeDeadlineSeconds` passed.
        DeadlineExceeded,
        /// The workspace's files could not be written.
        InvalidWorkspace,
        /// `outputs` holds a pattern that does not compile.
        InvalidOutputs,
        /// A pattern of `outputs.artifacts` not marked optional matched no file.
        ArtifactNotFound,
        /// `workspace.git` could not be cloned: the host did not answer, or the workspace
        /// directory is not empty.
        GitCloneFailed,
        /// The git server refused the credentials of `workspace.git.secretRef` (or asked
        /// for credentials the task did not give).
        GitAuthFailed,
        /// `workspace.git.ref` is no branch, tag or commit of the repository.
        GitRefNotFound,
        /// The clone grew past `workspace.git.maxSizeMiB`.
        GitRepositoryTooLarge,
        /// The branch of `outputs.git.push` holds commits the push does not; nothing was
        /// pushed.
        GitPushRejected,
        /// The push of `outputs.git.push` failed for another reason.
        GitPushFailed,
        /// Event: a deleted task's sandbox could not be killed yet.
        CleanupBlocked,
    }
}

impl TaskReason {
    /// Reasons whose waits are no one's fault: a Normal event, not a Warning.
    pub fn is_normal_wait(self) -> bool {
        matches!(
            self,
            TaskReason::TemplateNotReady | TaskReason::SandboxPaused
        )
    }

    /// Events published once per attempt, through a recorder of their own (see the
    /// task controller's publishing).
    pub fn is_once_per_attempt(self) -> bool {
        matches!(
            self,
            TaskReason::SandboxCreated | TaskReason::Started | TaskReason::Succeeded
        )
    }
}
