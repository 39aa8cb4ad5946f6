//! Sandbox names: safe as a hostname label, a directory name, a tmux
//! session prefix and a Kubernetes object name.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("invalid sandbox name {name:?}: {reason}; use 1-40 lower-case letters, digits and '-', starting with a letter or digit")]
pub struct NameError {
    pub name: String,
    pub reason: &'static str,
}

pub const MAX_LEN: usize = 40;

pub fn validate_name(name: &str) -> Result<(), NameError> {
    let err = |reason| {
        Err(NameError {
            name: name.into(),
            reason,
        })
    };
    if name.is_empty() {
        return err("it is empty");
    }
    if name.len() > MAX_LEN {
        return err("it is too long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return err("it has characters other than a-z, 0-9 and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return err("it starts or ends with '-'");
    }
    Ok(())
}

/// A name for the sandbox of `project` (its directory name, made safe),
/// made unique against `taken` by a numeric suffix.
pub fn derive_name(project: &Path, taken: &[&str]) -> String {
    let raw = project
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut base = String::new();
    for c in raw.chars() {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (base.is_empty() || base.ends_with('-'))) {
            base.push(c);
        }
    }
    base.truncate(MAX_LEN - 4);
    let base = base.trim_end_matches('-');
    let base = if base.is_empty() { "sandbox" } else { base };
    if !taken.contains(&base) {
        return base.to_string();
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|c| !taken.contains(&c.as_str()))
        .unwrap_or_else(|| base.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_safe_unique_names() {
        assert_eq!(
            derive_name(Path::new("/src/My_Project.rs"), &[]),
            "my-project-rs"
        );
        assert_eq!(derive_name(Path::new("/src/app"), &["app"]), "app-2");
        assert_eq!(
            derive_name(Path::new("/src/app"), &["app", "app-2"]),
            "app-3"
        );
        assert_eq!(derive_name(Path::new("/src/___"), &[]), "sandbox");
        let long = "a".repeat(100);
        assert!(derive_name(Path::new(&long), &[]).len() <= MAX_LEN);
    }

    #[test]
    fn validates_names() {
        assert!(validate_name("app-2").is_ok());
        for bad in ["", "App", "a b", "-a", "a-", "a/b", "..", &"x".repeat(41)] {
            assert!(validate_name(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
