//! The one list of configuration keys: for each dotted key, how a TOML value
//! or a string (environment, flag) becomes a checked field of [`Config`], and
//! how the field renders back to TOML.
//!
//! Every layer goes through the same per-key rule, so a value is judged the
//! same way whether it came from a file, a variable or a flag; only the
//! location in the error message differs.

use std::ops::Range;
use std::path::{Component, Path};

use toml_edit::Value;

use crate::model::{
    BackendKind, Config, EgressMode, Hypervisor, Multiplexer, NetworkMode, Profile, PullPolicy,
    ShareProto, SyncMode, TrustHostCas, WorkspaceMode,
};

/// A rejected value: the message, and (for a list element) the span of the
/// element at fault; `None` means "the whole value".
#[derive(Debug)]
pub(crate) struct ValueError {
    pub message: String,
    pub span: Option<Range<usize>>,
}

impl From<String> for ValueError {
    fn from(message: String) -> Self {
        ValueError {
            message,
            span: None,
        }
    }
}

/// Checks one string (a string field, or one element of a list field).
/// Arguments: the value, the key's label for messages.
type Check = fn(&str, &str) -> Result<(), String>;

/// Rule of a string field.
pub(crate) struct StrRule(pub Check);

/// Rule of a list field: `check` is applied to each element; with
/// `once_per_var`, the elements are `VAR=VALUE` and no `VAR` may appear
/// twice.
pub(crate) struct ItemRule {
    pub check: Check,
    pub once_per_var: bool,
}

/// Each element passes `check`.
const fn each(check: Check) -> ItemRule {
    ItemRule {
        check,
        once_per_var: false,
    }
}

/// Each element passes `check`, and no two name the same variable.
const fn each_var_once(check: Check) -> ItemRule {
    ItemRule {
        check,
        once_per_var: true,
    }
}

/// With `once_per_var`, the message for `item` when an earlier element of
/// `items` already names its variable.
fn repeated_var(rule: &ItemRule, items: &[String], item: &str, label: &str) -> Result<(), String> {
    if !rule.once_per_var {
        return Ok(());
    }
    let var = crate::split_assignment(item).map_or(item, |(var, _)| var);
    if items
        .iter()
        .any(|earlier| crate::split_assignment(earlier).is_some_and(|(v, _)| v == var))
    {
        return Err(format!(
            "{label} has two entries for {var}; keep one (a variable gets its value from one command)"
        ));
    }
    Ok(())
}

/// Inclusive range of an integer field; `max: None` means the type's maximum,
/// and then messages only mention the lower bound.
pub(crate) struct IntRule {
    pub min: i128,
    pub max: Option<i128>,
    pub unit: &'static str,
}

/// A type that a configuration field can have.
pub(crate) trait Setting: Sized {
    type Rule;
    fn from_toml(value: &Value, rule: &Self::Rule, label: &str) -> Result<Self, ValueError>;
    fn from_text(text: &str, rule: &Self::Rule, label: &str) -> Result<Self, String>;
    fn render(&self) -> String;
}

fn article(type_name: &str) -> &'static str {
    match type_name.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

fn wrong_type(label: &str, expected: &str, value: &Value) -> ValueError {
    let found = value.type_name();
    format!("{label} must be {expected}, not {} {found}", article(found)).into()
}

/// A string rendered as a TOML basic string, with TOML's escaping.
pub(crate) fn render_str(s: &str) -> String {
    Value::from(s).to_string()
}

// ---- integers ----

pub(crate) trait Int: Copy + ToString + TryFrom<i128> {
    const TYPE_MAX: i128;
}

impl Int for u16 {
    const TYPE_MAX: i128 = u16::MAX as i128;
}
impl Int for u32 {
    const TYPE_MAX: i128 = u32::MAX as i128;
}
impl Int for u64 {
    const TYPE_MAX: i128 = u64::MAX as i128;
}

