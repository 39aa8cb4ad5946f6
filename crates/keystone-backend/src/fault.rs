//! Fault injection for the leak tests.
//!
//! A backend calls [`point`] at each place where an early return after the
//! guest exists could leak something (a process, a socket, a cgroup, a pod
//! or Secret). When `KEYSTONE_FAULT` names that point, the call fails as a
//! real error there would, and the test checks that nothing is left.
//!
//! Only debug builds (what `cargo test` builds) read the variable; in a
//! release build [`point`] is an empty function the optimiser removes, so
//! no shipped binary can be made to fail on purpose.

use crate::BackendError;

/// The environment variable naming the point that fails.
pub const VAR: &str = "KEYSTONE_FAULT";

/// Fail here if `KEYSTONE_FAULT` names `name` (debug builds only).
#[inline]
pub fn point(name: &'static str) -> Result<(), BackendError> {
    #[cfg(debug_assertions)]
    if std::env::var(VAR).is_ok_and(|v| v == name) {
        return Err(BackendError::Failed(format!(
            "fault injected at {name} ({VAR})"
        )));
    }
    let _ = name;
    Ok(())
}

/// Holds the supervisor after a run that failed at an injected fault,
/// before it reports the failure or exits, for `KEYSTONE_FAULT_HOLD_MS`
/// (debug builds only). The leak tests look at what is left during the
/// hold: the backend's own teardown must have removed everything by then,
/// before the supervisor's death signals and the CLI's clean-up could.
pub fn hold_after_failure() {
    #[cfg(debug_assertions)]
    if std::env::var_os(VAR).is_some() {
        if let Some(ms) = std::env::var(HOLD_VAR)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            eprintln!("{HOLD_MESSAGE} ({ms} ms)");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
}

/// How long the supervisor holds after an injected fault.
pub const HOLD_VAR: &str = "KEYSTONE_FAULT_HOLD_MS";
/// What the supervisor logs when the hold begins.
pub const HOLD_MESSAGE: &str = "supervisor: holding after an injected fault";

#[cfg(all(test, debug_assertions))]
mod tests {
    #[test]
    fn only_the_named_point_fails() {
        // The variable is process-wide; this test alone sets it.
        std::env::set_var(super::VAR, "fault-test-point");
        assert!(super::point("fault-test-point").is_err());
        assert!(super::point("another-point").is_ok());
        std::env::remove_var(super::VAR);
        assert!(super::point("fault-test-point").is_ok());
    }
}
