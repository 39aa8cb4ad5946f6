//! Reading one configuration file into the configuration, with positions.
//!
//! The file is parsed as a span-preserving `toml_edit` document and walked
//! against the key table in `schema`, instead of being deserialized with
//! serde: that way every error (syntax, unknown key, wrong type, bad value)
//! points at the exact key or value, and an unknown key can be answered with
//! the keys that table allows.

use std::ops::Range;
use std::path::Path;

use toml_edit::{ImDocument, Item, TableLike};

use crate::error::ConfigError;
use crate::schema::{self, FIELDS};
use crate::{Effective, Origin};

/// Which layer a file is: a project file may not set the host-only keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layer {
    User,
    Project,
}

/// Applies the file at `path` on top of `effective`, recording `origin` for
/// every key it sets. A missing file is not an error: both files are optional.
pub(crate) fn apply(
    path: &Path,
    origin: &Origin,
    effective: &mut Effective,
) -> Result<(), ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    apply_text(path, &text, origin, Layer::User, effective).map(drop)
}

/// Applies `text`, read from `path`; the host-only keys a project file
/// set (validated, not applied).
pub(crate) fn apply_text(
    path: &Path,
    text: &str,
    origin: &Origin,
    layer: Layer,
    effective: &mut Effective,
) -> Result<Vec<String>, ConfigError> {
    let cx = Cx {
        path,
        text,
        layer,
        ignored: Default::default(),
    };
    let doc = ImDocument::parse(text).map_err(|e| {
        // toml_edit puts "what" and "expected what" on separate lines.
        let message: Vec<&str> = e.message().lines().map(str::trim).collect();
        cx.error(e.span(), format!("invalid TOML: {}", message.join("; ")))
    })?;
    walk(doc.as_table(), "", &cx, origin, effective)?;
    Ok(cx.ignored.into_inner())
}

struct Cx<'a> {
    path: &'a Path,
    text: &'a str,
    layer: Layer,
    ignored: std::cell::RefCell<Vec<String>>,
}

impl Cx<'_> {
    fn error(&self, span: Option<Range<usize>>, message: String) -> ConfigError {
        let (line, column) = line_column(self.text, span.map_or(0, |s| s.start));
        ConfigError::File {
            path: self.path.to_path_buf(),
            line,
            column,
            message,
        }
    }
}

/// 1-based line and column (in characters) of byte `offset`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn walk(
    table: &dyn TableLike,
    prefix: &str,
    cx: &Cx<'_>,
    origin: &Origin,
    effective: &mut Effective,
) -> Result<(), ConfigError> {
    for (name, item) in table.iter() {
        let key_span = table.get_key_value(name).and_then(|(key, _)| key.span());
        let path = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        if let Some(index) = schema::index(&path) {
            let Item::Value(value) = item else {
                return Err(cx.error(
                    key_span.or_else(|| item.span()),
                    format!("{} must be a value, not a table", schema::label(&path)),
                ));
            };
            if cx.layer == Layer::Project && crate::trust::host_only(&path).is_some() {
                // Still validated, so a typo is reported, but never applied.
                let mut scratch = crate::Config::default();
                (FIELDS[index].set_toml)(&mut scratch, value).map_err(|e| {
                    cx.error(e.span.or_else(|| value.span()).or(key_span), e.message)
                })?;
                cx.ignored.borrow_mut().push(path);
                continue;
            }
            (FIELDS[index].set_toml)(&mut effective.config, value)
                .map_err(|e| cx.error(e.span.or_else(|| value.span()).or(key_span), e.message))?;
            effective.origins[index] = origin.clone();
        } else if schema::is_table(&path) {
            let Some(inner) = item.as_table_like() else {
                return Err(cx.error(
                    key_span.or_else(|| item.span()),
                    format!("`{path}` must be a table, written [{path}]"),
                ));
            };
            walk(inner, &path, cx, origin, effective)?;
        } else {
            return Err(cx.error(
                key_span.or_else(|| item.span()),
                unknown(prefix, name, item.is_table_like()),
            ));
        }
    }
    Ok(())
}

fn unknown(prefix: &str, name: &str, is_table: bool) -> String {
    let allowed = schema::children(prefix);
    let suggestion = allowed
        .iter()
        .map(|candidate| (schema::distance(name, candidate), candidate))
        .filter(|(d, candidate)| *d <= 2.max(candidate.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, candidate)| format!(" (did you mean `{candidate}`?)"))
        .unwrap_or_default();
    if prefix.is_empty() {
        let what = if is_table { "table" } else { "top-level key" };
        format!(
            "unknown {what} `{name}`{suggestion}; the top level only holds the tables: {}",
            allowed.join(", ")
        )
    } else {
        format!(
            "unknown key `{name}` in [{prefix}]{suggestion}; allowed keys are: {}",
            allowed.join(", ")
        )
    }
}