fn check_int<T: Int>(n: i128, rule: &IntRule, label: &str) -> Result<T, String> {
    let unit = rule.unit;
    let min = rule.min;
    match rule.max {
        Some(max) if n < min || n > max => {
            return Err(format!("{label} must be between {min} and {max}{unit}"))
        }
        None if n < min => return Err(format!("{label} must be at least {min}{unit}")),
        None if n > T::TYPE_MAX => {
            return Err(format!("{label} must be at most {}{unit}", T::TYPE_MAX))
        }
        _ => {}
    }
    T::try_from(n).map_err(|_| format!("{label} must be at most {}{unit}", T::TYPE_MAX))
}

impl<T: Int> Setting for T {
    type Rule = IntRule;

    fn from_toml(value: &Value, rule: &IntRule, label: &str) -> Result<Self, ValueError> {
        match value.as_integer() {
            Some(n) => Ok(check_int(i128::from(n), rule, label)?),
            None => Err(wrong_type(label, "an integer", value)),
        }
    }

    fn from_text(text: &str, rule: &IntRule, label: &str) -> Result<Self, String> {
        let n = text
            .trim()
            .parse::<i128>()
            .map_err(|_| format!("{label} must be a whole number"))?;
        check_int(n, rule, label)
    }

    fn render(&self) -> String {
        self.to_string()
    }
}

// ---- booleans ----

impl Setting for bool {
    type Rule = ();

    fn from_toml(value: &Value, _: &(), label: &str) -> Result<Self, ValueError> {
        value
            .as_bool()
            .ok_or_else(|| wrong_type(label, "true or false", value))
    }

    fn from_text(text: &str, _: &(), label: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(format!("{label} must be true or false (or 1 or 0)")),
        }
    }

    fn render(&self) -> String {
        self.to_string()
    }
}

// ---- strings and lists of strings ----

impl Setting for String {
    type Rule = StrRule;

    fn from_toml(value: &Value, rule: &StrRule, label: &str) -> Result<Self, ValueError> {
        let s = value
            .as_str()
            .ok_or_else(|| wrong_type(label, "a string", value))?;
        (rule.0)(s, label)?;
        Ok(s.to_string())
    }

    fn from_text(text: &str, rule: &StrRule, label: &str) -> Result<Self, String> {
        (rule.0)(text, label)?;
        Ok(text.to_string())
    }

    fn render(&self) -> String {
        render_str(self)
    }
}

impl Setting for Vec<String> {
    type Rule = ItemRule;

    fn from_toml(value: &Value, rule: &ItemRule, label: &str) -> Result<Self, ValueError> {
        let array = value
            .as_array()
            .ok_or_else(|| wrong_type(label, "a list of strings", value))?;
        let mut items = Vec::with_capacity(array.len());
        for element in array.iter() {
            let at = |message: String| ValueError {
                message,
                span: element.span(),
            };
            let s = element.as_str().ok_or_else(|| {
                let found = element.type_name();
                at(format!(
                    "{label} must be a list of strings, but this element is {} {found}",
                    article(found)
                ))
            })?;
            (rule.check)(s, label).map_err(at)?;
            repeated_var(rule, &items, s, label).map_err(at)?;
            items.push(s.to_string());
        }
        Ok(items)
    }

    /// Comma-separated; blanks around items are dropped, and so are empty
    /// items, so an empty string is an empty list.
    fn from_text(text: &str, rule: &ItemRule, label: &str) -> Result<Self, String> {
        let items: Vec<String> = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        for (i, item) in items.iter().enumerate() {
            (rule.check)(item, label)?;
            repeated_var(rule, &items[..i], item, label)?;
        }
        Ok(items)
    }

    fn render(&self) -> String {
        let items: Vec<String> = self.iter().map(|s| render_str(s)).collect();
        format!("[{}]", items.join(", "))
    }
}

// ---- enums ----

fn enum_message(label: &str, names: &[&str]) -> String {
    format!("{label} must be one of: {}", names.join(", "))
}

