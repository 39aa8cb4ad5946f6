//! How a build reports what it is doing.

/// Receives progress of a build. The CLI renders a spinner from it.
pub trait Progress {
    /// One of our own steps began.
    fn phase(&self, message: &str);
    /// One line of mmdebstrap's output.
    fn line(&self, line: &str);
}

/// Ignores all progress.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _message: &str) {}
    fn line(&self, _line: &str) {}
}
