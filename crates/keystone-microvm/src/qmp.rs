//! A minimal QMP client: enough to ask the guest to power down and QEMU
//! to quit. One JSON object per line each way; events are skipped.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Qmp> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let writer = s.try_clone()?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
        };
        // The greeting, then capabilities negotiation.
        q.read_value()?;
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_value(&mut self) -> std::io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "qmp closed",
            ));
        }
        serde_json::from_str(&line)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Run a command and return its `return` value (or its error).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> std::io::Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        loop {
            let v = self.read_value()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(std::io::Error::other(format!("qmp {command}: {e}")));
            }
            // An asynchronous event: keep reading.
        }
    }

    /// Ctrl-Alt-Del: the guest kernel turns it into SIGINT for PID 1,
    /// which our init handles by syncing and powering off. (An ACPI power
    /// button would need a daemon in the guest to act on it.)
    pub fn ctrl_alt_del(&mut self) -> std::io::Result<()> {
        let keys: Vec<Value> = ["ctrl", "alt", "delete"]
            .iter()
            .map(|k| json!({ "type": "qcode", "data": k }))
            .collect();
        self.execute("send-key", Some(json!({ "keys": keys })))
            .map(|_| ())
    }

    pub fn quit(&mut self) -> std::io::Result<()> {
        self.execute("quit", None).map(|_| ())
    }
}