macro_rules! enum_setting {
    ($($ty:ty),+ $(,)?) => {$(
        impl Setting for $ty {
            type Rule = ();

            fn from_toml(value: &Value, _: &(), label: &str) -> Result<Self, ValueError> {
                let s = value.as_str().ok_or_else(|| {
                    wrong_type(label, &format!("one of the strings {}", <$ty>::NAMES.join(", ")), value)
                })?;
                s.parse()
                    .map_err(|_| enum_message(label, <$ty>::NAMES).into())
            }

            fn from_text(text: &str, _: &(), label: &str) -> Result<Self, String> {
                text.trim()
                    .parse()
                    .map_err(|_| enum_message(label, <$ty>::NAMES))
            }

            fn render(&self) -> String {
                render_str(self.as_str())
            }
        }
    )+};
}

enum_setting!(
    NetworkMode,
    EgressMode,
    SyncMode,
    BackendKind,
    ShareProto,
    WorkspaceMode,
    PullPolicy,
    Profile,
    Multiplexer,
    TrustHostCas,
);

/// The seed's option lists three monitors; keystone's microVMs run on QEMU
/// alone (its descriptor-only command line, QMP, user-mode forward and
/// virtiofs are what the backend is built on; Firecracker and Cloud
/// Hypervisor are not in Debian 12). The other two names are understood,
/// so the message can say so, and refused where they are set.
impl Setting for Hypervisor {
    type Rule = ();

    fn from_toml(value: &Value, _: &(), label: &str) -> Result<Self, ValueError> {
        let s = value.as_str().ok_or_else(|| {
            wrong_type(
                label,
                &format!("one of the strings {}", Hypervisor::NAMES.join(", ")),
                value,
            )
        })?;
        Ok(supported_hypervisor(s, label)?)
    }

    fn from_text(text: &str, _: &(), label: &str) -> Result<Self, String> {
        supported_hypervisor(text.trim(), label)
    }

    fn render(&self) -> String {
        render_str(self.as_str())
    }
}

fn supported_hypervisor(s: &str, label: &str) -> Result<Hypervisor, String> {
    match s.parse::<Hypervisor>() {
        Ok(Hypervisor::Qemu) => Ok(Hypervisor::Qemu),
        Ok(other) => Err(format!(
            "{label} = \"{other}\" is not supported: keystone runs microVMs on QEMU only; \
             set \"qemu\" or remove the key"
        )),
        Err(_) => Err(enum_message(label, Hypervisor::NAMES)),
    }
}

// ---- the key table ----

/// One leaf key. The function pointers are monomorphic wrappers around the
/// field's [`Setting`], so the table can be a plain static slice.
pub(crate) struct Field {
    pub key: &'static str,
    pub set_toml: fn(&mut Config, &Value) -> Result<(), ValueError>,
    pub set_text: fn(&mut Config, &str) -> Result<(), String>,
    pub render: fn(&Config) -> String,
}

/// How a key is named in messages: `defaults.` is dropped because those keys
/// are the ones users meet first (`memory must be at least 1024 MB`).
pub(crate) fn label(key: &str) -> &str {
    key.strip_prefix("defaults.").unwrap_or(key)
}

fn set_toml<T: Setting>(
    slot: &mut T,
    value: &Value,
    rule: &T::Rule,
    key: &str,
) -> Result<(), ValueError> {
    *slot = T::from_toml(value, rule, label(key))?;
    Ok(())
}

fn set_text<T: Setting>(slot: &mut T, text: &str, rule: &T::Rule, key: &str) -> Result<(), String> {
    *slot = T::from_text(text, rule, label(key))?;
    Ok(())
}

macro_rules! field {
    ($key:literal => $($path:ident).+, $rule:expr) => {
        Field {
            key: $key,
            set_toml: |c, v| set_toml(&mut c.$($path).+, v, &$rule, $key),
            set_text: |c, s| set_text(&mut c.$($path).+, s, &$rule, $key),
            render: |c| Setting::render(&c.$($path).+),
        }
    };
}

