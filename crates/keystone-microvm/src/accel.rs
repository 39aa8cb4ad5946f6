//! Which accelerator QEMU gets, and whether nested virtualization can be
//! passed through, decided from what the host really offers.
//!
//! "`/dev/kvm` exists" is not "KVM works": on a PVM host (`kvm_pvm`
//! loaded) a stock kernel hangs at boot and `-cpu host` aborts, so such a
//! host gets TCG, and says why.

use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The accelerator to use and one line for the user saying why.
#[derive(Clone, Debug)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// What the host's files say about KVM. Separated from the probing so the
/// decision can be tested without a host.
#[derive(Clone, Debug, Default)]
pub struct KvmFacts {
    pub dev_kvm: bool,
    pub pvm: bool,
    /// Result of opening /dev/kvm read-write, as an error message.
    pub open_error: Option<String>,
}

impl KvmFacts {
    pub fn probe() -> KvmFacts {
        let dev_kvm = Path::new("/dev/kvm").exists();
        KvmFacts {
            dev_kvm,
            pvm: Path::new("/sys/module/kvm_pvm").exists(),
            open_error: if dev_kvm {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .err()
                    .map(|e| e.to_string())
            } else {
                None
            },
        }
    }

    pub fn choose(&self) -> AccelChoice {
        const COST: &str =
            "software emulation on one host thread for all vCPUs, several times slower to boot and build than with KVM";
        let tcg = |why: String| AccelChoice {
            accel: Accel::Tcg,
            reason: format!("acceleration: TCG ({COST}): {why}"),
        };
        if !self.dev_kvm {
            return tcg("this host has no /dev/kvm".into());
        }
        if self.pvm {
            return tcg("/dev/kvm is present but this is a PVM host (kvm_pvm), under which stock kernels hang".into());
        }
        if let Some(e) = &self.open_error {
            return tcg(format!(
                "/dev/kvm is not usable by this user ({e}); add the user to group kvm"
            ));
        }
        AccelChoice {
            accel: Accel::Kvm,
            reason: "acceleration: KVM".into(),
        }
    }
}

/// The host's nested-virtualization switch: the vendor's kvm module and
/// whether its `nested` parameter is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NestedHost {
    /// `kvm_intel` or `kvm_amd`, when loaded.
    pub module: Option<&'static str>,
    pub enabled: bool,
}

impl NestedHost {
    pub fn probe() -> NestedHost {
        for m in ["kvm_intel", "kvm_amd"] {
            if let Ok(v) = std::fs::read_to_string(format!("/sys/module/{m}/parameters/nested")) {
                return NestedHost {
                    module: Some(m),
                    enabled: matches!(v.trim(), "Y" | "y" | "1"),
                };
            }
        }
        NestedHost {
            module: None,
            enabled: false,
        }
    }

    /// The CPU flag that carries virtualization into the guest.
    pub fn cpu_flag(&self) -> Option<&'static str> {
        match self.module {
            Some("kvm_intel") => Some("vmx"),
            Some("kvm_amd") => Some("svm"),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        match self.module {
            Some(m) => format!("{m} nested={}", if self.enabled { "on" } else { "off" }),
            None => "no kvm_intel/kvm_amd module: nested virtualization unavailable".into(),
        }
    }
}

/// Whether the guest gets virtualization, and the line that says so.
pub fn nested_decision(
    wanted: bool,
    accel: Accel,
    host: &NestedHost,
) -> (Option<&'static str>, String) {
    if !wanted {
        return (
            None,
            "nested virtualization: off (disabled with --no-nested)".into(),
        );
    }
    if accel != Accel::Kvm {
        return (
            None,
            "nested virtualization: off (needs KVM; this VM runs under TCG)".into(),
        );
    }
    match (host.cpu_flag(), host.enabled) {
        (Some(flag), true) => (Some(flag), format!("nested virtualization: on ({flag} passed through)")),
        (Some(_), false) => (
            None,
            format!(
                "nested virtualization: off ({} has nested=off; enable it with `options {} nested=1` in /etc/modprobe.d)",
                host.module.unwrap_or("kvm"),
                host.module.unwrap_or("kvm")
            ),
        ),
        (None, _) => (None, format!("nested virtualization: off ({})", host.describe())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_host_gets_tcg_and_says_why() {
        let c = KvmFacts {
            dev_kvm: true,
            pvm: true,
            open_error: None,
        }
        .choose();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("PVM"), "{}", c.reason);
        assert!(c.reason.contains("slower"), "{}", c.reason);
    }

    #[test]
    fn no_dev_kvm_gets_tcg() {
        assert_eq!(KvmFacts::default().choose().accel, Accel::Tcg);
    }

    #[test]
    fn unopenable_kvm_gets_tcg_with_a_fix() {
        let c = KvmFacts {
            dev_kvm: true,
            pvm: false,
            open_error: Some("Permission denied".into()),
        }
        .choose();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("group kvm"));
    }

    #[test]
    fn working_kvm_is_used() {
        let c = KvmFacts {
            dev_kvm: true,
            pvm: false,
            open_error: None,
        }
        .choose();
        assert_eq!(c.accel, Accel::Kvm);
    }

    #[test]
    fn nested_needs_kvm_module_switch_and_wish() {
        let intel_on = NestedHost {
            module: Some("kvm_intel"),
            enabled: true,
        };
        assert_eq!(nested_decision(true, Accel::Kvm, &intel_on).0, Some("vmx"));
        assert_eq!(nested_decision(false, Accel::Kvm, &intel_on).0, None);
        assert_eq!(nested_decision(true, Accel::Tcg, &intel_on).0, None);
        let amd_off = NestedHost {
            module: Some("kvm_amd"),
            enabled: false,
        };
        let (flag, line) = nested_decision(true, Accel::Kvm, &amd_off);
        assert_eq!(flag, None);
        assert!(line.contains("nested=1"), "{line}");
        let amd_on = NestedHost {
            enabled: true,
            ..amd_off
        };
        assert_eq!(nested_decision(true, Accel::Kvm, &amd_on).0, Some("svm"));
    }
}
