//! An operator's abort of the migration under way at an agent (`POST /migrate/{id}/abort` on a
//! sidecar or `ums-ff`, from the pod's coordinator): it stops the migration before the
//! destination has confirmed that the service runs there, and the migration's own rollback
//! brings it back to running here. Once the destination has confirmed, the service is there and
//! an abort is refused.

use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

/// The migration this agent runs, if any, and whether it can still be stopped.
#[derive(Debug, Default)]
pub struct Aborts {
    current: Mutex<Option<Current>>,
}

#[derive(Debug)]
struct Current {
    id: String,
    cancel: CancellationToken,
    committed: bool,
}

/// The error of a migration an operator stopped.
pub const ABORTED: &str = "aborted by an operator";

/// Why an abort was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AbortRefused {
    #[error("no migration {0} is under way here")]
    Unknown(String),
    #[error("migration {0} is past its point of no return: the destination runs the service")]
    TooLate(String),
}

/// Registered for as long as the migration runs.
#[derive(Debug)]
pub struct Registration<'a> {
    aborts: &'a Aborts,
    id: String,
    pub cancel: CancellationToken,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Ok(mut current) = self.aborts.current.lock() {
            if current.as_ref().is_some_and(|c| c.id == self.id) {
                *current = None;
            }
        }
    }
}

impl Registration<'_> {
    /// The destination confirmed: from here on the migration is not stopped.
    pub fn commit(&self) {
        if let Ok(mut current) = self.aborts.current.lock() {
            if let Some(c) = current.as_mut().filter(|c| c.id == self.id) {
                c.committed = true;
            }
        }
    }
}

impl Aborts {
    /// Registers migration `id` as the one under way.
    pub fn begin(&self, id: &str) -> Registration<'_> {
        let cancel = CancellationToken::new();
        if let Ok(mut current) = self.current.lock() {
            *current = Some(Current {
                id: id.to_owned(),
                cancel: cancel.clone(),
                committed: false,
            });
        }
        Registration {
            aborts: self,
            id: id.to_owned(),
            cancel,
        }
    }

    /// An agent's answer to `POST /migrate/{id}/abort`: 202 while the migration can be stopped
    /// (its own answer then says it was aborted), 404 for a migration not under way, 409 once
    /// the destination runs the service; the status and the JSON body.
    pub fn answer(&self, id: &str) -> (u16, serde_json::Value) {
        match self.abort(id) {
            Ok(()) => (
                202,
                serde_json::json!({"migrationId": id, "aborting": true}),
            ),
            Err(e) => {
                let status = match e {
                    AbortRefused::Unknown(_) => 404,
                    AbortRefused::TooLate(_) => 409,
                };
                (status, serde_json::json!({"error": e.to_string()}))
            }
        }
    }

    /// Asks migration `id` to stop.
    pub fn abort(&self, id: &str) -> Result<(), AbortRefused> {
        let current = self
            .current
            .lock()
            .map_err(|_| AbortRefused::Unknown(id.to_owned()))?;
        match current.as_ref().filter(|c| c.id == id) {
            None => Err(AbortRefused::Unknown(id.to_owned())),
            Some(c) if c.committed => Err(AbortRefused::TooLate(id.to_owned())),
            Some(c) => {
                c.cancel.cancel();
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_migration_under_way_and_not_yet_confirmed_is_stopped() {
        let aborts = Aborts::default();
        assert_eq!(aborts.abort("m1"), Err(AbortRefused::Unknown("m1".into())));
        let running = aborts.begin("m1");
        assert_eq!(aborts.abort("m2"), Err(AbortRefused::Unknown("m2".into())));
        assert!(!running.cancel.is_cancelled());
        assert_eq!(aborts.abort("m1"), Ok(()));
        assert!(running.cancel.is_cancelled());
        running.commit();
        assert_eq!(aborts.abort("m1"), Err(AbortRefused::TooLate("m1".into())));
        assert_eq!(aborts.answer("m1").0, 409);
        drop(running);
        assert_eq!(aborts.abort("m1"), Err(AbortRefused::Unknown("m1".into())));
        let (status, body) = aborts.answer("m1");
        assert_eq!(status, 404);
        assert!(body["error"].as_str().unwrap().contains("m1"), "{body}");
        let _again = aborts.begin("m2");
        assert_eq!(aborts.answer("m2").0, 202);
    }
}
