//! The operator's long-lived tasks, under one supervisor.
//!
//! Every task that should live as long as the process (reflectors, the
//! controller, the push loop, the status writer, the CA keeper, the admin
//! server, …) is spawned on a [`Supervisor`]. They all end at the stop
//! token; one that ends before it, or panics, is a fault: [`app::run`]
//! logs the task and its cause, fails `/healthz` ([`Health`]) and returns
//! an error, so `main` exits non-zero and the kubelet restarts the pod.
//! Short-lived tasks (one per control session, per TLS handshake, the
//! initialization wait) are not supervised: they end by design.
//!
//! [`app::run`]: crate::app::run

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::task::JoinSet;

/// Why a supervised task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// It returned, with nothing to say.
    Returned,
    /// It returned an error.
    Failed(String),
    /// It panicked.
    Panicked(String),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Returned => f.write_str("returned before the operator stopped"),
            Self::Failed(e) => write!(f, "failed: {e}"),
            Self::Panicked(p) => write!(f, "panicked: {p}"),
        }
    }
}

/// A supervised task that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The task's name.
    pub task: &'static str,
    /// Why.
    pub cause: Cause,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task {} {}", self.task, self.cause)
    }
}

/// What `/healthz` answers: healthy until a supervised task fails.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<Option<String>>>);

impl Health {
    /// Marks the process unhealthy, saying why.
    pub fn fail(&self, why: String) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(why);
    }

    /// `None` while healthy, else why not.
    pub fn failure(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Long-lived tasks, each with a name.
#[derive(Debug, Default)]
pub struct Supervisor {
    tasks: JoinSet<(&'static str, Result<(), String>)>,
    names: Vec<(tokio::task::Id, &'static str)>,
}

impl Supervisor {
    /// No tasks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `task`, which should run until the operator stops.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn_fallible(name, async move {
            task.await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Spawns `task`, whose error is the cause when it ends.
    pub fn spawn_fallible<F, E>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display,
    {
        let handle = self
            .tasks
            .spawn(async move { (name, task.await.map_err(|e| e.to_string())) });
        self.names.push((handle.id(), name));
    }

    /// How many tasks run.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether none does.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The next task to end, and why; `None` once none is left.
    pub async fn next_exit(&mut self) -> Option<Exit> {
        let joined = self.tasks.join_next_with_id().await?;
        Some(match joined {
            Ok((_, (task, Ok(())))) => Exit {
                task,
                cause: Cause::Returned,
            },
            Ok((_, (task, Err(e)))) => Exit {
                task,
                cause: Cause::Failed(e),
            },
            Err(join) => {
                let id = join.id();
                let task = self
                    .names
                    .iter()
                    .find(|(i, _)| *i == id)
                    .map_or("unknown", |(_, n)| n);
                let cause = if join.is_panic() {
                    let payload = join.into_panic();
                    let text = payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a non-string panic".into());
                    Cause::Panicked(text)
                } else {
                    Cause::Failed("cancelled".into())
                };
                Exit { task, cause }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_exit_names_its_task_and_cause() {
        let mut s = Supervisor::new();
        s.spawn("forever", std::future::pending());
        s.spawn_fallible("broken", async { Err::<(), _>("the watch stream ended") });
        assert_eq!(s.len(), 2);
        let exit = s.next_exit().await.unwrap();
        assert_eq!(
            exit,
            Exit {
                task: "broken",
                cause: Cause::Failed("the watch stream ended".into())
            }
        );
        assert_eq!(
            exit.to_string(),
            "task broken failed: the watch stream ended"
        );
    }

    #[tokio::test]
    async fn a_panic_is_caught_and_named() {
        let mut s = Supervisor::new();
        s.spawn("panics", async { panic!("boom") });
        let exit = s.next_exit().await.unwrap();
        assert_eq!(exit.task, "panics");
        assert_eq!(exit.cause, Cause::Panicked("boom".into()));
        assert!(s.next_exit().await.is_none(), "none left");
    }

    #[test]
    fn health_fails_once_told() {
        let h = Health::default();
        assert_eq!(h.failure(), None);
        h.clone().fail("task x returned".into());
        assert_eq!(h.failure().as_deref(), Some("task x returned"));
    }
}
