//! Long-lived tasks under one supervisor.
//!
//! Every task that should live as long as the process (the operator's
//! reflectors, controller and push loop; the agent's listeners, admin
//! server and source of pools) is spawned on a [`Supervisor`]. They all end
//! at the process's stop; one that ends before it, or panics, is a fault:
//! the binary logs the task and its cause, fails `/healthz` ([`Health`])
//! and exits non-zero, so the kubelet restarts the pod. Short-lived tasks
//! (one per connection, per stream, per control session) are not
//! supervised: they end by design.

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
            Self::Returned => f.write_str("returned"),
            Self::Failed(e) => write!(f, "failed: {e}"),
            Self::Panicked(p) => write!(f, "panicked: {p}"),
        }
    }
}

/// A supervised task that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The process it belonged to (`operator`, `agent`), for messages.
    pub process: &'static str,
    /// The task's name.
    pub task: &'static str,
    /// Why.
    pub cause: Cause,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            Cause::Returned => write!(
                f,
                "task {} returned before the {} stopped",
                self.task, self.process
            ),
            cause => write!(f, "task {} {cause}", self.task),
        }
    }
}

/// What `/healthz` answers: healthy until a supervised task fails.
///
/// Clones share one state; the first failure stays until the process ends
/// (a later one replaces its text).
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

/// Long-lived tasks of one process, each with a name.
#[derive(Debug)]
pub struct Supervisor {
    process: &'static str,
    tasks: JoinSet<(&'static str, Result<(), String>)>,
    names: Vec<(tokio::task::Id, &'static str)>,
}

impl Supervisor {
    /// No tasks yet; `process` (`operator`, `agent`) names the process in
    /// [`Exit`] messages.
    pub fn new(process: &'static str) -> Self {
        Self {
            process,
            tasks: JoinSet::new(),
            names: Vec::new(),
        }
    }

    /// Spawns `task`, which should run until the process stops.
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
        let (task, cause) = match joined {
            Ok((_, (task, Ok(())))) => (task, Cause::Returned),
            Ok((_, (task, Err(e)))) => (task, Cause::Failed(e)),
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
                (task, cause)
            }
        };
        Some(Exit {
            process: self.process,
            task,
            cause,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_exit_names_its_task_and_cause() {
        let mut s = Supervisor::new("operator");
        s.spawn("forever", std::future::pending());
        s.spawn_fallible("broken", async { Err::<(), _>("the watch stream ended") });
        assert_eq!(s.len(), 2);
        let exit = s.next_exit().await.unwrap();
        assert_eq!(
            exit,
            Exit {
                process: "operator",
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
    async fn a_return_names_the_process_it_left() {
        let mut s = Supervisor::new("agent");
        s.spawn("admin server", async {});
        let exit = s.next_exit().await.unwrap();
        assert_eq!(exit.cause, Cause::Returned);
        assert_eq!(
            exit.to_string(),
            "task admin server returned before the agent stopped"
        );
    }

    #[tokio::test]
    async fn a_panic_is_caught_and_named() {
        let mut s = Supervisor::new("operator");
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