const fn at_least(min: i128, unit: &'static str) -> IntRule {
    IntRule {
        min,
        max: None,
        unit,
    }
}

const fn between(min: i128, max: i128) -> IntRule {
    IntRule {
        min,
        max: Some(max),
        unit: "",
    }
}

/// Every leaf key, in the order of the SPEC's example file.
pub(crate) static FIELDS: &[Field] = &[
    field!("defaults.memory" => defaults.memory, at_least(1024, " MB")),
    field!("defaults.vcpus" => defaults.vcpus, between(1, 256)),
    field!("defaults.disk" => defaults.disk, between(1, 16384)),
    field!("defaults.nested_virt" => defaults.nested_virt, ()),
    field!("defaults.network" => defaults.network, ()),
    field!("defaults.sync_mode" => defaults.sync_mode, ()),
    field!("defaults.sync_idle_seconds" => defaults.sync_idle_seconds, at_least(1, "")),
    field!("defaults.env_files" => defaults.env_files, each(env_file_glob)),
    field!("defaults.persist" => defaults.persist, ()),
    field!("defaults.artifacts" => defaults.artifacts, each(artifact_path)),
    field!("defaults.strict" => defaults.strict, ()),
    field!("backend.type" => backend.kind, ()),
    field!("backend.microvm.hypervisor" => backend.microvm.hypervisor, ()),
    field!("backend.microvm.share_proto" => backend.microvm.share_proto, ()),
    field!("backend.microvm.workspace" => backend.microvm.workspace, ()),
    field!("backend.microvm.bridge" => backend.microvm.bridge, StrRule(interface_name)),
    field!("backend.microvm.kernel" => backend.microvm.kernel, StrRule(absolute_path_or_empty)),
    field!("backend.microvm.initrd" => backend.microvm.initrd, StrRule(absolute_path_or_empty)),
    field!("backend.kubernetes.context" => backend.kubernetes.context, StrRule(no_control)),
    field!("backend.kubernetes.namespace" => backend.kubernetes.namespace, StrRule(dns_label)),
    field!("backend.kubernetes.storage_class" => backend.kubernetes.storage_class, StrRule(dns_subdomain_or_empty)),
    field!("backend.kubernetes.image" => backend.kubernetes.image, StrRule(no_whitespace)),
    field!("backend.kubernetes.pull_policy" => backend.kubernetes.pull_policy, ()),
    field!("proxy.enable" => proxy.enable, ()),
    field!("proxy.domain" => proxy.domain, StrRule(dns_name)),
    field!("proxy.port" => proxy.port, between(1, 65535)),
    field!("guest.profile" => guest.profile, ()),
    field!("guest.suite" => guest.suite, StrRule(debian_suite)),
    field!("guest.mirror" => guest.mirror, StrRule(http_url)),
    field!("guest.packages" => guest.packages, each(debian_package)),
    field!("guest.forward_env" => guest.forward_env, each(env_var_name)),
    field!("guest.trust_host_cas" => guest.trust_host_cas, ()),
    field!("guest.agents.claude.enable" => guest.agents.claude.enable, ()),
    field!("guest.agents.claude.auto_accept" => guest.agents.claude.auto_accept, ()),
    field!("guest.agents.gemini.enable" => guest.agents.gemini.enable, ()),
    field!("guest.agents.gemini.auto_accept" => guest.agents.gemini.auto_accept, ()),
    field!("guest.agents.codex.enable" => guest.agents.codex.enable, ()),
    field!("guest.agents.codex.auto_accept" => guest.agents.codex.auto_accept, ()),
    field!("session.multiplexer" => session.multiplexer, ()),
    field!("egress.mode" => egress.mode, ()),
    field!("egress.presets" => egress.presets, each(egress_preset)),
    field!("egress.allow" => egress.allow, each(egress_rule)),
    field!("egress.deny" => egress.deny, each(egress_rule)),
    field!("egress.host_services" => egress.host_services, each(host_service)),
    field!("egress.resolver" => egress.resolver, StrRule(resolver_or_empty)),
    field!("credentials.hosts" => credentials.hosts, each(credential_host)),
    field!("credentials.headers" => credentials.headers, each(credential_header)),
    field!("credentials.commands" => credentials.commands, each_var_once(credential_command)),
];

