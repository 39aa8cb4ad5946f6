//! The sandbox state machine from SPEC.md ("Data model").
//!
//! created → starting → running | error; running → stopping → stopped;
//! stopped → starting | destroyed; error → starting | destroyed.
//! Every other transition is refused; the CLI maps that to exit code 2.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Created,
    Starting,
    Running,
    Stopping,
    Stopped,
    Error,
    Destroyed,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Created,
        State::Starting,
        State::Running,
        State::Stopping,
        State::Stopped,
        State::Error,
        State::Destroyed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Error => "error",
            State::Destroyed => "destroyed",
        }
    }

    /// Whether the state machine allows `self → to`.
    pub fn can_become(self, to: State) -> bool {
        use State::*;
        matches!(
            (self, to),
            (Created, Starting)
                | (Starting, Running)
                | (Starting, Error)
                | (Running, Stopping)
                | (Running, Error)
                | (Stopping, Stopped)
                | (Stopping, Error)
                | (Stopped, Starting)
                | (Stopped, Destroyed)
                | (Error, Starting)
                | (Error, Destroyed)
        )
    }

    /// States in which some live process (the starting CLI or the
    /// supervisor) is responsible for the sandbox.
    pub fn is_active(self) -> bool {
        matches!(self, State::Starting | State::Running | State::Stopping)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = State::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown state {s:?}; expected one of {}", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::State::{self, *};

    #[test]
    fn spec_transitions_are_allowed() {
        for (a, b) in [
            (Created, Starting),
            (Starting, Running),
            (Starting, Error),
            (Running, Stopping),
            (Stopping, Stopped),
            (Stopped, Starting),
            (Stopped, Destroyed),
            (Error, Starting),
            (Error, Destroyed),
        ] {
            assert!(a.can_become(b), "{a} -> {b} must be allowed");
        }
    }

    #[test]
    fn other_transitions_are_refused() {
        for (a, b) in [
            (Running, Starting),
            (Running, Destroyed),
            (Stopped, Stopping),
            (Stopped, Running),
            (Destroyed, Starting),
            (Created, Running),
            (Starting, Stopped),
        ] {
            assert!(!a.can_become(b), "{a} -> {b} must be refused");
        }
    }

    #[test]
    fn parses_every_name() {
        for s in State::ALL {
            assert_eq!(s.as_str().parse::<State>().ok(), Some(s));
        }
        assert!("runing".parse::<State>().is_err());
    }
}
