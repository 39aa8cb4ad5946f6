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