/// Position of a leaf key in [`FIELDS`].
pub(crate) fn index(key: &str) -> Option<usize> {
    FIELDS.iter().position(|f| f.key == key)
}

/// Whether `path` ("backend", "guest.agents") is a table of the layout.
pub(crate) fn is_table(path: &str) -> bool {
    FIELDS.iter().any(|f| under(f.key, path).is_some())
}

/// `key` relative to table `table` ("" is the root), if it lies inside it.
fn under<'k>(key: &'k str, table: &str) -> Option<&'k str> {
    if table.is_empty() {
        Some(key)
    } else {
        key.strip_prefix(table)?.strip_prefix('.')
    }
}

/// The names a table may contain, in layout order.
pub(crate) fn children(table: &str) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for field in FIELDS {
        if let Some(rest) = under(field.key, table) {
            let name = rest.split('.').next().unwrap_or(rest);
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

// ---- value checks ----

fn no_control(s: &str, label: &str) -> Result<(), String> {
    if s.chars().any(char::is_control) {
        return Err(format!("{label} must not contain control characters"));
    }
    Ok(())
}

fn no_whitespace(s: &str, label: &str) -> Result<(), String> {
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{label} must not contain whitespace"));
    }
    Ok(())
}

/// Relative, non-empty, and never climbing out with `..`: these paths are
/// resolved against the project or the guest workspace, and must stay inside.
fn relative_inside(s: &str) -> bool {
    let path = Path::new(s);
    !s.is_empty()
        && !path.is_absolute()
        && !s.starts_with('/')
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn env_file_glob(s: &str, label: &str) -> Result<(), String> {
    if !relative_inside(s) {
        return Err(format!(
            "{label} entry \"{s}\" must be a glob relative to the project root, without `..`"
        ));
    }
    Ok(())
}

fn artifact_path(s: &str, label: &str) -> Result<(), String> {
    if !relative_inside(s) {
        return Err(format!(
            "{label} entry \"{s}\" must be a relative path inside the workspace: not absolute, without `..`"
        ));
    }
    Ok(())
}

fn interface_name(s: &str, label: &str) -> Result<(), String> {
    let ok = s.is_empty()
        || (s.len() <= 15
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')));
    if !ok {
        return Err(format!(
            "{label} must be a host network interface name (at most 15 letters, digits, `-`, `_` or `.`), or \"\""
        ));
    }
    Ok(())
}

fn absolute_path_or_empty(s: &str, label: &str) -> Result<(), String> {
    if !s.is_empty() && !Path::new(s).is_absolute() {
        return Err(format!(
            "{label} must be an absolute path, or \"\" to use the image's own"
        ));
    }
    no_control(s, label)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns_label(s: &str, label: &str) -> Result<(), String> {
    if !is_dns_label(s) {
        return Err(format!(
            "{label} must be a DNS-1123 label: at most 63 lower-case letters, digits or `-`, starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn dns_subdomain_or_empty(s: &str, label: &str) -> Result<(), String> {
    if !s.is_empty() && !is_dns_name(s) {
        return Err(format!(
            "{label} must be a DNS-1123 subdomain (lower-case letters, digits, `-` and `.`), or \"\" for the cluster's default"
        ));
    }
    Ok(())
}

fn dns_name(s: &str, label: &str) -> Result<(), String> {
    if !is_dns_name(s) {
        return Err(format!(
            "{label} must be a DNS name such as \"sandbox.localhost\": dot-separated labels of lower-case letters, digits and `-`"
        ));
    }
    Ok(())
}

fn debian_suite(s: &str, label: &str) -> Result<(), String> {
    let mut chars = s.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'));
    if !ok {
        return Err(format!(
            "{label} must be a Debian suite or codename such as \"trixie\" (lower-case letters, digits, `-`, `.`)"
        ));
    }
    Ok(())
}

fn http_url(s: &str, label: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
    let ok = host.is_some_and(|h| !h.is_empty())
        && !s.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        return Err(format!(
            "{label} must be an http:// or https:// URL such as \"http://deb.debian.org/debian\""
        ));
    }
    Ok(())
}

fn debian_package(s: &str, label: &str) -> Result<(), String> {
    let mut chars = s.chars();
    let ok = s.len() >= 2
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '.' | '-'));
    if !ok {
        return Err(format!(
            "{label} entry \"{s}\" is not a Debian package name (at least 2 lower-case letters, digits, `+`, `-` or `.`, starting with a letter or digit)"
        ));
    }
    Ok(())
}

/// A preset of `keystone_egress::policy::presets`, or `agents` (the
/// enabled agents' own, expanded at start).
fn egress_preset(s: &str, label: &str) -> Result<(), String> {
    let known: Vec<&str> = std::iter::once("agents")
        .chain(keystone_egress::policy::presets().iter().map(|(n, _)| *n))
        .collect();
    if known.contains(&s) {
        return Ok(());
    }
    Err(format!(
        "{label} entry \"{s}\" is not a preset; the presets are {}",
        known.join(", ")
    ))
}

fn egress_rule(s: &str, label: &str) -> Result<(), String> {
    keystone_egress::policy::parse_rule(s)
        .map(|_| ())
        .map_err(|e| format!("{label}: {e}"))
}

/// `127.0.0.1:PORT` or `[::1]:PORT`: a port of the host's loopback, the
/// only host addresses a guest may be given (anything else is a network
/// address, which `allow` takes).
fn host_service(s: &str, label: &str) -> Result<(), String> {
    match s.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_loopback() && a.port() != 0 => Ok(()),
        _ => Err(format!(
            "{label} entry \"{s}\" must be a port on the host's loopback, e.g. \"127.0.0.1:11434\""
        )),
    }
}

fn resolver_or_empty(s: &str, label: &str) -> Result<(), String> {
    if s.is_empty()
        || s.parse::<std::net::IpAddr>().is_ok()
        || s.parse::<std::net::SocketAddr>().is_ok()
    {
        return Ok(());
    }
    Err(format!(
        "{label} must be a DNS server's address (\"IP\" or \"IP:PORT\"), or \"\" for the host's own resolver"
    ))
}

fn is_env_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn env_var_name(s: &str, label: &str) -> Result<(), String> {
    if !is_env_var_name(s) {
        return Err(format!(
            "{label} entry \"{s}\" is not an environment variable name (letters, digits and `_`, not starting with a digit)"
        ));
    }
    Ok(())
}

/// `VAR=VALUE` split, VAR checked; `form` is the item's shape ("VAR=HOST")
/// and `example` a good item, for the messages.
fn assignment<'s>(
    s: &'s str,
    label: &str,
    form: &str,
    example: &str,
) -> Result<(&'s str, &'s str), String> {
    let Some((var, value)) = crate::split_assignment(s) else {
        return Err(format!(
            "{label} entry \"{s}\" must be {form}, e.g. \"{example}\""
        ));
    };
    if var.is_empty() {
        return Err(format!(
            "{label} entry \"{s}\": the variable name before `=` is missing; write {form}, e.g. \"{example}\""
        ));
    }
    if !is_env_var_name(var) {
        return Err(format!(
            "{label} entry \"{s}\": \"{var}\" is not an environment variable name \
             (letters, digits and `_`, not starting with a digit); write {form}, e.g. \"{example}\""
        ));
    }
    Ok((var, value))
}

/// `VAR=HOST[:PORT]`, HOST a lower-case DNS name or `*.domain`.
fn credential_host(s: &str, label: &str) -> Result<(), String> {
    const FORM: &str = "VAR=HOST or VAR=HOST:PORT";
    const EXAMPLE: &str = "GH_TOKEN=api.github.com";
    let (var, target) = assignment(s, label, FORM, EXAMPLE)?;
    let bad = |why: String| format!("{label} entry \"{s}\": {why}");
    if target.contains("://") || target.contains('/') {
        return Err(bad(format!(
            "\"{target}\" is not a host; write the host (and port) alone, without a scheme or path, \
             e.g. \"{var}=api.github.com\""
        )));
    }
    let (host, port) = match target.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (target, None),
    };
    if let Some(port) = port {
        let ok = !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !ok {
            return Err(bad(format!(
                "port \"{port}\" must be a number between 1 and 65535, e.g. \"{var}={host}:443\""
            )));
        }
    }
    let suffix = port.map(|p| format!(":{p}")).unwrap_or_default();
    if host.is_empty() {
        return Err(bad(format!(
            "the host is missing; write {FORM}, e.g. \"{EXAMPLE}\""
        )));
    }
    let normal = host.trim_end_matches('.').to_ascii_lowercase();
    let (wildcard, name) = match normal.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, normal.as_str()),
    };
    let spelled = if wildcard { "*." } else { "" };
    if !is_dns_name(name) {
        let why = if name.contains('*') {
            format!(
                "\"{host}\" is not a host: a wildcard may only be a whole first label, as in \"{var}=*.example.com\""
            )
        } else {
            format!(
                "\"{host}\" is not a DNS name (dot-separated labels of letters, digits and `-`) \
                 or `*.` and one, e.g. \"{EXAMPLE}\""
            )
        };
        return Err(bad(why));
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad(format!(
            "\"{host}\" is an IP address; credentials go to hosts by DNS name, e.g. \"{EXAMPLE}\""
        )));
    }
    if normal != host {
        return Err(bad(format!(
            "write the host in lower case without a trailing dot: \"{var}={spelled}{name}{suffix}\""
        )));
    }
    Ok(())
}

/// Headers whose value frames or routes the request: a credential in one
/// of them would change where or how the request goes.
const FRAMING_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

/// `VAR=Header-Name`, an HTTP field name (RFC 9110 token).
fn credential_header(s: &str, label: &str) -> Result<(), String> {
    const FORM: &str = "VAR=Header-Name";
    const EXAMPLE: &str = "GH_TOKEN=Authorization";
    let (var, header) = assignment(s, label, FORM, EXAMPLE)?;
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if header.is_empty() || !header.bytes().all(tchar) {
        return Err(format!(
            "{label} entry \"{s}\": \"{header}\" is not an HTTP header name (letters, digits and \
             !#$%&'*+-.^_`|~, no spaces or `:`), e.g. \"{var}=Authorization\" or \"{var}=X-Api-Key\""
        ));
    }
    if FRAMING_HEADERS.contains(&header.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "{label} entry \"{s}\": {header} routes or frames the request and cannot carry a credential; \
             name the header the service reads it from, e.g. \"{var}=Authorization\""
        ));
    }
    Ok(())
}

/// `VAR=shell command`: a non-empty command on one line.
fn credential_command(s: &str, label: &str) -> Result<(), String> {
    const FORM: &str = "VAR=shell command";
    const EXAMPLE: &str = "GH_TOKEN=gh auth token";
    let (var, command) = assignment(s, label, FORM, EXAMPLE)?;
    if command.trim().is_empty() {
        return Err(format!(
            "{label} entry \"{s}\": the command is empty; write the command whose output is {var}'s value, \
             e.g. \"{EXAMPLE}\""
        ));
    }
    if command.contains(['\0', '\n', '\r']) {
        return Err(format!(
            "{label} entry for {var}: the command must be one line, without NUL or line breaks; \
             put a longer script in a file and run that, e.g. \"{var}=sh ~/bin/{var_lower}.sh\"",
            var_lower = var.to_ascii_lowercase()
        ));
    }
    Ok(())
}

/// Edit distance, for "did you mean" on unknown keys.
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}
